"""A decode pass launched ahead of its input, behind a gate on tinygrad's CPU compute queue (HCQ2). A pipeline node
otherwise starts a pass only once its frame arrives, then writes the step's lengths, binds its variables and
launches its ~270 kernels: all of it known a step ahead. Here the engine does that while the other nodes work, with
a sem_wait at the head of the queue; the frame writes the input and posts the semaphore. A half-model pass of
SmolLM2 from its input to its output: 3.3-3.9 ms launched at arrival, 2.9 ms launched ahead (one process, 2 cores).

One pass at most is held per process (every engine shares the device), and whatever else runs on the device first
releases it (`release`): it then runs on zeros, into the one cache position its own step would overwrite."""
from __future__ import annotations
import array, atexit, ctypes, threading
from typing import Callable
from dataclasses import dataclass
import numpy as np
from tinygrad import Device, Tensor
from tinygrad.helpers import getenv
from tinygrad.runtime.ops_cpu import CMD_SIZE, RING_SLOTS
from exo_node.device import is_cpu

_libc = ctypes.CDLL(None, use_errno=True)
_SEM_WAIT = ctypes.cast(_libc.sem_wait, ctypes.c_void_p).value
_lock = threading.Lock()
_sem = ctypes.create_string_buffer(32)  # one for the process, never freed: the worker still reads it as a post wakes it
_sem_ok = _libc.sem_init(_sem, 0, 0) == 0  # not on macOS, which has only named semaphores


@dataclass(eq=False)
class Held:
  owner: object  # the engine that launched it
  request_id: str
  start_pos: int
  inp: Tensor  # the step's input buffer: written when the gate opens
  out: Tensor  # the step's output, once the pass has run


_held: Held | None = None


def supported(device: str) -> bool:
  """Only tinygrad's compiled CPU queues (HCQ2, C renderer: device.bind) have a ring the host can write to."""
  return _sem_ok and is_cpu(device) and bool(getenv("HCQ2")) and hasattr(Device[device], "worker")


def launch(owner: object, request_id: str, start_pos: int, inp: Tensor, start: Callable[[], Tensor]) -> None:
  """Puts a closed gate at the tail of inp's device's compute queue, then start()s the pass behind it, held for
  take() (or release()). Not while another pass is held: the queue would stop at that one."""
  dev = Device[inp.device]
  dev.synchronize()  # the queue is idle, so its submitter bumps its write index no more until the next submit
  w = dev.worker("COMPUTE:0")
  ring, put = w.ring._buf.cpu_view().view(fmt="Q"), w.put._buf.cpu_view().view(fmt="Q")
  words = [_SEM_WAIT, ctypes.addressof(_sem)]  # the worker calls word 0 with the rest as arguments
  base = (put[0] % RING_SLOTS) * CMD_SIZE
  ring[base:base + CMD_SIZE] = array.array("Q", words + [0] * (CMD_SIZE - len(words)))
  put[0] = put[0] + 1
  _libc.sem_post(ctypes.c_void_p(w.sem._buf.va_addr))
  try: out = start()
  except BaseException:
    _libc.sem_post(_sem)
    raise
  global _held
  with _lock:
    assert _held is None, "one pass held at a time"
    _held = Held(owner, request_id, start_pos, inp, out)


def take(owner: object, request_id: str, start_pos: int) -> Held | None:
  """The held pass, if it is this step's: the caller then opens it."""
  global _held
  with _lock:
    if _held is None or (_held.owner, _held.request_id, _held.start_pos) != (owner, request_id, start_pos): return None
    h, _held = _held, None
  return h


def run(h: Held, x: np.ndarray | None = None) -> None:
  """Writes the step's input straight into its buffer (the pass waits, nothing else touches it) and lets the pass
  run; on zeros without x. An x that does not fit runs zeros too, then raises: the queue never stays held."""
  buf = h.inp.uop.buffer._buf
  fits = x is not None and x.dtype == np.float32 and x.nbytes == buf.size
  src = np.ascontiguousarray(x) if fits else np.zeros(buf.size, np.uint8)
  ctypes.memmove(buf.va_addr, src.ctypes.data, buf.size)
  _libc.sem_post(_sem)
  if x is not None and not fits: raise ValueError(f"the held pass takes {buf.size} bytes of float32, not {x.dtype} {x.shape}")


def release(owner: object | None = None, request_id: str | None = None) -> None:
  """Lets the held pass (of owner's request_id, if given) run on zeros, so the device's queue moves again."""
  global _held
  with _lock:
    if _held is None or (owner is not None and (_held.owner, _held.request_id) != (owner, request_id)): return
    h, _held = _held, None
  run(h)


atexit.register(release)  # registered after tinygrad's own exit hook, so it runs first: that one waits for the queue
