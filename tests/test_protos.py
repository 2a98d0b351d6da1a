"""The committed generated code in exo_node/transport/pb matches protos/exo_node.proto."""
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN, PROTO, PB = ROOT / "scripts" / "gen_protos.py", ROOT / "protos" / "exo_node.proto", ROOT / "exo_node" / "transport" / "pb"

def gen(*args) -> subprocess.CompletedProcess: return subprocess.run([sys.executable, str(GEN), *args], capture_output=True, text=True, cwd=ROOT)


def test_committed_code_is_fresh():
  r = gen("--check")
  assert r.returncode == 0, r.stderr

def test_grpc_module_imports_pb2_from_the_package():
  src = (PB / "exo_node_pb2_grpc.py").read_text()
  assert "from exo_node.transport.pb import exo_node_pb2 as" in src and "\nimport exo_node_pb2" not in src
  from exo_node.transport.pb import exo_node_pb2 as pb, exo_node_pb2_grpc as pbg
  assert pbg.ExoNodeStub and pb.Frame(step=pb.Step(step=3)).WhichOneof("kind") == "step"

def test_a_changed_proto_is_detected(tmp_path):
  proto = tmp_path / "exo_node.proto"
  proto.write_text(PROTO.read_text().replace("message End { string reason = 1; }", "message End { string reason = 1; uint32 extra = 2; }"))
  assert proto.read_text() != PROTO.read_text()
  r = gen("--check", "--proto", str(proto))
  assert r.returncode == 1 and "stale" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert gen("--proto", str(proto), "--out", str(tmp_path / "pb")).returncode == 0
  assert (tmp_path / "pb" / "exo_node_pb2.py").read_bytes() != (PB / "exo_node_pb2.py").read_bytes()
  assert gen("--check", "--out", str(tmp_path / "pb")).returncode == 1  # and the other way round
