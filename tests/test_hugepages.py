"""CPU buffers cut from arenas advised for huge pages (exo_node/hugepages.py): right data, no overlap, and the advice
really on the mappings the buffers live in."""
import numpy as np
import pytest
from exo_node import hugepages
from exo_node.hugepages import HUGE, Arena


def vm_flags(addr: int) -> set[str]:
  """The VmFlags of the mapping of this process that holds addr."""
  with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
      head = line.split()[0]
      if "-" in head and ":" not in head:
        lo, hi = (int(x, 16) for x in head.split("-"))
        inside = lo <= addr < hi
      elif inside and head == "VmFlags:": return set(line.split()[1:])
  raise AssertionError(f"no mapping holds {addr:#x}")


def test_an_arena_hands_out_page_aligned_pieces_from_a_huge_page_boundary_until_it_is_full():
  a = Arena(4 * HUGE)
  first, second = a.take(100), a.take(HUGE)
  assert first % HUGE == 0 and second == first + 4096
  assert a.take(4 * HUGE) is None  # 4 huge pages and 4 KB taken from at most 5
  assert "hg" in vm_flags(first) or not hugepages.supported()


@pytest.fixture(scope="module")
def cpu(full_engine):
  """The CPU device as a node opens it (device.capabilities installs the arenas), on the engine's thread."""
  from tinygrad import Device
  from exo_node import device
  full_engine.submit(lambda: (device.capabilities(), Device["CPU"])).result()
  return full_engine.submit


def buffer(t) -> object: return t.uop.base.buffer._buf


@pytest.mark.skipif(not hugepages.supported(), reason="no madvise(MADV_HUGEPAGE) here")
def test_tinygrad_cpu_buffers_live_in_advised_arenas_and_compute_right(cpu):
  from tinygrad import Tensor
  def run():
    small, big = Tensor(np.arange(1 << 20, dtype=np.float32)).realize(), Tensor.ones(3 << 20).contiguous().realize()
    out = (small * 2).realize()
    bufs = [buffer(t) for t in (small, big, out)]
    return bufs, out.numpy(), big[:4].numpy()
  bufs, doubled, ones = cpu(run).result()
  assert all(isinstance(b.meta, Arena) for b in bufs)
  assert all(b.va_addr % 4096 == 0 and "hg" in vm_flags(b.va_addr) for b in bufs)
  assert bufs[1].meta is not bufs[0].meta and bufs[1].va_addr % HUGE == 0  # 12 MB > ARENA / 4: an arena of its own
  spans = sorted((b.va_addr, b.va_addr + b.size) for b in bufs)
  assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
  np.testing.assert_array_equal(doubled, np.arange(1 << 20, dtype=np.float32) * 2)
  np.testing.assert_array_equal(ones, np.ones(4, np.float32))
