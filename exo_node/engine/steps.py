"""What the engine runs: the steps requests hand it, the KV sessions they run in, and the one thread that runs them
all."""
from __future__ import annotations
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
import numpy as np
from tinygrad import Tensor, TinyJit, UOp
from exo_node.errors import ExoError

# every Engine in a process shares this thread: tinygrad is not thread-safe and its compile cache (sqlite)
# may only be used from the thread that opened it
TINYGRAD = ThreadPoolExecutor(1, thread_name_prefix="tinygrad")


def replay(jit: TinyJit, *args: Tensor | UOp | int | None) -> Tensor:
  """A captured step replays straight from its buffers and variables. TinyJit's own call rewrites every input's
  view graph to check it (~25 us each: 0.8 ms of a one-row decode step with 30 KV buffers, 2.5 ms at four rows);
  ours are always whole realized buffers in the captured order, and bound variables."""
  if jit.captured is None: return jit(*args)
  return jit.captured([a.uop.base for a in args if isinstance(a, Tensor)],
                      {v.expr: val for v, val in (a.unbind() for a in args if isinstance(a, UOp))})


class EngineError(ExoError):
  """A request the engine refuses: out-of-order position, context overflow, unknown session."""


class SessionLimitError(EngineError):
  """Every KV session slot is taken: try again later (RESOURCE_EXHAUSTED), the request itself is fine."""


@dataclass
class Session:
  kv: list[Tensor]
  pos: int = 0


@dataclass(eq=False)
class Prompt:
  """A prompt of several positions, run one prefill step at a time (Engine._prefill)."""
  request_id: str
  start_pos: int
  data: np.ndarray  # token ids, or a hidden state per position
  result: Future
  session: Session | None = None  # once its first step has checked it
  x: np.ndarray | None = None  # its input, embedded
  outs: list[np.ndarray] = field(default_factory=list)
  done: int = 0  # positions run


@dataclass(eq=False)
class Decode:
  request_id: str
  start_pos: int
  data: np.ndarray  # one token id, or one hidden-state row
  result: Future
  stages: int = 1  # shards in its request's plan
  last: bool = False  # no step of its request can follow: no pass goes in behind it
  at: float = field(default_factory=time.monotonic)  # when it arrived
