"""The bench's chart: one bar per measured configuration, written as a real PNG."""
import struct, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from chart import label, write_chart  # noqa: E402


def test_chart_is_a_png_with_a_bar_per_configuration(tmp_path):
  rows = [{"mode": "single", "nodes": 1, "concurrency": 1, "decode_tok_s": 20.1},
          {"mode": "pipeline", "nodes": 2, "concurrency": 1, "decode_tok_s": 19.0},
          {"mode": "concurrent", "nodes": 2, "concurrency": 4, "decode_tok_s": 31.5}]
  summary = {"model": "smollm2-135m", "device": "CPU", "pipeline_vs_single_2": 0.945}
  data = write_chart(rows, summary, tmp_path / "bench.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = struct.unpack(">II", data[16:24])
  assert width > 300 and height > 300
  assert [label(r) for r in rows] == ["1 node\nsingle", "2 nodes\npipeline", "2 nodes\n4 streams"]
