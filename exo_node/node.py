"""A node: its engine, gRPC server, peers and coordinator, wired together. Holds no request logic itself."""
from __future__ import annotations
import asyncio, logging, time
from typing import AsyncIterator
from pathlib import Path
from exo_node import __version__, device
from exo_node.config import NodeConfig
from exo_node.api.server import API
from exo_node.discovery import Discovery
from exo_node.discovery.mdns import MDNSDiscovery
from exo_node.discovery.static import StaticDiscovery
from exo_node.engine import Engine
from exo_node.errors import ExoError
from exo_node.model.loader import layer_nbytes, load_shard, open_tokenizer, open_weights
from exo_node.model.registry import MODELS
from exo_node.orchestrator import Orchestrator
from exo_node.prompt import check_prompt, generate, prompt_ids
from exo_node.stage import Stage, sampling_from_proto
from exo_node.topology import PartitionError, Plan, PeerInfo, partition
from exo_node.transport.link import Channels
from exo_node.transport.pb import exo_node_pb2 as pb
from exo_node.transport.server import Servicer, start_server

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1


class Node:
  def __init__(self, cfg: NodeConfig):
    self.cfg = cfg
    self.weights = open_weights(cfg.model)
    self.model_id = cfg.model if cfg.model in MODELS else Path(cfg.model).name
    self.tokenizer = open_tokenizer(self.weights)
    self.engine = Engine(max_sessions=cfg.max_sessions, max_batch=cfg.max_batch, beam=cfg.beam)
    self.caps = self.engine.submit(lambda: device.capabilities(cfg.threads)).result()  # opened on the thread that will use it
    self.memory = cfg.memory or self.caps.memory_bytes
    self.device_label = self.caps.device if self.caps.name == self.caps.device or self.caps.name == "CPU" else f"{self.caps.device}: {self.caps.name}"
    self.channels = Channels(cfg.cluster_secret)
    self.stage = Stage(cfg.node_id, self.engine, self.channels, self.ensure_layers, self.weights.config.n_layers)
    self.orchestrator = Orchestrator(cfg.node_id, cfg.address, self.model_id, self.stage, self.plan,
                                     lambda: {cfg.node_id, *(p.node_id for p in self.discovery.peers())}, cfg.max_sessions)
    self.discovery: Discovery = Discovery()
    if cfg.discovery == "static": self.discovery = StaticDiscovery(cfg.peers, self.channels, self.model_id)
    elif cfg.discovery == "mdns":
      self.discovery = MDNSDiscovery(cfg.node_id, cfg.cluster, cfg.node_port, self.channels, self.info, PROTOCOL_VERSION,
                                     cfg.mdns_interface, cfg.advertise_host)
    self.server, self.api = None, None
    self.draining = False  # set at shutdown: new requests are refused, those in flight may finish
    self._load_lock = asyncio.Lock()
    self._discovering: asyncio.Future | None = None  # discovery.start(), under way while the first layers load

  @property
  def n_layers(self) -> int: return self.weights.config.n_layers

  def me(self) -> PeerInfo:
    return PeerInfo(self.cfg.node_id, self.cfg.address, self.memory, self.device_label, self.cfg.api_port)

  def plan(self) -> Plan:
    """Over this node and every live peer; deterministic, so every node computes the same one."""
    return partition([self.me(), *self.discovery.peers()], self.n_layers, layer_nbytes(self.weights))

  def info(self) -> pb.NodeInfo:
    m = self.engine.model
    return pb.NodeInfo(node_id=self.cfg.node_id, model_id=self.model_id, n_layers=self.n_layers,
                       start_layer=m.start if m else -1, end_layer=m.end if m else -1, device=self.device_label,
                       memory_bytes=self.memory, version=__version__, protocol_version=PROTOCOL_VERSION,
                       address=self.cfg.address, api_port=self.cfg.api_port, active_sessions=self.engine.n_sessions,
                       peers=sorted(p.node_id for p in self.discovery.peers()), plan=self._plan_or_empty(),
                       env=device.reported_env())

  def _plan_or_empty(self) -> list[pb.PlanEntry]:
    try: return self.plan().to_proto()
    except ExoError: return []

  async def serve_generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateReply]:
    if self.draining: raise ExoError(f"node {self.cfg.node_id} is shutting down")
    ids = check_prompt(self, list(req.prompt_ids)) if req.prompt_ids else prompt_ids(self, req.prompt, req.raw)
    async for tok, text in generate(self, ids, sampling_from_proto(req.sampling)): yield pb.GenerateReply(ids=[] if tok is None else [tok], text=text)

  async def ensure_layers(self, start: int, end: int) -> None:
    async with self._load_lock:
      m = self.engine.model
      if m is not None and (m.start, m.end) == (start, end): return
      log.info("loading layers [%d, %d) of %s on %s", start, end, self.model_id, self.caps.device)
      await asyncio.wrap_future(self.engine.load(lambda: load_shard(self.weights, start, end, max_context=self.cfg.max_context)))
      if self.cfg.warm: await asyncio.wrap_future(self.engine.warm())
    if self._discovering is not None: await self._discovering  # re-advertise only what was advertised
    await self.discovery.changed()

  async def start(self) -> None:
    if self.cfg.node_port:
      self.server, _ = await start_server(Servicer(self.stage, self.info, self.serve_generate), self.cfg.host, self.cfg.node_port,
                                          self.cfg.cluster_secret)
      log.info("node %s serving gRPC on %s:%d", self.cfg.node_id, self.cfg.host, self.cfg.node_port)
    if self.cfg.api_port:
      self.api = API(self)
      await self.api.start(self.cfg.host, self.cfg.api_port)
    # mDNS spends ~2 s checking and probing the node's name and finds no peer before: unless told to wait for peers,
    # the plan is this node's alone either way, so its layers load meanwhile (a one-shot run: 10.3 -> 8.8 s)
    self._discovering = asyncio.ensure_future(self.discovery.start())
    if self.cfg.wait_for_peers or self.discovery.peers_at_start: await self._discovering
    await self.wait_for_peers(self.cfg.wait_for_peers)
    try: shard = self.plan().shard_of(self.cfg.node_id)
    except PartitionError as e:  # keep serving: the API answers 503 until the cluster can hold the model
      await self._discovering
      log.warning("no layers loaded: %s", e); return
    load = asyncio.ensure_future(self.ensure_layers(shard.start, shard.end))
    try: await self._discovering
    except BaseException:  # a node id already taken: the error is the last word, after the engine's own lines
      load.cancel()
      await asyncio.wrap_future(self.engine.submit(lambda: None))
      raise
    await load

  async def wait_for_peers(self, n: int) -> None:
    deadline = time.monotonic() + self.cfg.peer_timeout
    while len(peers := self.discovery.peers()) < n:
      if time.monotonic() > deadline:
        missing = sorted(set(self.cfg.peers) - {p.address for p in peers})
        raise ExoError(f"waited {self.cfg.peer_timeout:.0f}s for {n} peers, found {len(peers)}"
                       + (f"; not reachable: {', '.join(missing)}" if missing else ""))
      await asyncio.sleep(0.2)

  async def stop(self, drain: float = 0.0) -> None:
    """Refuse new requests, give those in flight up to `drain` seconds, then close; the mDNS goodbye comes last."""
    self.draining, deadline = True, time.monotonic() + drain
    busy = lambda: self.orchestrator.active + len(self.stage.requests)  # coordinated here, or passing through
    while busy() and time.monotonic() < deadline: await asyncio.sleep(0.05)
    if busy(): log.warning("stopping with %d request(s) unfinished after %.0fs", busy(), drain)
    if self.api is not None: await self.api.stop()
    await self.discovery.stop()
    if self.server is not None: await self.server.stop(grace=1.0)
    await self.channels.close()
