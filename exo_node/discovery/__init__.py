"""Peer discovery: implementations keep a live set of peers (static list, mDNS) behind one interface."""
from __future__ import annotations
import logging, time
from exo_node.topology import PeerInfo
from exo_node.transport.link import Channels
from exo_node.transport.pb import exo_node_pb2 as pb

log = logging.getLogger(__name__)


class Discovery:
  """Base: peers() is the current set of healthy, compatible peers (not including this node)."""
  peers_at_start = True  # start() returns with the peers it found
  def __init__(self): self.rtt: dict[str, float] = {}  # node id -> seconds of the last probe round trip
  async def start(self) -> None: ...
  async def stop(self) -> None: ...
  async def changed(self) -> None:
    """This node's state changed (layers loaded): re-advertise where the implementation advertises."""
  def peers(self) -> list[PeerInfo]: return []


async def probe(channels: Channels, address: str, rtt: dict[str, float] | None = None, timeout: float = 1.0) -> pb.NodeInfo:
  """Node-info call with a deadline, recording its round trip; raises grpc.aio.AioRpcError when the peer is down."""
  t0 = time.monotonic()
  info = await channels.stub(address).Info(pb.InfoRequest(), timeout=timeout)
  if rtt is not None: rtt[info.node_id] = time.monotonic() - t0
  return info


def peer_from_info(info: pb.NodeInfo, address: str) -> PeerInfo:
  return PeerInfo(node_id=info.node_id, address=address, memory_bytes=info.memory_bytes, device=info.device, api_port=info.api_port)
