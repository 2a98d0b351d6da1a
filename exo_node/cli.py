"""`exo-node`: argument parsing only. Builds a NodeConfig, binds the device before tinygrad is imported,
then runs the node. Errors the user can act on print one line and exit 2."""
from __future__ import annotations
import argparse, asyncio, logging, os, signal, sys
from exo_node.config import NodeConfig
from exo_node.errors import ExoError

log = logging.getLogger("exo_node")


def parse(argv: list[str] | None = None) -> NodeConfig:
  p = argparse.ArgumentParser(prog="exo-node", description="One node of a peer-to-peer LLM inference cluster.")
  a = p.add_argument
  a("--node-id", default="", help="unique id in the cluster (default: hostname-port)")
  a("--node-port", type=int, default=8001, help="gRPC port")
  a("--host", default="0.0.0.0", help="address to listen on")
  a("--advertise-host", default="", help="address peers should dial (default: --host, or 127.0.0.1)")
  a("--api-port", type=int, default=52415, help="HTTP API port, 0 disables it")
  a("--model", default=os.environ.get("EXO_MODEL", "smollm2-135m"), help="GGUF file, HF safetensors folder or registered name")
  a("--gpu", type=int, default=None, help="bind to this GPU (sets CUDA_VISIBLE_DEVICES, selects CUDA)")
  a("--device", default=None, help="tinygrad backend, e.g. CPU or CUDA (default: what tinygrad finds)")
  a("--memory", type=int, default=None, help="memory in bytes to report, overriding the detected value")
  a("--discovery", choices=("mdns", "static", "none"), default="mdns")
  a("--peers", default="", help="static peers: HOST:PORT,...")
  a("--cluster", default="default")
  a("--mdns-interface", default=None, help="restrict mDNS to this interface address")
  a("--wait-for-peers", type=int, default=0, help="wait for N peers before loading and serving")
  a("--peer-timeout", type=float, default=300.0, help="seconds to wait for --wait-for-peers before giving up")
  a("--cluster-secret", default=None, help="shared secret every gRPC call proves with an HMAC (or EXO_CLUSTER_SECRET)")
  a("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the HTTP API (or EXO_API_KEY)")
  a("--max-context", type=int, default=4096)
  a("--max-sessions", type=int, default=16, help="KV sessions per node, and requests a coordinator runs at once (more wait)")
  a("--max-batch", type=int, default=8, choices=(1, 2, 4, 8, 16), help="decode steps of concurrent requests that share one forward pass")
  a("--warm", action="store_true", help="capture the prefill steps and every decode batch size up to --max-batch before serving (no first-use stalls; on a CPU it adds the 16-position prefill step)")
  a("--drain-timeout", type=float, default=10.0, help="at SIGTERM, seconds that running requests get to finish")
  a("--threads", type=int, default=int(os.environ.get("EXO_THREADS") or 0),
    help="CPU threads for the kernels (or EXO_THREADS; default 0: this host's cores / LOCAL_WORLD_SIZE)")
  a("--beam", type=int, default=0, help="tinygrad BEAM search width for the decode steps' kernels (cached across runs)")
  a("--prompt", default=None, help="generate once through the cluster, print the completion and exit")
  a("--raw", action="store_true", help="no chat template: plain completion")
  a("--max-tokens", type=int, default=256)
  a("--temperature", type=float, default=0.0, help="0 means greedy")
  a("--top-k", type=int, default=0)
  a("--top-p", type=float, default=1.0)
  a("--seed", type=int, default=None)
  a("-v", "--verbose", action="store_true")
  ns = p.parse_args(argv)
  if ns.threads < 0: p.error("--threads must be 0 (every core) or more")
  if ns.discovery == "static" and not ns.peers: p.error("--discovery static needs --peers HOST:PORT,...")
  peers = [x.strip() for x in ns.peers.split(",") if x.strip()]
  if ns.peers and ns.discovery == "mdns": ns.discovery = "static"
  return NodeConfig(**{k: v for k, v in vars(ns).items() if k not in ("peers", "verbose")}, peers=peers)


async def run(cfg: NodeConfig) -> int:
  from exo_node.node import Node
  from exo_node.prompt import generate_text
  node = Node(cfg)
  try:
    await node.start()
    if cfg.prompt is not None:
      async for text in generate_text(node, cfg): sys.stdout.write(text); sys.stdout.flush()
      sys.stdout.write("\n")
      return 0
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM): asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    log.info("node %s ready", cfg.node_id)
    await stop.wait()
    log.info("node %s stopping: draining for up to %.0fs", cfg.node_id, cfg.drain_timeout)
    await node.stop(cfg.drain_timeout)
    return 0
  finally:
    if not node.draining: await node.stop()


def main(argv: list[str] | None = None) -> None:
  cfg = parse(argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  try:
    from exo_node import device
    device.bind(cfg.gpu, cfg.device)
    code = asyncio.run(run(cfg))
  except ExoError as e:
    print(f"exo-node: error: {e}", file=sys.stderr); code = 2
  except KeyboardInterrupt: code = 130
  os._exit(code) if code == 0 else sys.exit(code)
