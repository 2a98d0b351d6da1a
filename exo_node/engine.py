"""The engine owns tinygrad: one worker thread runs every model call (tinygrad is not thread-safe), with a
KV cache per request, TinyJit for decode and fixed-size chunked prefill, and an LRU cap on sessions."""
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


class EngineError(ExoError):
  """A request the engine refuses: out-of-order position, context overflow, unknown session."""


@dataclass
class Session:
  kv: Tensor
  pos: int = 0


class Engine:
  def __init__(self, load: Callable[[], ShardModel], max_sessions: int = 16, chunk: int = 32):
    """`load` runs on the engine thread too: tinygrad's compile cache may only be used from one thread."""
    self._pool = ThreadPoolExecutor(1, thread_name_prefix="engine")
    self.model, self.max_sessions, self.chunk = self.submit(load).result(), max_sessions, chunk
    model = self.model
    self.sessions: OrderedDict[str, Session] = OrderedDict()
    self._lock = threading.Lock()
    self._decode, self._prefill = TinyJit(self._step), TinyJit(self._step)
    self._vpos = UOp.variable("start_pos", 0, model.max_context - 1)
    self._vn = UOp.variable("n", 1, chunk)

  def _step(self, x: Tensor, kv: Tensor, start_pos: UOp, n: UOp | int) -> Tensor:
    return self.model(x, kv, start_pos, n).realize()

  def submit(self, fn: Callable[[], R]) -> Future[R]:
    return self._pool.submit(fn)

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
        while len(self.sessions) >= self.max_sessions:
          evicted, _ = self.sessions.popitem(last=False)
          log.warning("session cap %d reached: evicted %s", self.max_sessions, evicted)
        s = self.sessions[request_id] = Session(self.model.new_cache(pad=self.chunk))
      self.sessions.move_to_end(request_id)
      return s

  def _forward(self, request_id: str, start_pos: int, data: np.ndarray) -> np.ndarray:
    m, T = self.model, len(data)
    if T == 0: raise EngineError("empty input")
    if start_pos + T > m.max_context: raise EngineError(f"context overflow: {start_pos + T} tokens > max context {m.max_context}")
    s = self._session(request_id, start_pos)
    if start_pos != s.pos: raise EngineError(f"position {start_pos} out of order for {request_id!r} (expected {s.pos})")
    x = m.embed_tokens(data) if m.is_first else data.astype(np.float32, copy=False)
    outs = []
    for i in range(0, T, self.chunk if T > 1 else 1):
      part = x[i:i + self.chunk] if T > 1 else x
      pos = self._vpos.bind(start_pos + i)
      if T == 1: out = self._decode(Tensor(part[None]), s.kv, pos, 1)
      else:
        padded = np.zeros((self.chunk, x.shape[1]), np.float32); padded[:len(part)] = part
        out = self._prefill(Tensor(padded[None]), s.kv, pos, self._vn.bind(len(part)))
      outs.append(out.numpy()[0] if m.is_last else out.numpy()[0, :len(part)])
    s.pos = start_pos + T
    return outs[-1] if m.is_last else np.concatenate(outs)
