"""The CPU matrix kernel on packed weights against numpy: every row-block size, the shapes a step passes it (a batch of
rows, a prefill chunk, leading axes), and a result that is read raw from its buffer, as the engine reads a step's output."""
import numpy as np
import pytest
from tinygrad import Tensor
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
