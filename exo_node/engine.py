"""The engine owns tinygrad: one worker thread runs every model call (tinygrad is not thread-safe), with a
KV cache per request, TinyJit for decode and fixed-size chunked prefill, and a cap on sessions."""
from __future__ import annotations
import logging, threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar
import numpy as np
from tinygrad import Tensor, TinyJit, UOp
from exo_node.errors import ExoError
from exo_node.model.llama import ShardModel

log = logging.getLogger(__name__)
R = TypeVar("R")
# every Engine in a process shares this thread: tinygrad is not thread-safe and its compile cache (sqlite)
# may only be used from the thread that opened it
_TINYGRAD = ThreadPoolExecutor(1, thread_name_prefix="tinygrad")


class EngineError(ExoError):
  """A request the engine refuses: out-of-order position, context overflow, unknown session."""


class SessionLimitError(EngineError):
  """Every KV session slot is taken: try again later (RESOURCE_EXHAUSTED), the request itself is fine."""


@dataclass
class Session:
  kv: list[Tensor]
  pos: int = 0


class Engine:
  def __init__(self, load: Callable[[], ShardModel] | None = None, max_sessions: int = 16, chunk: int = 16):
    self.max_sessions, self.chunk = max_sessions, chunk
    self.model: ShardModel | None = None
    self.sessions: OrderedDict[str, Session] = OrderedDict()
    self._lock = threading.Lock()
    if load is not None: self.load(load).result()

  def load(self, load: Callable[[], ShardModel]) -> Future[ShardModel]:
    """Runs `load` on the engine thread (tinygrad's compile cache may only be used from one thread) and swaps
    the model in; sessions of the old model are dropped."""
    def swap() -> ShardModel:
      self.model = None
      with self._lock: self.sessions.clear()
      model = load()
      self._decode, self._prefill = TinyJit(self._step), TinyJit(self._step)
      # capture on the first call: weights and inputs are realized up front, so TinyJit's eager warm-up call would
      # only repeat the scheduling (~7 s for 30 blocks on a 2-core CPU) before the capture does it again
      self._decode.cnt = self._prefill.cnt = 1
      self._vpos, self._vn = UOp.variable("start_pos", 0, model.max_context - 1), UOp.variable("n", 1, self.chunk)
      self.model = model
      return model
    return self.submit(swap)

  def _step(self, x: Tensor, start_pos: UOp, n: UOp | int, *kv: Tensor) -> Tensor:
    return self.model(x, list(kv), start_pos, n).realize()

  def submit(self, fn: Callable[[], R]) -> Future[R]:
    return _TINYGRAD.submit(fn)

  def forward(self, request_id: str, start_pos: int, data: np.ndarray) -> Future[np.ndarray]:
    """data: token ids (T,) on the first shard, else a hidden state (T, dim). Returns the hidden state (T, dim)
    or, on the last shard, the last position's logits (vocab,)."""
    return self.submit(lambda: self._forward(request_id, start_pos, data))

  def free(self, request_id: str) -> None:
    with self._lock: self.sessions.pop(request_id, None)

  @property
  def n_sessions(self) -> int: return len(self.sessions)

  def _session(self, request_id: str, start_pos: int) -> Session:
    with self._lock:
      s = self.sessions.get(request_id)
      if s is None:
        if start_pos != 0: raise EngineError(f"unknown session {request_id!r} at position {start_pos}")
        if len(self.sessions) >= self.max_sessions:  # refused, never evicted: an evicted session is a broken request
          raise SessionLimitError(f"this node holds its limit of {self.max_sessions} KV sessions (--max-sessions)")
        s = self.sessions[request_id] = Session(self.model.new_cache(pad=self.chunk))
      self.sessions.move_to_end(request_id)
      return s

  def _forward(self, request_id: str, start_pos: int, data: np.ndarray) -> np.ndarray:
    m, T = self.model, len(data)
    if m is None: raise EngineError("no model loaded")
    if T == 0: raise EngineError("empty input")
    if start_pos + T > m.max_context: raise EngineError(f"context overflow: {start_pos + T} tokens > max context {m.max_context}")
    s = self._session(request_id, start_pos)
    if start_pos != s.pos: raise EngineError(f"position {start_pos} out of order for {request_id!r} (expected {s.pos})")
    x = m.embed_tokens(data) if m.is_first else data.astype(np.float32, copy=False)
    outs = []
    for i in range(0, T, self.chunk if T > 1 else 1):
      part = x[i:i + self.chunk] if T > 1 else x
      pos = self._vpos.bind(start_pos + i)
      if T == 1: out = self._decode(Tensor(part[None]), pos, 1, *s.kv)
      else:
        padded = np.zeros((self.chunk, x.shape[1]), np.float32); padded[:len(part)] = part
        out = self._prefill(Tensor(padded[None]), pos, self._vn.bind(len(part)), *s.kv)
      outs.append(out.numpy()[0] if m.is_last else out.numpy()[0, :len(part)])
    s.pos = start_pos + T
    return outs[-1] if m.is_last else np.concatenate(outs)
