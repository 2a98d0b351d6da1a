"""A decode pass launched ahead of its input, behind a gate on tinygrad's CPU compute queue (HCQ2). A pipeline node
otherwise starts a pass only once its frame arrives, then writes the step's lengths, binds its variables and
launches its ~270 kernels: all of it known a step ahead. Here the engine does that while the other nodes work, with
a sem_wait at the head of the queue; the frame writes the input (and the lengths) and posts the semaphore. A
half-model pass of SmolLM2 from its input to its output: 3.3-3.9 ms launched at arrival, 2.9 ms launched ahead (one
process, 2 cores). A lone request on one node launches each pass behind the one that runs (`launch(behind=True)`).
Behind the pass the queue writes an eventfd, so its end wakes a reader at once (an asyncio loop, or a blocked
thread) instead of being polled for.

One pass at most is held per process (every engine shares the device), and whatever else runs on the device first
releases it (`release`): its kernels then become no-ops, and the queue runs on."""
from __future__ import annotations
import array, atexit, ctypes, os, select, threading
from dataclasses import dataclass
from typing import Callable
import numpy as np
from tinygrad import Device, Tensor
from tinygrad.helpers import getenv
from tinygrad.runtime.ops_cpu import CMD_SIZE, RING_SLOTS, signal_prog, timestamp_prog, wait_prog
from exo_node.device import is_cpu

_libc = ctypes.CDLL(None, use_errno=True)
# labs: a call in place of a released pass's kernel, which takes their arguments and does nothing with them
_SEM_WAIT, _WRITE, _NOOP = (ctypes.cast(f, ctypes.c_void_p).value for f in (_libc.sem_wait, _libc.write, _libc.labs))
_lock = threading.Lock()
# one each for the process, never freed: the worker still touches the semaphore as a post wakes it
_sem, _one = ctypes.create_string_buffer(32), ctypes.c_uint64(1)
_sem_ok = _libc.sem_init(_sem, 0, 0) == 0  # not on macOS, which has only named semaphores
# +1 as each held pass, run or released, ends; read one at a time (EFD_SEMAPHORE), so a pass's end stays its own
# even when a released pass ends behind it before it is read
_ended = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_SEMAPHORE) if _sem_ok else -1
_released = 0  # passes released since the last take: their ends come before the next taken one's


def _raw(t: Tensor, nbytes: int) -> int:
  """The address of t's buffer, of nbytes. Found at launch: on the path from a frame to its pass, and from the pass's
  end to the next frame, each lookup took ~25 us (after the other node's pass, this one's caches are cold)."""
  buf = t.uop.base.buffer._buf
  assert buf.size == nbytes, "a raw copy fills the whole buffer"
  return buf.va_addr


@dataclass(frozen=True)
class Output:
  """Where a pass's output is, and the array it is copied to. Both found as the pass's end was read, they took 73 and
  93 us of that path on the first and last of 2 nodes, now 16 and 31 (the last's logits were a fresh mapping,
  faulted in page by page as they were copied)."""
  src: int
  dst: int
  nbytes: int
  host: np.ndarray

  @staticmethod
  def of(out: Tensor) -> Output:
    host = np.empty(out.shape, np.float32)
    host.fill(0)  # its pages, written once now
    return Output(_raw(out, host.nbytes), host.ctypes.data, host.nbytes, host)


@dataclass(eq=False)
class Held:
  owner: object  # the engine that launched it
  request_id: str
  start_pos: int
  inp: Tensor  # the step's input buffer: written when the gate opens
  into: tuple[int, int]  # its address and size (_raw)
  out: Output  # the step's output
  writes: list[tuple[int, np.ndarray]]  # more buffers of the pass (its row lengths) by address, written as the gate opens
  calls: range  # the pass's entries in the compute queue's ring, between the gate and the eventfd write
  skip: int = 0  # released passes that end before this one
  seen: int = 0  # ends read so far


_held: Held | None = None


def supported(device: str) -> bool:
  """Only tinygrad's compiled CPU queues (HCQ2, C renderer: device.bind) have a ring the host can write to."""
  return _sem_ok and is_cpu(device) and bool(getenv("HCQ2")) and hasattr(Device[device], "worker")


def _ring(dev): return dev.worker("COMPUTE:0").ring._buf.cpu_view().view(fmt="Q")


def _push(dev, words: list[int]) -> int:
  """Appends one call to the compute queue, and says where; its submitter (the other worker) must be idle: it bumps
  put too."""
  w = dev.worker("COMPUTE:0")
  ring, put = _ring(dev), w.put._buf.cpu_view().view(fmt="Q")
  base, at = (put[0] % RING_SLOTS) * CMD_SIZE, put[0]
  ring[base:base + CMD_SIZE] = array.array("Q", words + [0] * (CMD_SIZE - len(words)))  # word 0 is called with the rest
  put[0] = at + 1
  _libc.sem_post(ctypes.c_void_p(w.sem._buf.va_addr))
  return at


def _submitted(dev) -> None:
  """Waits for the submitter to have copied every submitted pass into the compute queue."""
  compute = dev.worker("COMPUTE:0")
  for w in dev.workers:
    if w is compute: continue
    put, done = w.put._buf.cpu_view().view(fmt="Q"), w.done._buf.cpu_view().view(fmt="Q")
    dev._wait_signal(done, put[0])  # how the device's own synchronize waits for a worker


def launch(owner: object, request_id: str, start_pos: int, inp: Tensor, start: Callable[[], Tensor],
           writes: list[tuple[Tensor, np.ndarray]], behind: bool = False) -> None:
  """Puts a closed gate at the tail of inp's device's compute queue, start()s the pass behind it and a write to
  the eventfd behind that, and holds the pass for take() (or release()). Not while another pass is held: the
  queue would stop at that one. behind: a taken pass still runs, so the queue is not waited for."""
  dev = Device[inp.device]
  if behind: _submitted(dev)
  else: dev.synchronize()
  gate = _push(dev, [_SEM_WAIT, ctypes.addressof(_sem)])
  try:
    out, nbytes = start(), inp.nbytes()
    found = (_raw(inp, nbytes), nbytes), Output.of(out), [(_raw(t, data.nbytes), np.ascontiguousarray(data)) for t, data in writes]
    _submitted(dev)
  except BaseException:
    _libc.sem_post(_sem)
    raise
  end = _push(dev, [_WRITE, _ended, ctypes.addressof(_one), 8])
  global _held
  with _lock:
    assert _held is None, "one pass held at a time"
    _held = Held(owner, request_id, start_pos, inp, *found, range(gate + 1, end))


def take(owner: object, request_id: str, start_pos: int) -> Held | None:
  """The held pass, if it is this step's: the caller then opens it."""
  global _held, _released
  with _lock:
    if _held is None or (_held.owner, _held.request_id, _held.start_pos) != (owner, request_id, start_pos): return None
    h, _held = _held, None
    h.skip, _released = _released, 0
  return h


def run(h: Held, x: np.ndarray) -> None:
  """Writes the step's input straight into its buffer (the pass waits, nothing else touches it) and lets the pass
  run. An x that does not fit drops the pass instead, then raises: the queue never stays held."""
  at, nbytes = h.into
  if x.dtype != np.float32 or x.nbytes != nbytes:
    drop(h)
    raise ValueError(f"the held pass takes {nbytes} bytes of float32, not {x.dtype} {x.shape}")
  # raw writes: tinygrad's own copy-in waits for the queue first, which the gate holds
  for dst, data in [*h.writes, (at, np.ascontiguousarray(x))]: ctypes.memmove(dst, data.ctypes.data, data.nbytes)
  _libc.sem_post(_sem)


def drop(h: Held) -> None:
  """Lets h go with its kernels made no-ops, its output unread: its end comes before the next taken pass's
  (Held.skip). The queue's own calls stay (tinygrad's signals and waits), and the worker, stopped at the gate, has
  not read them yet. Run on zeros instead, a released pass held up whatever had released it for a whole pass (one
  node: ~7 ms)."""
  global _released
  with _lock: _released += 1
  dev = Device[h.inp.device]
  ring, own = _ring(dev), {dev.prgs[f].addr for f in (signal_prog, wait_prog, timestamp_prog)}
  for i in h.calls:
    if ring[w := (i % RING_SLOTS) * CMD_SIZE] not in own: ring[w] = _NOOP
  _libc.sem_post(_sem)


def release(owner: object | None = None, request_id: str | None = None) -> None:
  """Drops the held pass (of owner's request_id, if given), so the device's queue moves again."""
  global _held
  with _lock:
    if _held is None or (owner is not None and (_held.owner, _held.request_id) != (owner, request_id)): return
    h, _held = _held, None
  drop(h)


def ended(h: Held) -> bool:
  """Whether the taken pass h has run (reads the ends the eventfd holds up to h's: one reader at a time)."""
  while h.seen <= h.skip:
    try: os.read(_ended, 8)
    except BlockingIOError: return False
    h.seen += 1
  return True


def wait(h: Held) -> None:
  while not ended(h): select.select([_ended], [], [])


def output(h: Held) -> np.ndarray:
  """The ended pass's output, copied out of its buffer (no wait on the device: the queue ran it before the write)."""
  o = h.out
  ctypes.memmove(o.dst, o.src, o.nbytes)
  return o.host


def fd() -> int: return _ended


atexit.register(release)  # registered after tinygrad's own exit hook, so it runs first: that one waits for the queue
