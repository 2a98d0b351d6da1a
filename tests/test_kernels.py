"""The CPU kernels against numpy. The matrix kernel on packed weights: every row-block size, the shapes a step passes
it (a batch of rows, a prefill chunk, leading axes), and a result read raw from its buffer, as the engine reads a
step's output. The attention kernels: each decode row's own cache and length, and a prefill chunk's positions over
their one cache."""
import numpy as np
import pytest
from tinygrad import Tensor, dtypes
from exo_node.engine import Engine
from exo_node.model import host_io, kernels

ENGINE = Engine()  # tinygrad runs on the engine's thread: its compile cache may only be used from the thread that opened it


SMALL = (6 * kernels.BLOCK, 100)
CASES = [(lead, *SMALL) for lead in [(1,), (2,), (3,), (4,), (5,), (6,), (8,), (12,), (4, 1), (1, 4), (2, 3)]] + [
  ((8,), kernels.BLOCK, 2048),  # one block longer than the prefetch distance (which reaches past every matrix's end)
  ((8,), 1024, 1536)]


@pytest.mark.parametrize("lead,N,K", CASES)
def test_matmul_t_matches_numpy_for_every_row_count(lead, N, K):
  rng = np.random.default_rng(sum(lead) + N)
  x, w = rng.standard_normal((*lead, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float16)
  def run() -> tuple[tuple, np.ndarray, np.ndarray]:
    assert kernels.packs(wt := Tensor(w))
    y = kernels.matmul_t(Tensor(x), kernels.pack(wt)).contiguous().realize()
    return y.shape, y.numpy(), host_io.read(y)
  shape, y, raw = ENGINE.submit(run).result()
  want = x @ w.astype(np.float32).T
  assert shape == (*lead, N)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(raw, want, rtol=1e-4, atol=2e-4)


def test_a_matrix_whose_rows_do_not_fill_whole_blocks_stays_unpacked_for_tinygrads_matmul():
  assert not ENGINE.submit(lambda: kernels.packs(Tensor.empty(kernels.BLOCK + 8, 64))).result()


@pytest.mark.parametrize("rows,span", [(1, 1), (1, 5), (2, 20), (3, 37), (8, 64), (8, 125)])
def test_decode_attention_matches_numpy_over_each_rows_own_cache_and_length(rows, span):
  """Scores, then softmax times values, against every row's own flat K|V cache over its own length: lengths that
  fill whole blocks of positions and ones that do not, up to the cache's end (P = span + PAD)."""
  n_kv, G, D = 3, 3, 64
  P = max(span, 64) + kernels.PAD
  rng = np.random.default_rng(rows * 1000 + span)
  q = rng.standard_normal((rows, n_kv * G, D)).astype(np.float32)
  caches = [rng.standard_normal(2 * n_kv * P * D).astype(np.float32) for _ in range(rows)]
  counts = np.array([span - (b % 3) * (span // 3) for b in range(rows)], np.int32)  # rows of different lengths
  def run() -> tuple[np.ndarray, np.ndarray]:
    c, flat = host_io.upload(counts, dtypes.int32, "CPU"), [Tensor(x) for x in caches]
    s = kernels.scores(Tensor(q), flat, c, n_kv).realize()
    return s.numpy(), kernels.attend(s, flat, c, n_kv).realize().numpy()
  scores, out = ENGINE.submit(run).result()
  for b, n in enumerate(counts):
    k, v = (np.repeat(caches[b][j * n_kv * P * D:(j + 1) * n_kv * P * D].reshape(n_kv, P, D)[:, :n], G, axis=0) for j in (0, 1))
    want = np.einsum("hd,hpd->hp", q[b], k) / np.sqrt(D)
    np.testing.assert_allclose(scores[b, :, :n], want, rtol=1e-4, atol=1e-4)
    w = np.exp(want - want.max(-1, keepdims=True))
    np.testing.assert_allclose(out[b], np.einsum("hp,hpd->hd", w / w.sum(-1, keepdims=True), v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,start", [(8, 0), (8, 13), (16, 0), (16, 37), (16, 100)])
def test_chunk_scores_match_numpy_for_each_position_over_its_own_length(T, start):
  """A prefill chunk's positions over one shared cache, position t over the first start + t + 1 cache positions."""
  n_kv, G, D = 3, 3, 64
  P = start + T + kernels.PAD
  rng = np.random.default_rng(T * 1000 + start)
  q = rng.standard_normal((T, n_kv * G, D)).astype(np.float32)
  cache = rng.standard_normal(2 * n_kv * P * D).astype(np.float32)
  counts = np.arange(start + 1, start + T + 1, dtype=np.int32)
  def run() -> np.ndarray:
    return kernels.chunk_scores(Tensor(q), Tensor(cache), host_io.upload(counts, dtypes.int32, "CPU"), n_kv).realize().numpy()
  got = ENGINE.submit(run).result()
  k = np.repeat(cache[:n_kv * P * D].reshape(n_kv, P, D), G, axis=0)
  for t, n in enumerate(counts):
    np.testing.assert_allclose(got[t, :, :n], np.einsum("hd,hpd->hp", q[t], k[:, :n]) / np.sqrt(D), rtol=1e-4, atol=1e-4)
