"""The engine owns tinygrad: one worker thread runs every model call (tinygrad is not thread-safe), with a
KV cache per request (capped), and one TinyJit capture per step size, replayed from its own input buffer."""
from __future__ import annotations
import gc, logging, threading, time
from contextlib import nullcontext
from collections import Counter, deque
from concurrent.futures import Future
from typing import Callable, TypeVar
import numpy as np
from tinygrad import Tensor, TinyJit, UOp
from tinygrad.helpers import Context
from exo_node.device import expect_done
from exo_node.engine.ahead import AHEAD_WAIT_S, Ahead
from exo_node.engine.batching import GATHER_S, Batching
from exo_node.engine.prefill import Prefill, prefill_chunks
from exo_node.engine.steps import TINYGRAD, Decode, EngineError, Prompt, Session, SessionLimitError, replay
from exo_node.model import gate, host_io, program_cache
from exo_node.model.llama import Row, ShardModel

log = logging.getLogger(__name__)
R = TypeVar("R")


def _freeze_heap() -> None:
  """What a load or a capture made (millions of tinygrad objects, long-lived) leaves the cyclic GC's view: a full
  collection over it stalled every thread of a node for 250-370 ms a few seconds after it was ready, which cost
  one run in ~14 half its speed (3 nodes, 2-core CPU). Collected first, so no garbage of the moment stays."""
  gc.collect()
  gc.freeze()


class Engine(Prefill, Batching, Ahead):
  def __init__(self, load: Callable[[], ShardModel] | None = None, max_sessions: int = 16, chunks: tuple[int, ...] | None = None,
               max_batch: int = 8, gather_s: float = GATHER_S, beam: int = 0):
    """chunks: the sizes of prefill steps, in prompt positions (default: prefill_chunks of the model's device).
    beam: tinygrad's BEAM width for the kernels of decode steps, searched as each is captured (see _run)."""
    self.max_sessions, self.max_batch, self.gather_s, self.beam = max_sessions, max_batch, gather_s, beam
    self._chunks, self.chunks, self.chunk = chunks, (), 0  # set with the model; chunk: the largest
    self.model: ShardModel | None = None
    self.sessions: dict[str, Session] = {}
    self._spare: list[list[Tensor]] = []  # caches of ended requests, for the next ones: a new cache costs ~12 ms on a CPU
    self._decodes: list[Decode] = []  # single-token steps waiting to share the next forward pass
    self._prompts: deque[Prompt] = deque()  # prompts not done yet, oldest first; its head runs a step at a time
    self._in_pass = False  # a decode pass is running
    self._opened: gate.Held | None = None  # a pass launched ahead, opened by its step's caller, until read (_start_ahead)
    self._jobs = 0  # submitted and not started: a pass launched ahead would hold them up
    self._done_at, self._gap = 0.0, AHEAD_WAIT_S * 2  # when the last pass ended; from then to its request's next step
    self.decode_steps: Counter[int] = Counter()  # forward passes by batch size, for /metrics
    self.steps_ahead = 0  # of them, passes launched ahead of their input (_launch_ahead, _launch_behind), for /metrics
    self._lock = threading.Condition()  # guards sessions and the queue; notified when a step joins the queue
    self._mates: dict[str, frozenset[str]] = {}  # request -> the requests of the last pass it ran in
    self._deferred: list[Callable[[], None]] = []  # see defer
    if load is not None: self.load(load).result()

  def load(self, load: Callable[[], ShardModel]) -> Future[ShardModel]:
    """Runs `load` on the engine thread (tinygrad's compile cache may only be used from one thread) and swaps
    the model in; sessions of the old model are dropped."""
    def swap() -> ShardModel:
      self.model = None
      gc.unfreeze()  # the old model's objects may be collected now
      with self._lock: self.sessions.clear(); self._spare.clear()
      program_cache.load()
      model = load()
      self.chunks = tuple(sorted(self._chunks or prefill_chunks(model.device)))
      self.chunk = self.chunks[-1]
      self._jits: dict[tuple[str, int, int], TinyJit] = {}
      self._inputs: dict[TinyJit, Tensor] = {}
      # a step's time from launch to result (moving average) by capture and reach (512 positions apart), for expect_done
      self._took: dict[tuple[TinyJit, int], float] = {}
      self._vpos = [UOp.variable(f"start_pos{b}", 0, model.max_context - 1) for b in range(self.max_batch)]
      self._vn = UOp.variable("n", 1, self.chunk)
      # a decode step's last attended position, its span less one: tinygrad's CUDA graph builds its nodes with every
      # variable at 0, and a kernel whose grid is the span got an empty grid there (CUDA Error 1, invalid argument)
      self._vlast = UOp.variable("last", 0, model.max_context - 1)
      self.model = model
      _freeze_heap()
      return model
    return self.submit(swap)

  def warm(self) -> Future[None]:
    """Captures the prefill steps and a decode pass of every power-of-two batch up to max_batch now, on caches of no
    request (they become spares): the first use of each size would otherwise stall every stream for the capture."""
    def run() -> None:
      m, sizes = self.model, [1 << i for i in range(self.max_batch.bit_length())]
      caches = [m.new_cache(pad=self.chunk) for _ in range(self.max_batch)]
      for c in self.chunks: self._chunk_pass(np.zeros((c, m.cfg.dim), np.float32), 0, caches[0], c)
      for b in sizes: self._decode_pass(np.zeros((b, 1, m.cfg.dim), np.float32), [0] * b, caches[:b])
      with self._lock: self._spare.extend(caches)
    return self.submit(run)

  def _jit(self, kind: str, rows: int, positions: int) -> TinyJit:
    """One capture per (prefill|decode, rows, positions). It captures on its first call: weights and inputs are
    realized up front, so TinyJit's eager warm-up call would only repeat the scheduling (~7 s for 30 blocks on a
    2-core CPU)."""
    if (jit := self._jits.get((kind, rows, positions))) is None:
      log.info("capturing the %s step of %d x %d positions: once per size, seconds on a CPU", kind, rows, positions)
      jit = self._jits[(kind, rows, positions)] = TinyJit(self._step)
      jit.cnt = 1
    return jit

  def _run(self, kind: str, reach: int, x: np.ndarray, *args: UOp | Tensor | int | None) -> np.ndarray:
    """One captured step: x goes into the step's own input buffer, the result comes out of its output buffer.
    reach: the furthest position it attends to, which its time grows with."""
    jit = self._jit(kind, *x.shape[:2])
    if (inp := self._inputs.get(jit)) is None: inp = self._inputs[jit] = Tensor.empty(*x.shape, device=self.model.device).realize()
    host_io.write(inp, x.astype(np.float32, copy=False))
    fresh, t0 = jit.captured is None, time.monotonic()
    # decode steps set the speed of a stream: their kernels are searched (~90 s for a 1B shape on an H100: 73 -> 299
    # tok/s), prefill's keep tinygrad's heuristics (searching its 16-row kernels took minutes more)
    with Context(BEAM=self.beam) if fresh and kind != "prefill" and self.beam else nullcontext(): out = replay(jit, inp, *args)
    if fresh: program_cache.save(); _freeze_heap()
    self._run_deferred()
    if (took := self._took.get(key := (jit, reach >> 9))) is not None: expect_done(t0 + 0.8 * took)  # polls from 80% of it
    host = host_io.read(out)
    if not fresh: self._took[key] = time.monotonic() - t0 if took is None else 0.8 * took + 0.2 * (time.monotonic() - t0)
    return host

  def defer(self, fn: Callable[[], None]) -> None:
    """fn runs on the engine thread once the next pass is under way (its kernels launched), or, with no step
    waiting, after the current job. For work that wakes the event loop: woken before, the loop holds the GIL while
    the pass starts."""
    with self._lock:
      self._deferred.append(fn)
      ahead = self._opened is not None
      if not ahead and len(self._deferred) == 1 and not self._decodes: TINYGRAD.submit(self._run_deferred)
    if ahead: self._run_deferred()

  def _run_deferred(self) -> None:
    with self._lock: fns, self._deferred = self._deferred, []
    for fn in fns: fn()

  def _decode_pass(self, x: np.ndarray, starts: list[int], caches: list[list[Tensor]]) -> np.ndarray:
    """One decode pass: row b of x (B, 1, dim) at position starts[b] of caches[b], all over the longest span. The
    one-row pass's twin (_launch_behind) is captured with it: the same pass again, which rewrites the same entries.
    A one-row pass stays off the capture of a pass opened by its step's caller (_start_ahead): that pass's output
    waits in its capture's buffer until it is read, and the steps queued before its collection run first."""
    self.model.set_counts(starts)
    args = self._decode_args(starts, caches)
    reach = max(starts)
    if len(x) > 1 or not gate.supported(self.model.device): return self._run("decode", reach, x, *args)
    out = self._run(self._capture_beside(self._opened), reach, x, *args)
    if not self._can_launch("twin"): self._run("twin", reach, x, *args)
    return out

  def _decode_args(self, starts: list[int], caches: list[list[Tensor]]) -> tuple:
    return (1, self._vlast.bind(max(starts)), *(self._vpos[b].bind(p) for b, p in enumerate(starts)), *(t for kv in caches for t in kv))

  def _step(self, x: Tensor, n: UOp | int, last: UOp | None, *rest: UOp | Tensor) -> Tensor:
    """last: None for prefill, else the decode step's last attended position; rest: the B rows' bound start
    positions, then their KV buffers (B x blocks). TinyJit only binds variables passed as top-level arguments."""
    B = x.shape[0]
    kv, per = rest[B:], len(rest[B:]) // B
    rows = [Row(list(kv[b * per:(b + 1) * per]), rest[b]) for b in range(B)]
    # contiguous: the result is read raw from its buffer, which a view of it would not be
    return self.model(x, rows, n, None if last is None else last + 1).contiguous().realize()

  def submit(self, fn: Callable[[], R]) -> Future[R]:
    """fn runs on the engine thread, once a pass launched ahead has been let go (_launch_ahead): it holds the device."""
    def run() -> R:
      with self._lock: self._jobs -= 1
      gate.release()
      return fn()
    with self._lock:
      self._jobs += 1
      self._lock.notify()
    return TINYGRAD.submit(run)

  def forward(self, request_id: str, start_pos: int, data: np.ndarray, stages: int = 1, last: bool = False) -> Future[np.ndarray]:
    """data: token ids (T,) on the first shard, else a hidden state (T, dim). Returns the hidden state (T, dim)
    or, on the last shard, the last position's logits (vocab,). Single-token steps of different requests that
    wait at the same time run as one batch: the weights stream once for all of them; so do the positions of short
    prompts while other requests are in flight (_prompt_rows). stages: the shards of the request's pipeline; last:
    no step of the request follows this one."""
    if len(data) == 1:
      self._gap = time.monotonic() - self._done_at
      d = Decode(request_id, start_pos, data, Future(), stages, last)
      return self._enqueue(d) if (held := self._take(d)) is None else self._start_ahead(held, d)
    with self._lock:
      if stages == 1 and len(data) <= self.chunks[0] and (self._prompts or self._decodes or self._in_pass):
        return self._prompt_rows(request_id, start_pos, data, stages)
      self._prompts.append(p := Prompt(request_id, start_pos, data, Future()))
      first = len(self._prompts) == 1
    if first: self.submit(self._prefill)
    return p.result

  def free(self, request_id: str) -> None:
    """The cache goes to the spares: what it holds stays finite, and a new request only attends to its own positions
    (the rest is masked). Only the engine thread takes spares, so a step still running on this one ends first."""
    gate.release(self, request_id)
    with self._lock:
      if (s := self.sessions.pop(request_id, None)) is not None: self._spare.append(s.kv)
      self._mates.pop(request_id, None)

  @property
  def n_sessions(self) -> int: return len(self.sessions)

  def _session(self, request_id: str, start_pos: int, T: int) -> Session:
    m = self.model
    if m is None: raise EngineError("no model loaded")
    if T == 0: raise EngineError("empty input")
    if start_pos + T > m.max_context: raise EngineError(f"context overflow: {start_pos + T} tokens > max context {m.max_context}")
    with self._lock:
      s = self.sessions.get(request_id)
      if s is None:
        if start_pos != 0: raise EngineError(f"unknown session {request_id!r} at position {start_pos}")
        if len(self.sessions) >= self.max_sessions:  # refused, never evicted: an evicted session is a broken request
          raise SessionLimitError(f"this node holds its limit of {self.max_sessions} KV sessions (--max-sessions)")
        s = self.sessions[request_id] = Session(self._spare.pop() if self._spare else m.new_cache(pad=self.chunk))
    if start_pos != s.pos: raise EngineError(f"position {start_pos} out of order for {request_id!r} (expected {s.pos})")
    return s

  def _input(self, data: np.ndarray) -> np.ndarray:
    return self.model.embed_tokens(data) if self.model.is_first else data.astype(np.float32, copy=False)


