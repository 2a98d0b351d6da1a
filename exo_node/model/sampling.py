"""Token sampling on the host from one row of logits: greedy at temperature 0, else temperature, top-k, top-p."""
from __future__ import annotations
from dataclasses import dataclass, field
import numpy as np


@dataclass
class SamplingParams:
  temperature: float = 0.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0
  seed: int | None = None
  max_tokens: int = 256


@dataclass
class Sampler:
  params: SamplingParams
  rng: np.random.Generator = field(init=False)

  def __post_init__(self): self.rng = np.random.default_rng(self.params.seed)

  def __call__(self, logits: np.ndarray) -> int:
    p = self.params
    if p.temperature <= 0: return int(np.argmax(logits))
    z = logits.astype(np.float64) / p.temperature
    order = np.argsort(-z, kind="stable")
    if p.top_k > 0: order = order[:p.top_k]
    probs = np.exp(z[order] - z[order[0]]); probs /= probs.sum()
    if p.top_p < 1.0: probs = probs[:max(1, int(np.searchsorted(np.cumsum(probs), p.top_p) + 1))]
    return int(order[self.rng.choice(len(probs), p=probs / probs.sum())])
