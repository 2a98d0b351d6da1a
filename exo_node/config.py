"""NodeConfig: every knob of one node, from CLI flags with EXO_* environment fallbacks."""
from __future__ import annotations
import os, socket
from dataclasses import dataclass, field


@dataclass
class NodeConfig:
  node_id: str = ""
  host: str = "0.0.0.0"
  node_port: int = 8001
  api_port: int = 52415
  advertise_host: str = ""  # the address peers dial; defaults to the host, or 127.0.0.1 when bound to all
  model: str = "smollm2-135m"
  device: str | None = None
  gpu: int | None = None
  memory: int | None = None
  discovery: str = "mdns"
  peers: list[str] = field(default_factory=list)
  cluster: str = "default"
  mdns_interface: str | None = None
  wait_for_peers: int = 0
  peer_timeout: float = 300.0
  cluster_secret: str | None = None
  api_key: str | None = None
  max_context: int = 4096
  max_sessions: int = 16
  max_batch: int = 8
  warm: bool = False  # capture every decode batch size at load, not at first use
  drain_timeout: float = 10.0
  beam: int = 0
  threads: int = 0  # CPU threads for a node's kernels (0: its share of the host's cores, cpu_threads.default_threads)
  # one-shot generation
  prompt: str | None = None
  raw: bool = False
  max_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None

  def __post_init__(self):
    if not self.node_id: self.node_id = f"{socket.gethostname()}-{self.node_port}"  # stable and unique per host:port
    if self.cluster_secret is None: self.cluster_secret = os.environ.get("EXO_CLUSTER_SECRET") or None
    if self.api_key is None: self.api_key = os.environ.get("EXO_API_KEY") or None
    if not self.advertise_host:
      if self.host not in ("0.0.0.0", "::", ""): self.advertise_host = self.host
      elif self.discovery == "mdns":
        from exo_node.discovery.mdns import local_ipv4
        self.advertise_host = self.mdns_interface or local_ipv4()
      else: self.advertise_host = "127.0.0.1"

  @property
  def address(self) -> str: return f"{self.advertise_host}:{self.node_port}"
