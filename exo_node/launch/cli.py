"""`exo-cluster` (also scripts/launch_cluster.py): argument parsing and the bring-up sequence. Arguments after `--`
go to every exo-node unchanged."""
from __future__ import annotations
import argparse, os, signal, sys
from pathlib import Path
from exo_node.errors import ExoError
from exo_node.launch.env import SECRET_ENV, inherited, masked, parse_assignment
from exo_node.launch.spec import Host, NodeSpec, assign, detect_gpus, parse_gpus, parse_hosts, peer_address, world_env
from exo_node.launch.supervisor import Child, Supervisor, say


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="exo-cluster", usage="exo-cluster [options] [-- exo-node options]",
                              description="Start one exo-node per GPU (or CPU slot), wait until they form one cluster, supervise them.")
  a = p.add_argument
  a("--gpus", default=None, help="'all' or a list like 0,1: one node per GPU, each with its own CUDA_VISIBLE_DEVICES")
  a("--cpu-nodes", type=int, default=0, help="this many CPU nodes (besides any GPU nodes)")
  a("--hosts", type=Path, default=None, help="file of lines 'HOST [gpus=0,1] [cpu-nodes=N]'; other hosts start over ssh")
  a("--ssh-command", default="ssh -tt -o BatchMode=yes", help="how to reach other hosts; gets HOST and the command")
  a("--remote-exo-node", default=f"{sys.executable} -m exo_node", help="the exo-node command on other hosts")
  a("--base-port", type=int, default=8001, help="gRPC port of each host's first node; the next ones count up")
  a("--api-port", type=int, default=52415, help="HTTP API port of each host's first node; the next ones count up")
  a("--model", default="smollm2-135m")
  a("--cluster", default="default")
  a("--discovery", choices=("mdns", "static"), default="mdns", help="static: every node gets the others as --peers")
  a("--cluster-secret", default=None, help=f"handed to every node explicitly (default: ${SECRET_ENV})")
  a("--pass-env", action="append", default=[], metavar="NAME", help="hand down this secret-looking variable anyway")
  a("--env", action="append", default=[], metavar="NAME=VALUE", help="set for every node")
  a("--node-env", action="append", default=[], metavar="RANK:NAME=VALUE", help="set for one node; wins over --env")
  a("--print-env", action="store_true", help="show what each node would get (secrets masked) and exit")
  a("--log-dir", type=Path, default=Path("logs"))
  a("--timeout", type=float, default=600.0, help="seconds to wait for the cluster to form")
  a("--restart", choices=("no", "on-failure"), default="no")
  a("--max-restarts", type=int, default=3)
  a("--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL (nodes drain for up to 10 s)")
  return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
  return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def hosts_of(a: argparse.Namespace) -> list[Host]:
  if a.hosts is not None:
    if a.gpus or a.cpu_nodes: raise ExoError("--hosts lists the nodes of every host: drop --gpus/--cpu-nodes")
    return parse_hosts(a.hosts)
  gpus = parse_gpus(a.gpus, detect_gpus()) if a.gpus else []
  if not gpus and a.cpu_nodes <= 0: raise ExoError("nothing to start: give --gpus, --cpu-nodes N or --hosts FILE")
  return [Host("localhost", gpus, a.cpu_nodes)]


def node_envs(a: argparse.Namespace, specs: list[NodeSpec]) -> list[dict[str, str]]:
  """Inherited (secrets filtered) < ranks and GPU < --env < --node-env; the cluster secret is set explicitly."""
  common = dict(parse_assignment(e, "--env") for e in a.env)
  per_node: dict[int, dict[str, str]] = {}
  for e in a.node_env:
    rank, colon, assignment = e.partition(":")
    if not colon or not rank.isdigit() or int(rank) >= len(specs): raise ExoError(f"--node-env {e!r}: expected RANK:NAME=VALUE with RANK < {len(specs)}")
    name, value = parse_assignment(assignment, "--node-env")
    per_node.setdefault(int(rank), {})[name] = value
  base = inherited(os.environ, set(a.pass_env))
  secret = a.cluster_secret or os.environ.get(SECRET_ENV)
  return [{**base, **world_env(s, specs), **common, **per_node.get(s.rank, {}), **({SECRET_ENV: secret} if secret else {})}
          for s in specs]


def node_argv(a: argparse.Namespace, spec: NodeSpec, specs: list[NodeSpec], extra: list[str]) -> list[str]:
  exe = [sys.executable, "-m", "exo_node"] if spec.host.local else a.remote_exo_node.split()
  args = ["--node-id", spec.node_id, "--node-port", str(spec.port), "--api-port", str(spec.api_port),
          "--model", a.model, "--cluster", a.cluster, "--wait-for-peers", str(len(specs) - 1)]
  if a.discovery == "static": args += ["--peers", ",".join(peer_address(s, specs) for s in specs if s is not spec)]
  return [*exe, *args, *extra]


def print_env(specs: list[NodeSpec], envs: list[dict[str, str]], argvs: list[list[str]]) -> None:
  for s, env, argv in zip(specs, envs, argvs):
    print(f"{s.node_id}  rank {s.rank}  host {s.host.name}  gpu {'-' if s.gpu is None else s.gpu}\n  $ {' '.join(argv)}")
    for k, v in sorted(masked(env).items()): print(f"  {k}={v}")


def print_table(view: dict, url: str) -> None:
  ranges = {s["node_id"]: f"[{s['start']}, {s['end']})" for s in view["plan"]}
  rows = [(n["id"], n["address"], n["device"], f"{n['memory_bytes'] / 2**30:.1f} GiB", ranges.get(n["id"], "-")) for n in view["nodes"]]
  widths = [max(len(r[i]) for r in [("node", "address", "device", "memory", "layers"), *rows]) for i in range(5)]
  for r in [("node", "address", "device", "memory", "layers"), *sorted(rows)]: print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
  print(f"\nready: {view['model']} on {len(rows)} nodes\nAPI:      {url}/v1\nweb chat: {url}/\nCtrl-C stops the cluster.", flush=True)


def run(argv: list[str]) -> int:
  own, extra = split_argv(argv)
  a = parser().parse_args(own)
  if a.api_port == 0: raise ExoError("--api-port 0: the launcher reads readiness from rank 0's API; give it a port")
  try:
    specs = assign(hosts_of(a), a.base_port, a.api_port)
    envs = node_envs(a, specs)
  except ValueError as e: raise ExoError(str(e)) from None
  argvs = [node_argv(a, s, specs, extra) for s in specs]
  if a.print_env: print_env(specs, envs, argvs); return 0
  a.log_dir.mkdir(parents=True, exist_ok=True)
  ssh = a.ssh_command.split()
  sup = Supervisor([Child(s, argv, env, a.log_dir / f"{s.node_id}.log", ssh) for s, argv, env in zip(specs, argvs, envs)],
                   a.restart, a.max_restarts, a.grace)
  for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, lambda *_: sup.stopping.set())
  say(f"starting {len(specs)} nodes ({', '.join(f'{s.node_id}@{s.host.name}' + ('' if s.gpu is None else f':gpu{s.gpu}') for s in specs)}); logs in {a.log_dir}/")
  try:
    sup.start()
    view = sup.wait_ready(a.timeout)
    if view is None: return 0 if sup.stopping.is_set() else 1
    print_table(view, sup.api_url())
    return sup.watch()
  finally:
    say("stopping every node"); sup.stop(); say("stopped")


def main(argv: list[str] | None = None) -> None:
  try: code = run(sys.argv[1:] if argv is None else argv)
  except ExoError as e: print(f"exo-cluster: error: {e}", file=sys.stderr); code = 2
  sys.exit(code)


if __name__ == "__main__": main()
