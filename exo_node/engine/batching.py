"""Single-token steps of different requests, gathered into one forward pass: the weights stream once for all of
them."""
from __future__ import annotations
import time
from concurrent.futures import Future
import numpy as np
from exo_node.engine.steps import TINYGRAD, Decode, Session
from exo_node.model import gate

GATHER_S = 0.005  # the steps of one batch come back within ~0.5 ms of each other per request (2-core CPU)


class Batching:
  """Engine's decode passes, apart so they read on their own: a part of Engine (core.py), on its state and lock."""

  def _enqueue(self, step: Decode) -> Future:
    with self._lock:
      self._decodes.append(step)
      self._lock.notify()
      if len(self._decodes) == 1: TINYGRAD.submit(self._drain)
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
      if held is not None and self._decodes: TINYGRAD.submit(self._drain)
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
      if self._decodes: TINYGRAD.submit(self._drain)
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
