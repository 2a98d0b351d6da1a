"""Host <-> device copies straight through the allocator. A Tensor built from host data, Tensor.numpy() and a
realized Tensor.zeros each cost a tinygrad scheduling pass (~4 ms on a CPU): per step, and per KV buffer of a new
request (30 of them: 120 ms of a 190 ms time to first token), that was the largest cost outside the kernels."""
from __future__ import annotations
import numpy as np
from tinygrad import Device, Tensor
from tinygrad.dtype import DType


def write(t: Tensor, data: np.ndarray) -> None:
  """t must be realized, its own whole buffer, and of data's byte size."""
  buf = t.uop.buffer.ensure_allocated()
  assert buf.nbytes == data.nbytes, "a raw write fills the whole buffer"
  Device[buf.device].allocator._copyin(buf._buf, memoryview(np.ascontiguousarray(data)).cast("B"))


def read(t: Tensor) -> np.ndarray:
  """t's buffer as float32, once the device has finished computing it."""
  buf, host = t.uop.base.buffer, np.empty(t.shape, np.float32)
  assert buf.nbytes == host.nbytes, "a raw read takes a whole float32 buffer"
  dev = Device[buf.device]
  dev.synchronize()
  dev.allocator._copyout(memoryview(host).cast("B"), buf._buf)
  return host


def upload(data: np.ndarray, dtype: DType, device: str) -> Tensor:
  """A realized tensor of data's shape holding data's bytes, which are already in dtype's layout."""
  t = Tensor.empty(*data.shape, dtype=dtype, device=device).realize()
  write(t, data)
  return t


def zeros(n: int, dtype: DType, device: str) -> Tensor:
  t = Tensor.empty(n, dtype=dtype, device=device).realize()
  write(t, np.zeros(n * dtype.itemsize, np.uint8))
  return t
