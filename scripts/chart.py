"""The bench's PNG: decode tok/s of every configuration measured in one run, single node against pipelines."""
from __future__ import annotations
from pathlib import Path


def label(row: dict) -> str:
  kind = {"single": "single", "pipeline": "pipeline", "concurrent": f"{row['concurrency']} streams"}[row["mode"]]
  return f"{row['nodes']} node{'s' if row['nodes'] > 1 else ''}\n{kind}"


def write_chart(rows: list[dict], summary: dict, path: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  bars = [r for r in rows if r["mode"] in ("single", "pipeline", "concurrent")]
  colors = {"single": "#4c72b0", "pipeline": "#55a868", "concurrent": "#c44e52"}
  fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(bars), 4.2), dpi=120)
  heights = [r["decode_tok_s"] for r in bars]
  drawn = ax.bar(range(len(bars)), heights, color=[colors[r["mode"]] for r in bars])
  ax.bar_label(drawn, labels=[f"{h:.1f}" for h in heights], padding=2)
  ax.set_xticks(range(len(bars)), [label(r) for r in bars], fontsize=8)
  ax.set_ylabel("decode tok/s (concurrent: aggregate)")
  ratios = ", ".join(f"{k} {v}" for k, v in summary.items() if k.startswith(("pipeline_vs_single", "concurrent_")))
  ax.set_title(f"{summary['model']} on {summary.get('device', '?')}\n{ratios}", fontsize=8)
  ax.margins(y=0.15)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
