"""A lone request's next pass launched before its input arrives, behind a gate (model/gate.py): in a pipeline while
the other nodes work, on one node behind the pass that runs."""
from __future__ import annotations
import asyncio
from concurrent.futures import Future
import numpy as np
from tinygrad import Tensor
from exo_node.engine.steps import TINYGRAD, Decode, replay
from exo_node.model import gate

AHEAD_WAIT_S = 0.002  # the most a pass launched ahead waits to go in after the last (_launch_ahead)


class Ahead:
  """Engine's passes launched ahead, apart so they read on their own: a part of Engine (core.py), on its state and lock."""

  def _capture_beside(self, busy: gate.Held | None) -> str:
    """The one-row decode capture that busy, a pass whose output is not read yet, does not replay: a replay of
    its capture would overwrite that output, and behind a running pass it would wait for it (_launch_behind)."""
    decode = self._jits.get(("decode", 1, 1))
    return "twin" if busy is not None and decode is not None and busy.inp is self._inputs.get(decode) else "decode"

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
      TINYGRAD.submit(self._collect, held, d, True)
      return d.result
    def ready() -> None:
      if not gate.ended(held): return
      loop.remove_reader(gate.fd())
      # the next launch is queued behind the hand-on's send: woken first, the engine thread took the GIL from it
      if self._ended(held, d): loop.call_soon(TINYGRAD.submit, self._launch_ahead, d.request_id)
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
