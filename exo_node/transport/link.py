"""Outbound streams: one long-lived Forward stream per (request, next hop), reused for every step."""
from __future__ import annotations
import asyncio, logging
from typing import Callable
import grpc
from exo_node.transport.auth import client_interceptors
from exo_node.transport.pb import exo_node_pb2 as pb, exo_node_pb2_grpc as pbg

log = logging.getLogger(__name__)
MAX_MESSAGE = 256 * 1024 * 1024  # a prefill chunk of an 8B model's hidden state is ~0.5 MB; leave ample room
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
                   ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                   # a peer that restarts is reachable again within a second, not after gRPC's default backoff (up to 120 s)
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


class Channels:
  """One channel per peer address, shared by every stream to it."""
  def __init__(self, secret: str | None = None):
    self._channels: dict[str, grpc.aio.Channel] = {}
    self._interceptors = client_interceptors(secret)

  def channel(self, address: str) -> grpc.aio.Channel:
    if address not in self._channels:
      self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=self._interceptors)
    return self._channels[address]

  def stub(self, address: str) -> pbg.ExoNodeStub: return pbg.ExoNodeStub(self.channel(address))

  async def close(self) -> None:
    for ch in self._channels.values(): await ch.close()
    self._channels.clear()


class Link:
  """Sends frames to one peer over a Forward stream. The first frame is the request's Header. A stream error
  (peer gone, frame refused) is reported once through on_error."""

  def __init__(self, channels: Channels, address: str, header: pb.Header, on_error: Callable[[str], None]):
    self.address, self._q = address, asyncio.Queue()
    self._q.put_nowait(pb.Frame(header=header))
    self._call = channels.stub(address).Forward(self._frames())
    self._watch = asyncio.ensure_future(self._responses(on_error))
    self.closed = False

  async def _frames(self):
    while (frame := await self._q.get()) is not None: yield frame

  async def _responses(self, on_error: Callable[[str], None]) -> None:
    try:
      async for _ in self._call: pass
    except asyncio.CancelledError: pass
    except grpc.aio.AioRpcError as e:
      if not self.closed: on_error(f"{self.address}: {e.code().name}: {e.details()}")

  def send(self, frame: pb.Frame) -> None:
    if not self.closed: self._q.put_nowait(frame)

  def close(self, reason: str | None = None) -> None:
    """End the stream; with a reason, tell the peer first so it frees the request's KV session."""
    if self.closed: return
    if reason is not None: self._q.put_nowait(pb.Frame(end=pb.End(reason=reason)))
    self._q.put_nowait(None)
    self.closed = True
