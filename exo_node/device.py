"""Device binding and capabilities. bind() must run before tinygrad is imported: tinygrad reads DEV and the
CUDA driver reads CUDA_VISIBLE_DEVICES once, at import/initialisation."""
from __future__ import annotations
import os, sys, time
from dataclasses import dataclass
from exo_node import cpu_threads, hugepages
from exo_node.errors import ExoError


@dataclass(frozen=True)
class Capabilities:
  device: str  # tinygrad device, e.g. "CPU" or "CUDA"
  name: str    # human-readable, e.g. the GPU model
  memory_bytes: int


def is_cpu(device: str) -> bool:
  """tinygrad names devices BACKEND[:N]; the CPU is the one with its own kernels, waits and cache dtype."""
  return device.split(":")[0].upper() == "CPU"


def bind(gpu: int | None, device: str | None) -> None:
  if "tinygrad" in sys.modules: raise RuntimeError("device.bind() must run before tinygrad is imported")
  if gpu is not None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    device = device or "CUDA"
  if device: os.environ["DEV"] = device.upper()
  dev = os.environ.get("DEV", "CPU").upper()
  if is_cpu(dev) and (dev.split(":") + [""])[1] in ("", "CLANG") and not os.path.exists("/dev/nvidiactl"):
    # tinygrad's compiled command queues: JIT replay ~20% faster on CPU (measured); only the C renderer renders them
    # (CPU:LLVM and CPU:X86 failed every step)
    os.environ.setdefault("HCQ2", "1")


def _cpu_memory() -> int:
  try:
    with open("/proc/meminfo") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
  except (OSError, StopIteration): return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capabilities(threads: int = 1) -> Capabilities:
  """Of the device tinygrad actually opened, so a node bound to GPU N reports GPU N (not GPU 0). threads: on a CPU,
  the threads that run our kernels (0: this node's share of the cores, cpu_threads.py)."""
  from tinygrad import Device
  try: dev = Device.DEFAULT
  except Exception as e:
    raise ExoError(f"no usable compute device {os.environ.get('DEV', '')} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}): {e}") from None
  if dev.startswith("CUDA"):
    try:
      from tinygrad.runtime.autogen import cuda
      import ctypes
      d = Device[dev]
      free, total = ctypes.c_size_t(), ctypes.c_size_t()
      cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
      name = ctypes.create_string_buffer(256)
      cuda.cuDeviceGetName(name, 256, d.cu_device)
      return Capabilities(dev, name.value.decode(), int(total.value))
    except Exception as e: raise ExoError(f"cannot open CUDA device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}): {e}") from None
  if is_cpu(dev):
    _quiet_cpu_waits()
    hugepages.install()
    from exo_node.model.kernels import renders_c
    if renders_c(dev): cpu_threads.install(threads or cpu_threads.default_threads())  # only our C kernels are split
  return Capabilities(dev, "CPU", _cpu_memory())


CPU_POLL_S = 50e-6
_done_by = 0.0  # see expect_done


def expect_done(at: float) -> None:
  """The next CPU wait sleeps until `at` (time.monotonic) before it polls. Each poll wakes a thread that takes a core
  from the worker of another node on the same box: with a step's expected end known, a 1024-token prompt on 2 nodes
  took 1.06 s instead of 1.22, 4 streams on 2 nodes gave 199 tok/s instead of 189 (2 cores; one node: no change)."""
  global _done_by
  _done_by = at


def _quiet_cpu_waits() -> None:
  """tinygrad waits for its CPU worker thread by spinning in Python: that holds the GIL, so the node's gRPC and
  asyncio threads run only at the 5 ms switch interval, and it burns a core another node (or the worker) could use.
  Polling with a short sleep costs at most ~0.1 ms per wait."""
  from tinygrad.runtime.ops_cpu import CPUDevice
  def wait(self, sig, value: int, timeout: int | None = None) -> None:
    global _done_by
    if sig[0] < value and (ahead := _done_by - time.monotonic()) > CPU_POLL_S: time.sleep(ahead)
    _done_by = 0.0
    while sig[0] < value: time.sleep(CPU_POLL_S)
  CPUDevice._wait_signal = wait


# what a node reports of its environment (node-info), so a launcher's hand-down can be checked from outside
REPORTED_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "HSA_OVERRIDE_GFX_VERSION", "DEV", "BEAM", "JITBEAM", "DEBUG",
                "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def reported_env() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k in REPORTED_ENV or k.startswith("EXO_TEST_")}
