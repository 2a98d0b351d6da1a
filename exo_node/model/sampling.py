"""Token sampling on the host from one row of logits: greedy at temperature 0, else temperature, top-k, top-p.
Linear in the vocabulary: only the few candidates top-k and top-p keep are ever sorted. A stable sort of the whole
vocabulary took 5 ms a token for SmolLM2's 49k (about a CPU forward pass) and 14 ms for Llama 3's 128k (four of an
H100's 1B steps), and temperature 1.0 is the OpenAI API's default."""
from __future__ import annotations
from dataclasses import dataclass, field
import numpy as np

NUCLEUS_START = 64  # candidates of a first top-p guess; each miss takes 8x more
BLOCK = 1024  # a draw sums the weights by blocks of this many, then walks one block


@dataclass
class SamplingParams:
  temperature: float = 0.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0
  seed: int | None = None
  max_tokens: int = 256


def largest(z: np.ndarray, k: int) -> np.ndarray:
  """Positions of the k largest values of z, ascending; of equal values the lower positions rank first."""
  if k >= len(z): return np.arange(len(z))
  kth = np.partition(z, len(z) - k)[len(z) - k]
  keep = z > kth
  keep[np.flatnonzero(z == kth)[:k - int(keep.sum())]] = True
  return np.flatnonzero(keep)


def nucleus(z: np.ndarray, w: np.ndarray, top_p: float) -> np.ndarray:
  """Positions of the fewest most likely tokens whose weights w (exp(z - max)) reach top_p of the total, ranked as
  `largest` ranks them. Only a superset of them is sorted, and only its weights: how many tokens it takes does not
  depend on the order of equal ones. The nucleus is then taken from the superset, not from the whole vocabulary
  again (its positions are ascending, so ties still go to the lower ones)."""
  need, m = top_p * w.sum(dtype=np.float64), NUCLEUS_START
  while (top := largest(z, m)).size < len(z) and w[top].sum(dtype=np.float64) < need: m *= 8
  return top[largest(z[top], int(np.searchsorted(np.cumsum(np.sort(w[top])[::-1], dtype=np.float64), need)) + 1)]


def draw(w: np.ndarray, u: float) -> int:
  """The position whose share of the weights w holds u (in [0, 1)) of their cumulative sum. Block sums, then one
  block: a cumulative sum as long as the vocabulary cost ~0.4-0.9 ms at 128k (its fresh pages included)."""
  sums = np.cumsum(np.add.reduceat(w, np.arange(0, len(w), BLOCK), dtype=np.float64))
  b = min(int(np.searchsorted(sums, x := u * sums[-1], side="right")), len(sums) - 1)
  inner = np.cumsum(w[b * BLOCK:(b + 1) * BLOCK], dtype=np.float64)
  return b * BLOCK + min(int(np.searchsorted(inner, x - (sums[b - 1] if b else 0.0), side="right")), len(inner) - 1)


@dataclass
class Sampler:
  params: SamplingParams
  rng: np.random.Generator = field(init=False)

  def __post_init__(self): self.rng = np.random.default_rng(self.params.seed)

  def __call__(self, logits: np.ndarray) -> int:
    p = self.params
    if p.temperature <= 0: return int(np.argmax(logits))
    w = logits.astype(np.float32) * np.float32(1 / p.temperature)
    keep = largest(w, p.top_k) if 0 < p.top_k < len(w) else None
    if keep is not None: w = w[keep]
    z = w.copy() if p.top_p < 1.0 else None  # the ranking, for ties: weights can tie where logits do not
    w -= w.max()
    np.exp(w, out=w)
    if z is not None:
      at = nucleus(z, w, p.top_p)
      keep, w = at if keep is None else keep[at], w[at]
    i = draw(w, self.rng.random())
    return i if keep is None else int(keep[i])
