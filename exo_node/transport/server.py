"""The gRPC servicer: validates every frame, then hands it to the Stage (or, for a request this node
coordinates, delivers the returned token). A bad frame gets INVALID_ARGUMENT and ends only its own stream."""
from __future__ import annotations
import asyncio, logging
from typing import AsyncIterator, Callable
import grpc
from grpc_health.v1 import health, health_pb2_grpc
from exo_node.engine import EngineError, SessionLimitError
from exo_node.errors import ExoError
from exo_node.prompt import PromptError
from exo_node.stage import Stage, StageError
from exo_node.transport.auth import ServerAuth
from exo_node.transport.codec import FrameError, decode_tensor, decode_tokens
from exo_node.transport.link import CHANNEL_OPTIONS
from exo_node.transport.pb import exo_node_pb2 as pb, exo_node_pb2_grpc as pbg

log = logging.getLogger(__name__)


class Servicer(pbg.ExoNodeServicer):
  def __init__(self, stage: Stage, info: Callable[[], pb.NodeInfo], generate: Callable[[pb.GenerateRequest], AsyncIterator[pb.GenerateReply]]):
    self.stage, self.info, self.generate = stage, info, generate

  async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
    return self.info()

  async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
    try:
      async for reply in self.generate(request): yield reply
    except ExoError as e: await context.abort(grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, PromptError) else grpc.StatusCode.UNAVAILABLE, str(e))

  async def Forward(self, frames, context: grpc.aio.ServicerContext):
    rid: str | None = None
    returning = False  # a stream of sampled tokens coming back to the coordinator
    expected = 0
    failed: asyncio.Future | None = None  # set by the Stage when a later hop of this request fails
    handler = asyncio.current_task()
    try:
      async for frame in frames:
        kind = frame.WhichOneof("kind")
        if kind == "header":
          if rid is not None: raise StageError("a stream carries one request: second header")
          rid, h = frame.header.request_id, frame.header
          if h.to_coordinator:
            if rid not in self.stage.deliver: raise StageError(f"tokens for request {rid!r}, which this node does not coordinate")
            returning = True
          else:
            failed = (await self.stage.open(h)).failed
            failed.add_done_callback(lambda _: handler.cancel())  # wakes this handler wherever it waits
        elif kind == "step":
          if rid is None: raise StageError("step before header: unknown request")
          s = frame.step
          if returning:
            if s.step != expected: raise StageError(f"request {rid!r}: token step {s.step} out of order (expected {expected})")
            expected += 1
            ids = decode_tokens(s.tokens.ids, self._vocab()) if s.WhichOneof("payload") == "tokens" else None
            if ids is None or len(ids) != 1 or s.partial: raise StageError("a returned step carries exactly one token id, never in parts")
            deliver = self.stage.deliver.get(rid)
            if deliver is not None: deliver(s.step, int(ids[0]))
            continue
          data = self._payload(s)
          await self.stage.step(rid, s.step, s.position, data, s.partial)
        elif kind == "end":
          if rid is not None and not returning: self.stage.close(rid, frame.end.reason)
          return
        else: raise StageError("empty frame")
    except ExoError as e:
      self._drop(rid, returning)
      await context.abort(_status(e), str(e))
    except asyncio.CancelledError:
      if failed is None or not failed.done(): raise  # the call itself was cancelled
      self._drop(rid, returning)
      await context.abort(grpc.StatusCode.UNAVAILABLE, failed.result())
    finally:
      if rid is not None and not returning and rid in self.stage.requests: self.stage.close(rid, "stream ended")

  def _drop(self, rid: str | None, returning: bool) -> None:
    if rid is not None and not returning: self.stage.close(rid, "refused")

  def _vocab(self) -> int: return self.stage.engine.model.cfg.vocab_size if self.stage.engine.model else 0

  def _payload(self, s: pb.Step):
    m = self.stage.engine.model
    which = s.WhichOneof("payload")
    if s.position < 0 or s.position >= m.max_context: raise StageError(f"position {s.position} outside [0, {m.max_context})")
    if m.is_first:
      if which != "tokens": raise StageError("the first shard takes token ids, not a hidden state")
      return decode_tokens(s.tokens.ids, m.cfg.vocab_size)
    if which != "hidden": raise StageError("this shard takes a hidden state, not token ids")
    a = decode_tensor(s.hidden, hidden_size=m.cfg.dim, max_elements=m.max_context * m.cfg.dim)
    if a.ndim != 2: raise StageError(f"a hidden state is (tokens, {m.cfg.dim}), not {list(a.shape)}")
    return a


def _status(e: ExoError) -> grpc.StatusCode:
  if isinstance(e, SessionLimitError): return grpc.StatusCode.RESOURCE_EXHAUSTED
  if isinstance(e, (StageError, FrameError, EngineError)): return grpc.StatusCode.INVALID_ARGUMENT
  return grpc.StatusCode.FAILED_PRECONDITION  # e.g. this node cannot load the layers asked for


async def start_server(servicer: Servicer, host: str, port: int, secret: str | None = None) -> tuple[grpc.aio.Server, health.HealthServicer]:
  server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[ServerAuth(secret)] if secret else [])
  pbg.add_ExoNodeServicer_to_server(servicer, server)
  hs = health.aio.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(hs, server)
  if server.add_insecure_port(f"{host}:{port}") == 0: raise ExoError(f"cannot listen on {host}:{port} (port in use?)")
  await server.start()
  return server, hs
