"""Prompts of several positions: fixed-size prefill steps, one at a time, in slices that let other requests' steps
in between."""
from __future__ import annotations
import time
import numpy as np
from tinygrad import Tensor
from exo_node.device import is_cpu
from exo_node.engine.steps import TINYGRAD, EngineError, Prompt

# the most a prompt holds the engine while other requests' steps wait (Engine._prefill). A 1024-token prompt arriving
# beside one stream on a CPU: the stream's longest gap 1.68 s -> 0.14 s, the prompt's first token 1.70 -> 1.9 s (at
# 0.05 s: 0.09 s and 2.1 s; after each step: 0.05 s and 2.35 s)
PROMPT_SLICE_S = 0.1


def prefill_chunks(device: str) -> tuple[int, ...]:
  """Prompt positions per prefill step: the sizes a prompt's steps may take (Engine._chunk_size). On a CPU a step
  costs what its rows cost, padding included: 5 tokens take 10.9 ms in one 8-row step against 19.0 in a 16-row one,
  64 tokens 79 ms in 16-row steps against 88 in 8-row ones (SmolLM2, 2 cores)."""
  return (8, 16) if is_cpu(device) else (16,)


class Prefill:
  """Engine's prompts, apart so they read on their own: a part of Engine (core.py), on its state and lock."""

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
        more, waiting = bool(self._prompts), TINYGRAD._work_queue.qsize() > 0  # any job: a lone request's steps skip _jobs
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
