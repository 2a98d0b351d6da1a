"""The sampler against plain definitions: a stable sort of the whole vocabulary for top-k and top-p, the softmax for
the frequencies. The sampler itself sorts only a few candidates (model/sampling.py)."""
import numpy as np
import pytest
from exo_node.model.sampling import BLOCK, Sampler, SamplingParams, draw, largest, nucleus


def tied(n: int, seed: int) -> np.ndarray:
  """Logits with many equal values, so the order of ties matters."""
  return np.random.default_rng(seed).integers(-20, 20, n).astype(np.float32) / 4


def ranked(z: np.ndarray) -> np.ndarray:
  return np.argsort(-z, kind="stable")


def weights(z: np.ndarray) -> np.ndarray: return np.exp(z - z.max())


@pytest.mark.parametrize("n", [7, 300, 5000])
def test_largest_keeps_the_k_largest_and_of_ties_the_lower_positions(n):
  for seed in range(5):
    z = tied(n, seed)
    for k in (1, 2, 5, n // 3, n - 1, n, n + 4):
      assert largest(z, k).tolist() == sorted(ranked(z)[:k].tolist()), (seed, k)


@pytest.mark.parametrize("n", [40, 3000, 20000])
def test_nucleus_is_the_shortest_prefix_of_the_sorted_probabilities_that_reaches_top_p(n):
  for seed in range(4):
    for scale in (0.05, 1.0, 4.0):  # nearly flat (the nucleus is most of the vocabulary) to peaked
      z = tied(n, seed) * scale
      w = weights(z)
      order = ranked(z)
      cum = np.cumsum(w[order] / w.sum(dtype=np.float64))
      for top_p in (0.0, 0.1, 0.5, 0.9, 0.99):
        expect = order[:np.searchsorted(cum, top_p) + 1]
        assert nucleus(z, w, top_p).tolist() == sorted(expect.tolist()), (seed, scale, top_p)


def test_a_draw_lands_where_u_falls_in_the_cumulative_weights_and_never_on_a_zero_weight():
  w = np.ones(3 * BLOCK + 17, np.float32)
  for u in np.linspace(0, 1, 997, endpoint=False): assert draw(w, u) == int(u * len(w))
  w[::3] = 0
  w[BLOCK:2 * BLOCK] = 0  # a whole block without weight
  got = [draw(w, u) for u in np.random.default_rng(0).random(4000)]
  assert all(w[i] > 0 for i in got)
  assert draw(w, np.nextafter(1.0, 0)) == np.flatnonzero(w)[-1]


CASES = [SamplingParams(1.0), SamplingParams(0.6), SamplingParams(1.3, top_k=3), SamplingParams(0.8, top_p=0.7),
         SamplingParams(1.0, top_k=4, top_p=0.8)]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("vocab", [6, 2 * BLOCK + 5])
def test_frequencies_follow_the_tempered_softmax_over_the_allowed_tokens(params, vocab):
  rng = np.random.default_rng(1)
  z = np.full(vocab, -30.0, np.float32)  # many unlikely tokens: the large vocabulary spans blocks
  hot = rng.choice(vocab, 6, replace=False)
  z[hot] = [2.0, 1.5, 1.0, 0.8, 0.0, -0.5]
  p = np.exp((z - z.max()) / params.temperature)
  p /= p.sum()
  allowed = ranked(z)[:params.top_k or vocab]
  q = p[allowed] / p[allowed].sum()
  if params.top_p < 1: allowed = allowed[:np.searchsorted(np.cumsum(q), params.top_p) + 1]
  expect = np.zeros(vocab)
  expect[allowed] = p[allowed] / p[allowed].sum()
  s, n = Sampler(SamplingParams(params.temperature, params.top_k, params.top_p, seed=3)), 20000
  counts = np.bincount([s(z) for _ in range(n)], minlength=vocab)
  assert set(np.flatnonzero(counts)) <= set(allowed.tolist())
  assert np.abs(counts / n - expect).max() < 0.015, (counts[hot] / n, expect[hot])


def test_greedy_takes_the_argmax_and_top_p_zero_or_top_k_one_do_too():
  z = np.random.default_rng(2).standard_normal(49152).astype(np.float32)
  best = int(np.argmax(z))
  for params in (SamplingParams(0.0, seed=1), SamplingParams(1.0, top_p=0.0), SamplingParams(2.0, top_k=1)):
    assert {Sampler(params)(z) for _ in range(20)} == {best}


def test_a_seed_gives_the_same_tokens_and_another_seed_other_ones():
  z = np.random.default_rng(4).standard_normal(49152).astype(np.float32) * 2
  def run(seed: int, **kw) -> list[int]:
    s = Sampler(SamplingParams(1.0, seed=seed, **kw))
    return [s(z) for _ in range(30)]
  for kw in ({}, {"top_k": 50}, {"top_p": 0.9}):
    assert run(7, **kw) == run(7, **kw)
    assert run(7, **kw) != run(8, **kw)
