"""Static peers (--peers HOST:PORT,...), for networks without multicast: probed with the node-info call."""
from __future__ import annotations
import asyncio, logging
import grpc
from exo_node.discovery import Discovery, peer_from_info, probe
from exo_node.topology import PeerInfo
from exo_node.transport.link import Channels

log = logging.getLogger(__name__)


class StaticDiscovery(Discovery):
  def __init__(self, addresses: list[str], channels: Channels, model_id: str, interval: float = 0.5):
    super().__init__()
    self.addresses, self.channels, self.model_id, self.interval = addresses, channels, model_id, interval
    self._peers: dict[str, PeerInfo] = {}
    self._refused: set[str] = set()  # peers that refused our cluster proof, logged once
    self._task: asyncio.Task | None = None

  async def start(self) -> None:
    await self._poll_once()
    self._task = asyncio.ensure_future(self._poll())

  async def stop(self) -> None:
    if self._task: self._task.cancel()

  def peers(self) -> list[PeerInfo]: return list(self._peers.values())

  async def _poll(self) -> None:
    while True:
      await asyncio.sleep(self.interval)
      await self._poll_once()

  async def _poll_once(self) -> None:
    async def one(addr: str) -> None:
      try: info = await probe(self.channels, addr, self.rtt)
      except grpc.aio.AioRpcError as e:
        if self._peers.pop(addr, None): log.warning("peer %s is gone", addr)
        if e.code() != grpc.StatusCode.UNAUTHENTICATED: self._refused.discard(addr)
        elif addr not in self._refused: self._refused.add(addr); log.warning("peer %s refused us: %s", addr, e.details())
        return
      if info.model_id != self.model_id:
        log.warning("peer %s serves model %s, not %s: ignored", addr, info.model_id, self.model_id); return
      if addr not in self._peers: log.info("peer %s (%s) is up", info.node_id, addr)
      self._peers[addr] = peer_from_info(info, addr)
    await asyncio.gather(*(one(a) for a in self.addresses))
