"""The engine owns tinygrad: one worker thread runs every model call (tinygrad is not thread-safe), with a
KV cache per request, TinyJit for fixed-size chunked prefill and for decode steps batched across requests, and a
cap on sessions."""
from __future__ import annotations
import asyncio, gc, logging, threading, time
from contextlib import nullcontext
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar
import numpy as np
from tinygrad import Tensor, TinyJit, UOp
from tinygrad.helpers import Context
from exo_node.device import expect_done, is_cpu
from exo_node.errors import ExoError
from exo_node.model import gate, host_io, program_cache
from exo_node.model.llama import Row, ShardModel

log = logging.getLogger(__name__)
R = TypeVar("R")
# every Engine in a process shares this thread: tinygrad is not thread-safe and its compile cache (sqlite)
# may only be used from the thread that opened it
_TINYGRAD = ThreadPoolExecutor(1, thread_name_prefix="tinygrad")
GATHER_S = 0.005  # the steps of one batch come back within ~0.5 ms of each other per request (2-core CPU)
# the most a prompt holds the engine while other requests' steps wait (Engine._prefill). A 1024-token prompt arriving
# beside one stream on a CPU: the stream's longest gap 1.68 s -> 0.14 s, the prompt's first token 1.70 -> 1.9 s (at
# 0.05 s: 0.09 s and 2.1 s; after each step: 0.05 s and 2.35 s)
PROMPT_SLICE_S = 0.1
AHEAD_WAIT_S = 0.002  # the most a pass launched ahead waits to go in after the last (_launch_ahead)


def prefill_chunks(device: str) -> tuple[int, ...]:
  """Prompt positions per prefill step: the sizes a prompt's steps may take (Engine._chunk_size). On a CPU a step
  costs what its rows cost, padding included: 5 tokens take 10.9 ms in one 8-row step against 19.0 in a 16-row one,
  64 tokens 79 ms in 16-row steps against 88 in 8-row ones (SmolLM2, 2 cores)."""
  return (8, 16) if is_cpu(device) else (16,)


def _freeze_heap() -> None:
  """What a load or a capture made (millions of tinygrad objects, long-lived) leaves the cyclic GC's view: a full
  collection over it stalled every thread of a node for 250-370 ms a few seconds after it was ready, which cost
  one run in ~14 half its speed (3 nodes, 2-core CPU). Collected first, so no garbage of the moment stays."""
  gc.collect()
  gc.freeze()


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


class Engine:
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
      if not ahead and len(self._deferred) == 1 and not self._decodes: _TINYGRAD.submit(self._run_deferred)
    if ahead: self._run_deferred()

  def _run_deferred(self) -> None:
    with self._lock: fns, self._deferred = self._deferred, []
    for fn in fns: fn()

  def _chunk_size(self, n: int) -> int:
    """The smallest captured prefill step that holds n positions, else the largest. The first size is captured at
    first use, the others only by warm: on a CPU the 16-row step's capture stalls every request for seconds (SmolLM2:
    ~12 s, about half that with its programs on disk, model/program_cache.py)."""
    sizes = sorted({self.chunks[0], *(t for kind, _, t in self._jits if kind == "prefill")})
    return next((c for c in sizes if c >= n), sizes[-1])

  def _chunk_pass(self, x: np.ndarray, start: int, kv: list[Tensor], size: int) -> np.ndarray:
    """One prefill step: up to size positions x (T, dim) from position start, padded to size."""
    padded = np.zeros((size, x.shape[1]), np.float32); padded[:len(x)] = x
    self.model.set_counts([start + t for t in range(size)])  # position t attends through start + t
    return self._run("prefill", start + size, padded[None], self._vn.bind(len(x)), None, self._vpos[0].bind(start), *kv)

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

  def _capture_beside(self, busy: gate.Held | None) -> str:
    """The one-row decode capture that busy, a pass whose output is not read yet, does not replay: a replay of
    its capture would overwrite that output, and behind a running pass it would wait for it (_launch_behind)."""
    decode = self._jits.get(("decode", 1, 1))
    return "twin" if busy is not None and decode is not None and busy.inp is self._inputs.get(decode) else "decode"

  def _decode_args(self, starts: list[int], caches: list[list[Tensor]]) -> tuple:
    return (1, self._vlast.bind(max(starts)), *(self._vpos[b].bind(p) for b, p in enumerate(starts)), *(t for kv in caches for t in kv))

  def _launch_ahead(self, request_id: str) -> None:
    """After a pipeline step of the only request here, its next pass goes in behind a gate that the next frame's
    input opens (model/gate.py), so the launch overlaps the other nodes' work instead of following the frame. It
    first waits half the usual gap between a pass and the next step (at most AHEAD_WAIT_S): launched at once, it
    took the cores from this step's hand-on and the next node's start, and 2 nodes gained nothing. Waited for:
    82 -> 95 tok/s in alternating runs, 98-103 -> 107-110 in the bench (SmolLM2, 2 cores)."""
    if not self._can_launch(): return
    with self._lock:
      if not self._lone(request_id): return
      self._lock.wait(min(AHEAD_WAIT_S, self._gap / 2))  # a step or a job that arrives meanwhile wakes it
      if not self._lone(request_id): return
      s = self.sessions[request_id]
    self._launch(request_id, s.pos, s.kv)

  def _launch_behind(self, running: gate.Held, pos: int) -> None:
    """While a lone request's pass runs, its next pass goes in behind it, gated like a pass launched ahead: the
    launch (~0.5 ms on a CPU) and the wait for the end (polled, see device._quiet_cpu_waits) leave the path between
    two passes, which is now the sampling and the gate's wake-ups: 122 -> 135 tok/s on one node (SmolLM2, 2 cores,
    alternating runs). tinygrad fences each capture's replay on its previous run (its submit worker spins until
    then), so the next pass replays whichever of the one-row decode step and a second capture of it, the twin
    (_decode_pass), the running one does not."""
    with self._lock:
      if not (self._can_launch("twin") and self._lone(running.request_id) and pos < self.model.max_context): return
      kv = self.sessions[running.request_id].kv
    self._launch(running.request_id, pos, kv, behind=running)

  def _launch_lone(self, d: Decode) -> gate.Held | None:
    """A lone request's step that found no pass waiting for it goes through the gate too, so the next one can
    launch behind it (_collect)."""
    with self._lock:
      if not (self._can_launch("twin") and self._lone(d.request_id) and self.sessions[d.request_id].pos == d.start_pos): return None
      kv = self.sessions[d.request_id].kv
    self._launch(d.request_id, d.start_pos, kv)
    return gate.take(self, d.request_id, d.start_pos)

  def _take(self, d: Decode) -> gate.Held | None:
    """The pass launched ahead for d, if one waits (counted for /metrics)."""
    if (held := gate.take(self, d.request_id, d.start_pos)) is not None: self.steps_ahead += 1
    return held

  def _can_launch(self, kind: str = "decode") -> bool:
    jit = self._jits.get((kind, 1, 1))
    return jit is not None and jit.captured is not None and gate.supported(self.model.device)

  def _launch(self, request_id: str, pos: int, kv: list[Tensor], behind: gate.Held | None = None) -> None:
    """behind: the pass that still runs, if any."""
    m, jit = self.model, self._jits[(self._capture_beside(behind), 1, 1)]
    inp, writes = self._inputs[jit], [] if m.counts is None else [(m.counts, m.count_values([pos]))]
    gate.launch(self, request_id, pos, inp, lambda: replay(jit, inp, *self._decode_args([pos], [kv])), writes, behind is not None)

  def _lone(self, request_id: str) -> bool:
    """request_id is the only request here and nothing waits for the engine (with its lock held)."""
    s = self.sessions.get(request_id)
    return s is not None and len(self.sessions) == 1 and not (self._decodes or self._prompts or self._jobs) and s.pos < self.model.max_context

  def _start_ahead(self, held: gate.Held, d: Decode) -> Future:
    """A step whose pass waits launched (_launch_ahead) opens it on the caller's thread. On an event loop the loop
    also takes the result, woken by the pass's end (gate.fd): the engine thread's poll and its hand-off to the loop
    are off the path too. Elsewhere the engine thread waits for it."""
    with self._lock: self._opened = held
    try: self._open(held, d.data)
    except Exception as e:
      self._ended(held, d, e)
      return d.result
    try: loop = asyncio.get_running_loop()
    except RuntimeError:
      _TINYGRAD.submit(self._collect, held, d, True)
      return d.result
    def ready() -> None:
      if not gate.ended(held): return
      loop.remove_reader(gate.fd())
      # the next launch is queued behind the hand-on's send: woken first, the engine thread took the GIL from it
      if self._ended(held, d): loop.call_soon(_TINYGRAD.submit, self._launch_ahead, d.request_id)
    loop.add_reader(gate.fd(), ready)
    return d.result

  def _open(self, held: gate.Held, data: np.ndarray) -> None:
    try: x = self._input(data).astype(np.float32, copy=False)[None]
    except Exception:
      gate.drop(held)  # the device's queue must move on
      raise
    gate.run(held, x)

  def _collect(self, held: gate.Held, d: Decode, opened: bool = False) -> None:
    """On the engine thread: a step whose pass was launched ahead, opened first unless its caller has. A pipeline
    launches its next pass once this one has ended; a lone request, behind it while it runs."""
    try:
      if not opened: self._open(held, d.data)
    except Exception as e:
      self._ended(held, d, e)
      return
    error = None
    try:
      self._run_deferred()
      if d.stages == 1 and not d.last: self._launch_behind(held, d.start_pos + 1)
    except Exception as e: error = e
    gate.wait(held)
    if self._ended(held, d, error) and d.stages > 1: self._launch_ahead(d.request_id)

  def _ended(self, held: gate.Held, d: Decode, error: Exception | None = None) -> bool:
    """Settles a step whose pass launched ahead has run (or failed to open); whether it succeeded."""
    with self._lock: self._opened = None
    try:
      if error is not None: raise error
      out, s = gate.output(held), self._session(d.request_id, d.start_pos, 1)
    except Exception as e:
      d.result.set_exception(e)
      return False
    self._settle([(d, s)], out)
    return True

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
    return _TINYGRAD.submit(run)

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

  def _enqueue(self, step: Decode) -> Future:
    with self._lock:
      self._decodes.append(step)
      self._lock.notify()
      if len(self._decodes) == 1: _TINYGRAD.submit(self._drain)
    return step.result

  def _prompt_rows(self, request_id: str, start_pos: int, data: np.ndarray, stages: int) -> Future[np.ndarray]:
    """A short prompt while other requests' steps wait or run, or other prompts do: one position per pass, as a row
    of the passes they run anyway, not a pass of its own that stalls them all (8 prompts of 4 tokens at once on a
    CPU: one chunk, then 4 passes of 8 rows, ~65 ms, against 8 chunks one after another, ~100 ms). Idle sessions do
    not count: alone, one pass per position costs up to ~5x one chunk. Not in a pipeline: a pass there takes a share
    of the requests, and every shard would add the rows' wait (4 streams on 2 nodes: time to first token 42 -> 99
    ms). Same result as _prefill."""
    done, outs = Future(), []
    def step(i: int) -> None:
      self._enqueue(Decode(request_id, start_pos + i, data[i:i + 1], Future(), stages)).add_done_callback(lambda f: advance(i, f))
    def advance(i: int, f: Future) -> None:
      if (e := f.exception()) is not None: return done.set_exception(e)
      outs.append(f.result())
      if i + 1 < len(data): step(i + 1)
      else: done.set_result(outs[-1] if self.model.is_last else np.concatenate(outs))
    step(0)
    return done

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

  def _prefill(self) -> None:
    """Steps of the oldest prompts for up to PROMPT_SLICE_S while other work waits, then this job again behind it:
    the requests in flight get their steps between a long prompt's slices, not after all of it."""
    t0 = time.monotonic()
    while True:
      p = self._prompts[0]
      try: done = self._prefill_step(p)
      except Exception as e:
        done = True
        p.result.set_exception(e)
      with self._lock:
        if done: self._prompts.popleft()
        more, waiting = bool(self._prompts), _TINYGRAD._work_queue.qsize() > 0  # any job: a lone request's steps skip _jobs
      if done and not p.result.done(): p.result.set_result(p.outs[-1] if self.model.is_last else np.concatenate(p.outs))
      if not more: return
      if waiting and time.monotonic() - t0 >= PROMPT_SLICE_S: return self.submit(self._prefill)

  def _prefill_step(self, p: Prompt) -> bool:
    """Whether p is done. Its session is checked again at each step: freed in between, its cache went to the spares."""
    m, T = self.model, len(p.data)
    if p.session is None: p.session, p.x = self._session(p.request_id, p.start_pos, T), self._input(p.data)
    elif self.sessions.get(p.request_id) is not p.session: raise EngineError(f"request {p.request_id!r} ended during its prompt")
    s, i = p.session, p.done
    part = p.x[i:i + (size := self._chunk_size(T - i))]
    # a last position alone in its chunk runs as a one-row decode pass, not a chunk of padding: 5 tokens in ~45 ms
    # instead of ~60 on a CPU
    out = self._decode_pass(part[None], [p.start_pos + i], [s.kv]) if len(part) == 1 else self._chunk_pass(part, p.start_pos + i, s.kv, size)
    if m.is_last: p.outs = [out[0]]  # its result is the last position's logits: a long prompt keeps no others
    else: p.outs.append(out[0, :len(part)])
    p.done += len(part)
    if p.done == T: s.pos = p.start_pos + T
    return p.done == T

  def _rows(self, n: int) -> int:
    """Rows of a pass for n waiting steps: a size already captured, padded by at most n rows, else the largest power
    of two up to n. A capture stalls every request for seconds on a CPU; a padding row costs only its share of a pass."""
    captured = sorted(b for kind, b, _ in self._jits if kind == "decode")
    return next((b for b in captured if n <= b <= 2 * n), 1 << (n.bit_length() - 1)) if n else 0

  def _drain(self) -> None:
    try: self._next_pass()
    finally:
      with self._lock: idle = not self._decodes
      if idle: self._run_deferred()

  def _next_pass(self) -> None:
    """Takes the waiting single-token steps of distinct requests, as many as one pass takes (`_rows`). The oldest
    waiting step holds the pass for up to gather_s from its arrival while the other requests of its last pass come
    back: the steps of one pass return one after another, and without the wait the first would run alone and the
    rest form a second batch, the two apart for good. Only mates are waited for, so in a pipeline, where batches
    take turns on every shard, one batch never waits for another, which is still on another node. In a pipeline of
    S shards a pass takes at most 1/S of the requests here: S batches then take turns and every shard stays busy,
    where one batch of all of them would leave all shards but one idle (4 streams on 2 nodes: 75-101 tok/s, bimodal
    with how the requests first fell into batches, against 104-112 in two batches of 2)."""
    with self._lock:
      while True:
        if not self._decodes: return
        live = len(self.sessions.keys() | {d.request_id for d in self._decodes})  # a prompt's first row has no session yet
        cap = max(1, min(self.max_batch, -(-live // self._decodes[0].stages)))
        batch: list[Decode] = []
        for d in self._decodes:
          if len(batch) < cap and all(b.request_id != d.request_id for b in batch): batch.append(d)
        coming = {r for r in self._mates.get(batch[0].request_id, ()) if r in self.sessions} - {d.request_id for d in batch}
        if len(batch) == cap or not coming: break
        if (left := batch[0].at + self.gather_s - time.monotonic()) <= 0: break
        self._run_deferred()
        self._lock.wait(left)
      self._decodes = [d for d in self._decodes if d not in batch]
      held = self._take(batch[0]) if len(batch) == 1 else None
      if held is not None and self._decodes: _TINYGRAD.submit(self._drain)
    if held is not None: return self._collect(held, batch[0])
    gate.release()  # another step's pass (another engine's, or one this step did not take) would stop the queue
    if len(batch) == 1 and batch[0].stages == 1:
      try: held = self._launch_lone(batch[0])
      except Exception as e: return batch[0].result.set_exception(e)
      if held is not None: return self._collect(held, batch[0])
    admitted = []
    for d in batch:
      try: admitted.append((d, self._session(d.request_id, d.start_pos, 1)))
      except Exception as e: d.result.set_exception(e)
    rows = self._rows(len(admitted))
    with self._lock:  # the steps past the pass's rows go back to the front of the queue; padding rows borrow spare caches
      self._decodes[:0] = [d for d, _ in admitted[rows:]]
      if self._decodes: _TINYGRAD.submit(self._drain)
      admitted, pads = admitted[:rows], [self._spare.pop() for _ in range(min(len(self._spare), rows - len(admitted)))]
    if not admitted: return
    try:
      pads += [self.model.new_cache(pad=self.chunk) for _ in range(rows - len(admitted) - len(pads))]
      self._in_pass = True
      x = np.stack([self._input(d.data) for d, _ in admitted])
      x = np.concatenate([x, np.zeros((len(pads), *x.shape[1:]), x.dtype)])  # padding rows attend to their position 0
      out = self._decode_pass(x, [d.start_pos for d, _ in admitted] + [0] * len(pads), [s.kv for _, s in admitted] + pads)
    except Exception as e:
      for d, _ in admitted: d.result.set_exception(e)
      return
    finally:
      self._in_pass = False
      with self._lock: self._spare.extend(pads)
    self._finish(admitted, out)

  def _finish(self, admitted: list[tuple[Decode, Session]], out: np.ndarray) -> None:
    self._settle(admitted, out)
    if len(admitted) == 1 and admitted[0][0].stages > 1: self._launch_ahead(admitted[0][0].request_id)

  def _settle(self, admitted: list[tuple[Decode, Session]], out: np.ndarray) -> None:
    mates = frozenset(d.request_id for d, _ in admitted)
    with self._lock:
      self.decode_steps[len(admitted)] += 1
      self._mates.update((r, mates) for r in mates if r in self.sessions)  # not for one freed meanwhile
      self._done_at = time.monotonic()
      for d, s in admitted: s.pos = d.start_pos + 1
    for b, (d, _) in enumerate(admitted): d.result.set_result(out[b])
