"""Which nodes run where: hosts, GPUs, ranks and ports, decided once before anything starts."""
from __future__ import annotations
import ctypes, re, shutil, socket, subprocess
from dataclasses import dataclass, field
from pathlib import Path
from exo_node.errors import ExoError

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}


@dataclass
class Host:
  name: str
  gpus: list[int] = field(default_factory=list)
  cpu_nodes: int = 0
  base_port: int | None = None  # per-host overrides of the launcher's --base-port/--api-port
  api_port: int | None = None

  @property
  def local(self) -> bool: return self.name in LOCAL_NAMES


@dataclass(frozen=True)
class NodeSpec:
  rank: int
  local_rank: int
  group_rank: int  # index of the host, as torchrun's GROUP_RANK
  host: Host
  gpu: int | None
  port: int
  api_port: int

  @property
  def node_id(self) -> str: return f"node-{self.rank}"


def detect_gpus() -> list[int]:
  """Physical GPU indices: nvidia-smi when present, else the CUDA driver's device count."""
  if smi := shutil.which("nvidia-smi"):
    try: out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired): out = ""
    if found := [int(m) for m in re.findall(r"^GPU (\d+):", out, re.M)]: return found
  try:
    cuda, n = ctypes.CDLL("libcuda.so.1"), ctypes.c_int()
    if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0: return list(range(n.value))
  except OSError: pass
  return []


def parse_gpus(text: str, available: list[int]) -> list[int]:
  if not available: raise ExoError(f"--gpus {text}: no NVIDIA GPU found on this machine (no nvidia-smi, no CUDA driver); use --cpu-nodes N")
  if text == "all": return available
  try: gpus = [int(g) for g in text.split(",") if g.strip()]
  except ValueError: raise ExoError(f"--gpus {text!r}: expected 'all' or a list like 0,1") from None
  if missing := [g for g in gpus if g not in available]:
    raise ExoError(f"--gpus {text}: GPU {','.join(map(str, missing))} not present (found {','.join(map(str, available))})")
  if len(set(gpus)) != len(gpus): raise ExoError(f"--gpus {text}: a GPU is listed twice")
  return gpus


def parse_hosts(path: Path) -> list[Host]:
  """Lines of `HOST [gpus=0,1] [cpu-nodes=N] [base-port=P] [api-port=P]`; # starts a comment."""
  try: lines = path.read_text().splitlines()
  except OSError as e: raise ExoError(f"--hosts {path}: {e.strerror}") from None
  hosts = []
  for n, line in enumerate(lines, 1):
    name, *opts = line.split("#", 1)[0].split() or [""]
    if not name: continue
    host = Host(name)
    for opt in opts:
      key, _, value = opt.partition("=")
      try:
        if key == "gpus": host.gpus = [int(g) for g in value.split(",")]
        elif key == "cpu-nodes": host.cpu_nodes = int(value)
        elif key in ("base-port", "api-port"): setattr(host, key.replace("-", "_"), int(value))
        else: raise ValueError
      except ValueError: raise ExoError(f"--hosts {path}:{n}: cannot read {opt!r}; expected gpus=0,1, cpu-nodes=N, base-port=P or api-port=P") from None
    if not host.gpus and host.cpu_nodes <= 0: raise ExoError(f"--hosts {path}:{n}: {name} runs no node; add gpus=… or cpu-nodes=N")
    hosts.append(host)
  if not hosts: raise ExoError(f"--hosts {path}: no hosts listed")
  return hosts


def assign(hosts: list[Host], base_port: int, api_port: int) -> list[NodeSpec]:
  """Ranks in host order, GPUs first; ports count up per host from the base ports (an API port of 0 stays 0)."""
  specs: list[NodeSpec] = []
  for g, host in enumerate(hosts):
    port, api = host.base_port or base_port, host.api_port or api_port
    for local_rank, gpu in enumerate([*host.gpus, *[None] * host.cpu_nodes]):
      specs.append(NodeSpec(len(specs), local_rank, g, host, gpu, port + local_rank, api + local_rank if api else 0))
  return specs


def world_env(spec: NodeSpec, specs: list[NodeSpec]) -> dict[str, str]:
  """torchrun's variables; rank 0 is the coordinator's node and its gRPC port is MASTER_PORT."""
  master = specs[0]
  all_local = all(s.host.local for s in specs)
  master_addr = "127.0.0.1" if all_local else (socket.getfqdn() if master.host.local else master.host.name)
  env = {"RANK": spec.rank, "LOCAL_RANK": spec.local_rank, "WORLD_SIZE": len(specs), "GROUP_RANK": spec.group_rank,
         "LOCAL_WORLD_SIZE": sum(s.host is spec.host for s in specs), "MASTER_ADDR": master_addr, "MASTER_PORT": master.port}
  if spec.gpu is not None: env |= {"CUDA_VISIBLE_DEVICES": spec.gpu, "DEV": "CUDA"}
  return {k: str(v) for k, v in env.items()}


def peer_address(spec: NodeSpec, specs: list[NodeSpec]) -> str:
  return f"{'127.0.0.1' if all(s.host.local for s in specs) else spec.host.name}:{spec.port}"
