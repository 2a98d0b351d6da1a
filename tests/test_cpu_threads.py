"""Our CPU kernels split over the cores (cpu_threads.py): their outputs are the one-thread kernels', bit for bit, the
helper threads run parts of them, and a node's threads default to its share of the host's cores."""
import numpy as np
import pytest
from conftest import exo_node
from tinygrad import Tensor, UOp, dtypes
from exo_node import cpu_threads
from exo_node.errors import ExoError
from exo_node.engine import Engine
from exo_node.model import host_io, kernels

ENGINE = Engine()  # tinygrad runs on the engine's thread (its compile cache may only be used from one thread)


def product(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  return ENGINE.submit(lambda: kernels.matmul_t(Tensor(x), kernels.pack(Tensor(w))).numpy()).result()


@pytest.fixture(scope="module")
def two_threads():
  """Installed once tinygrad has run kernels, as in a process whose engine ran before (tinygrad's queue encoder then
  holds its matcher already)."""
  product(np.ones((1, 64), np.float32), np.ones((2 * kernels.BLOCK, 64), np.float16))
  ENGINE.submit(lambda: cpu_threads.install(2)).result()
  assert cpu_threads.parts() == 2


# 2 parts of 5 or 9 blocks: the last part takes the last block twice; 8 parts of 36 blocks (SmolLM2's 576 outputs):
# 8 parts of 5, the last part's 1 block 5 times; of 12: 6 parts of 2; of 5: 5 parts
@pytest.mark.parametrize("parts", [2, 8])
@pytest.mark.parametrize("rows,N,K", [(1, 6 * kernels.BLOCK, 100), (3, 9 * kernels.BLOCK, 100), (8, 36 * kernels.BLOCK, 576),
                                      (16, 12 * kernels.BLOCK, 576), (8, 5 * kernels.BLOCK, 64)])
def test_a_split_matrix_kernel_gives_the_one_thread_result_bit_for_bit(two_threads, monkeypatch, parts, rows, N, K):
  rng = np.random.default_rng(rows * N + K)
  x, w = rng.standard_normal((rows, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float16)
  monkeypatch.setattr(cpu_threads, "_parts", parts)  # parts beyond the threads: the worker and the helper take them all
  split = product(x, w)
  monkeypatch.setattr(cpu_threads, "_parts", 1)
  np.testing.assert_array_equal(split, product(x, w))
  np.testing.assert_allclose(split, x @ w.astype(np.float32).T, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("threads,units,parts,per", [(8, 36, 8, 5), (8, 12, 6, 2), (2, 3, 2, 2), (16, 3, 3, 1), (1, 36, 1, 36), (4, 96, 4, 24)])
def test_work_splits_into_whole_runs_of_units_whatever_the_thread_count(monkeypatch, threads, units, parts, per):
  """SmolLM2's 576 outputs (36 blocks) on 8 threads: 8 parts of 5 (a count of parts that divides 36, as before,
  left them on one thread); 3 KV heads on 16 threads: 3 parts."""
  monkeypatch.setattr(cpu_threads, "_parts", threads)
  part, got, unit = kernels.split(units)
  assert (1 if part is None else part.vmax + 1, got) == (parts, per)
  if part is not None:  # each unit is one part's alone (no two threads write it), and every unit is some part's
    i = UOp.range(per, 1)
    runs = [{unit(i).substitute({part: part.const_like(p), i: i.const_like(j)}).simplify().arg for j in range(per)} for p in range(parts)]
    assert sum(map(len, runs)) == units and set().union(*runs) == set(range(units))


def attention(q: np.ndarray, caches: list[np.ndarray], counts: np.ndarray, n_kv: int) -> tuple[np.ndarray, ...]:
  """Decode scores and attention output over each row's cache, and the scores of the rows as one prefill chunk over
  the first cache."""
  def run() -> tuple[np.ndarray, ...]:
    c, flat = host_io.upload(counts, dtypes.int32, "CPU"), [Tensor(x) for x in caches]
    s = kernels.scores(Tensor(q), flat, c, n_kv).realize()
    return s.numpy(), kernels.attend(s, flat, c, n_kv).numpy(), kernels.chunk_scores(Tensor(q), flat[0], c, n_kv).numpy()
  return ENGINE.submit(run).result()


# 3 heads over 2 parts: the second part takes the last head twice; 5 over 3: 3 parts of 2, likewise; 3 over 8: 3 of 1
@pytest.mark.parametrize("n_kv,parts", [(3, 2), (5, 3), (3, 8)])
def test_split_attention_kernels_give_the_one_thread_results_bit_for_bit(two_threads, monkeypatch, n_kv, parts):
  G, D, rows = 3, 64, 8
  rng = np.random.default_rng(n_kv)
  P = 80 + kernels.PAD
  q = rng.standard_normal((rows, n_kv * G, D)).astype(np.float32)
  caches = [rng.standard_normal(2 * n_kv * P * D).astype(np.float32) for _ in range(rows)]
  counts = np.array([60 + b for b in range(rows)], np.int32)
  monkeypatch.setattr(cpu_threads, "_parts", parts)
  split = attention(q, caches, counts, n_kv)
  monkeypatch.setattr(cpu_threads, "_parts", 1)
  one = attention(q, caches, counts, n_kv)
  for b, n in enumerate(counts):
    np.testing.assert_array_equal(split[0][b, :, :n], one[0][b, :, :n])
    np.testing.assert_array_equal(split[2][b, :, :n], one[2][b, :, :n])
  np.testing.assert_array_equal(split[1], one[1])


def test_a_kernel_after_a_split_one_reads_all_of_its_parts(two_threads, monkeypatch):
  """Products chained in one schedule: each starts as the last returns, so every part must have run by then."""
  rng = np.random.default_rng(1)
  x, w = rng.standard_normal((8, 576)).astype(np.float32), (rng.standard_normal((576, 576)) / 24).astype(np.float16)
  def chain() -> np.ndarray:
    y, wt = Tensor(x), kernels.pack(Tensor(w))
    for _ in range(6): y = kernels.matmul_t(y, wt)
    return y.numpy()
  split = ENGINE.submit(chain).result()
  monkeypatch.setattr(cpu_threads, "_parts", 1)
  np.testing.assert_array_equal(split, ENGINE.submit(chain).result())


def test_the_helper_thread_runs_parts_of_the_matrix_kernels(two_threads):
  """A product of milliseconds a part: a helper that slept through the gap before it wakes while the worker runs
  the first part (a small one the worker may finish alone, taking every part)."""
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((8, 2048), np.float32), rng.standard_normal((1024 * kernels.BLOCK, 2048), np.float32).astype(np.float16)
  before = cpu_threads.helper_parts()
  for _ in range(5): product(x, w)
  assert cpu_threads.helper_parts() > before


@pytest.mark.parametrize("world,share", [(None, 1), ("1", 1), ("2", 2), ("64", 64)])
def test_a_nodes_threads_are_its_share_of_the_hosts_cores(monkeypatch, world, share):
  monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
  if world is None: monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
  else: monkeypatch.setenv("LOCAL_WORLD_SIZE", world)
  assert cpu_threads.default_threads() == max(1, 8 // share)


def test_a_host_count_that_is_not_a_number_is_refused_clearly(monkeypatch):
  monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
  with pytest.raises(ExoError, match="LOCAL_WORLD_SIZE='two': expected the number of nodes on this host"):
    cpu_threads.default_threads()


def test_helpers_that_do_not_compile_give_clangs_message(tmp_path, monkeypatch):
  (bad := tmp_path / "cpu_threads.c").write_text("int start(int threads, long spin_ns) { return oops; }\n")
  monkeypatch.setattr(cpu_threads, "_SOURCE", bad)
  with pytest.raises(ExoError, match="cannot build the CPU thread helpers .cpu_threads.c. with clang: .*oops"):
    cpu_threads._build()


def test_a_negative_thread_count_is_refused():
  r = exo_node("--discovery", "none", "--node-port", "0", "--threads", "-1", "--prompt", "hi")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "exo-node: error: --threads must be 0 (every core) or more"
