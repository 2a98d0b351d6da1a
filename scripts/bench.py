#!/usr/bin/env python3
"""Decode/prefill speed of single nodes and pipelines, measured in one run on this machine.
Prints one JSON object per line; the last line is a summary of ratios from the same run."""
from __future__ import annotations
import argparse, json, statistics, sys, tempfile, threading, time
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from exo_node.local_cluster import Cluster, Proc
from exo_node.model.random_weights import PREFIX
from chart import write_chart

SEED = 11  # sampled streams: SmolLM2 writes 64 tokens from the short prompt with it (seeds 5 and 15 stop sooner)


def free_ports(n: int) -> list[int]:
  import socket
  socks = [socket.socket() for _ in range(n)]
  for s in socks: s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks: s.close()
  return ports


def one_stream(coord: Proc, prompt: list[int], n: int, temperature: float = 0.0) -> dict:
  t0 = time.monotonic()
  stamps = [t for _, t in coord.stream(prompt, max_tokens=n, timeout=3600, temperature=temperature, seed=SEED)]
  ttft = stamps[0] - t0
  return {"ttft_s": ttft, "decode_tok_s": (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9), "tokens": len(stamps),
          "wall_s": stamps[-1] - t0, "end": stamps[-1]}


def stall(coord: Proc, prompt: list[int], long_prompt: list[int]) -> float:
  """The longest gap between a stream's tokens while long_prompt arrives on its coordinator, to that prompt's first token."""
  stamps, done = [], threading.Event()
  def consume() -> None:
    for _, t in coord.stream(prompt, max_tokens=1 << 20, timeout=3600):
      stamps.append(t)
      if done.is_set(): break  # closing the stream cancels the request
  (reader := threading.Thread(target=consume)).start()
  while len(stamps) < 3 and reader.is_alive(): time.sleep(0.005)
  first = len(stamps) - 1
  one_stream(coord, long_prompt, 1)
  if not reader.is_alive(): raise SystemExit("bench: the stream stopped before the long prompt's first token: no stall measured")
  done.set(); reader.join()
  return max(b - a for a, b in zip(stamps[first:], stamps[first + 1:]))


def measure(counts: list[int], args, log_dir: Path) -> list[dict]:
  """Every configuration is up at once and their runs alternate, so a noisy machine's drift hits them alike."""
  batch = 1 << (args.concurrency - 1).bit_length()  # the nodes batch as many decode steps as there are streams
  context = max(512, max(args.context, args.prefill_tokens) + args.tokens + 16)  # every prompt of the run fits
  extra = ["--model", args.model, "--max-batch", str(min(batch, 16)), "--warm", "--max-context", str(context), "--threads", str(args.threads)] + \
          (["--beam", str(args.beam)] if args.beam else []) + (["--device", args.device] if args.device else [])
  with ExitStack() as stack:
    ports, clusters = free_ports(sum(counts)), {}
    for n in counts:
      (d := log_dir / f"{n}-nodes").mkdir()
      clusters[n] = stack.enter_context(Cluster().start(ports[:n], d, extra=extra)); ports = ports[n:]
    for c in clusters.values(): c.wait_ready(timeout=1800)
    coords = {n: next(p for p in c.procs if p.info().start_layer == 0) for n, c in clusters.items()}
    filler = lambda n: [504 + (i % 300) for i in range(n)]
    long_prompt = filler(args.prefill_tokens)
    # "Once upon a time": SmolLM2 writes on past --tokens from it (greedy from the old prompt it stopped at 29)
    short = [6403, 1980, 253, 655] if not args.context else filler(args.context)
    for _ in range(args.warmup):
      for coord in coords.values(): one_stream(coord, long_prompt, 4); one_stream(coord, short, 4)
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    sampled: dict[int, list[dict]] = {n: [] for n in counts}  # at the OpenAI API's default temperature, 1.0
    pre: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.runs):
      for n, coord in coords.items():
        runs[n].append(one_stream(coord, short, args.tokens))
        sampled[n].append(one_stream(coord, short, args.tokens, temperature=1.0))
    gaps: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.runs):
      for n, coord in coords.items():
        pre[n].append(one_stream(coord, long_prompt, 1)["ttft_s"])
        gaps[n].append(stall(coord, short, long_prompt))
    rows = [{"mode": "single" if n == 1 else "pipeline", "nodes": n, "model": args.model, "concurrency": 1,
             "device": coords[n].info().device,
             "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs[n]), 2),
             "sampled_decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in sampled[n]), 2),
             "prefill_tok_s": round(args.prefill_tokens / statistics.median(pre[n]), 1),
             "ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in runs[n]), 1),
             "stall_ms": round(1000 * statistics.median(gaps[n]), 1),
             "peak_rss_mb": round(max(p.peak_rss() for p in clusters[n].procs) / 2**20, 1)} for n in counts]
    if args.concurrency > 1:
      with ThreadPoolExecutor(args.concurrency) as pool:
        def streams(n: int) -> tuple[float, list[dict]]:
          """Tokens over the time to the last one, as a single stream's wall_s counts it (not to the streams' ends)."""
          t0 = time.monotonic()
          res = list(pool.map(lambda i: one_stream(clusters[n].procs[i % n], short, args.tokens), range(args.concurrency)))
          return sum(r["tokens"] for r in res) / max(r["end"] - t0 for r in res), res
        for n in counts: streams(n)  # warm-up: the first pass of each decode batch size captures its JIT
        conc: dict[int, list[tuple[float, list[dict]]]] = {n: [] for n in counts}
        alone: dict[int, list[dict]] = {n: [] for n in counts}  # one stream between the concurrent runs: the same drift
        for _ in range(args.runs):
          for n in counts:
            conc[n].append(streams(n))
            alone[n].append(one_stream(coords[n], short, args.tokens))
      for n in counts:
        agg = statistics.median(a for a, _ in conc[n])
        # the tokens the stream really got, should a stop token end it before --tokens
        single = statistics.median(r["tokens"] / r["wall_s"] for r in alone[n])
        rows.append({"mode": "concurrent", "nodes": n, "model": args.model, "concurrency": args.concurrency,
                     "decode_tok_s": round(agg, 2), "prefill_tok_s": None,
                     "ttft_ms": round(1000 * statistics.median(r["ttft_s"] for _, res in conc[n] for r in res), 1),
                     "aggregate_vs_one_stream": round(agg / single, 3)})
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--shape", default=None, help="random weights of this shape instead of --model: llama-1b, llama-8b, llama-tiny")
  p.add_argument("--device", default=None, help="the nodes' tinygrad backend, e.g. CUDA (default: what tinygrad finds)")
  p.add_argument("--nodes", default="1", help="comma-separated node counts, all measured in this run")
  p.add_argument("--tokens", type=int, default=48)
  p.add_argument("--prefill-tokens", type=int, default=64)
  p.add_argument("--context", type=int, default=0, help="decode after a prompt of this many tokens (default: a 4-token one)")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--concurrency", type=int, default=1)
  p.add_argument("--beam", type=int, default=0)
  p.add_argument("--threads", type=int, default=1, help="every node's CPU threads (default 1: the configurations share "
                 "this machine's cores, and each node computes on as many; 0: each node's share, as exo-node defaults)")
  p.add_argument("--out", type=Path, default=Path("bench-results"), help="bench.jsonl and bench.png go here")
  args = p.parse_args()
  if args.shape: args.model = PREFIX + args.shape
  counts = [int(x) for x in args.nodes.split(",")]
  rows: list[dict] = []
  with tempfile.TemporaryDirectory() as tmp:
    for row in measure(counts, args, Path(tmp)): print(json.dumps(row), flush=True); rows.append(row)
  single = next((r for r in rows if r["mode"] == "single"), None)
  summary: dict = {"mode": "summary", "model": args.model, "nodes": counts, **({"context": args.context} if args.context else {})}
  if single: summary["sampled_vs_greedy_1"] = round(single["sampled_decode_tok_s"] / single["decode_tok_s"], 3)
  for r in rows:
    if r["mode"] == "pipeline" and single:
      summary[f"pipeline_vs_single_{r['nodes']}"] = round(r["decode_tok_s"] / single["decode_tok_s"], 3)
      summary[f"prefill_vs_single_{r['nodes']}"] = round(r["prefill_tok_s"] / single["prefill_tok_s"], 3)
      # each token crosses `nodes` hops (nodes-1 forward, one back to the coordinator): what the pipeline adds, per hop
      summary[f"hop_ms_{r['nodes']}"] = round(1000 * (1 / r["decode_tok_s"] - 1 / single["decode_tok_s"]) / r["nodes"], 3)
    if r["mode"] == "concurrent": summary[f"concurrent_{r['concurrency']}_vs_one_{r['nodes']}"] = r["aggregate_vs_one_stream"]
  for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms"): summary[k] = single[k] if single else None
  summary["device"], summary["threads"] = rows[0]["device"], args.threads
  print(json.dumps(summary), flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [summary]))
  print(f"wrote {args.out / 'bench.jsonl'} and {write_chart(rows, summary, args.out / 'bench.png')}", file=sys.stderr)


if __name__ == "__main__": sys.exit(main())
