"""A CPU node's kernels split over its cores. tinygrad 0.14 runs the THREAD parts of a CPU kernel one after
another on its one compute worker, so a node computed on one core. Here our kernels (model/kernels.py) split their
work into parts(), and the compute queue calls cpu_threads.c's fork_kernel with the kernel in place of its parts:
the worker and parts() - 1 helper threads run them at once (each output is still computed by one thread, in the same
order: the results do not change). The helpers are plain C threads, built with the clang that tinygrad's CPU
backend compiles with, and never touch Python."""
from __future__ import annotations
import ctypes, hashlib, os, subprocess, tempfile
from pathlib import Path
from exo_node.errors import ExoError

SPIN_NS = 500_000  # a helper that finds no kernel spins this long, then sleeps: past the gaps inside a pass and most between one stream's passes
_SOURCE = Path(__file__).with_name("cpu_threads.c")
_parts = 1
_lib: ctypes.CDLL | None = None  # kept: its threads run its code
_fork = 0  # fork_kernel's address


def parts() -> int:
  """How many parts our kernels are split into: the threads that run them (1: not split)."""
  return _parts


def default_threads() -> int:
  """The cores this process may run on (as llama.cpp and ollama use them), shared with the other nodes of this host:
  LOCAL_WORLD_SIZE, torchrun's count of them, which exo-cluster and local_cluster set. Two nodes of one 2-core box,
  4 streams: 98-106 tok/s with both nodes on two threads, 145 on one each (a helper waits for a core the other
  node holds)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  try: nodes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
  except ValueError: raise ExoError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r}: expected the number of nodes on this host") from None
  return max(1, cores // max(1, nodes))


def helper_parts() -> int:
  """Kernel parts the helper threads have run."""
  return ctypes.c_long.in_dll(_lib, "helper_parts").value if _lib is not None else 0


def _build() -> Path:
  """The helper library, compiled once per source into tinygrad's cache folder (a rename: nodes that start at once
  never load a half-written file)."""
  from tinygrad.helpers import CACHEDB
  src = _SOURCE.read_bytes()
  out = Path(CACHEDB).with_name(f"exo-cpu-threads-{hashlib.sha256(src).hexdigest()[:16]}.so")
  if out.exists(): return out
  tmp = None
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    subprocess.run(["clang", "-O2", "-shared", "-fPIC", "-pthread", str(_SOURCE), "-o", tmp], check=True, capture_output=True)
    os.replace(tmp, out)
  except (OSError, subprocess.CalledProcessError) as e:
    if tmp is not None and os.path.exists(tmp): os.unlink(tmp)
    raise ExoError(f"cannot build the CPU thread helpers ({_SOURCE.name}) with clang: {getattr(e, 'stderr', b'').decode().strip() or e}") from None
  return out


def _fork_call(ctx: tuple[str, ...], call, prg):
  """A kernel split in parts (its only variable the part, after its buffers) becomes one call of fork_kernel; any
  other kernel is left to tinygrad (None). A module function: tinygrad's pattern matchers take no closures."""
  from tinygrad import UOp, dtypes
  from tinygrad.engine.realize import get_call_arg_uops, get_runtime
  from tinygrad.runtime.ops_cpu import CMD_SIZE
  from tinygrad.uop.ops import Ops
  a = prg.arg
  if len(ctx) != 1 or a.runtimevars.get("core_id") != 0 or len(a.vars) != 1 or len(a.globals) > CMD_SIZE - 4: return None
  words = (UOp.const(_fork, dtypes.uint64), UOp.const(get_runtime(ctx[0], prg).addr, dtypes.uint64),
           UOp.const(a.global_size[0], dtypes.uint64), UOp.const(len(a.globals), dtypes.uint64),
           *(get_call_arg_uops(call)[i].getaddr(ctx) for i in a.globals))
  return UOp(Ops.INS, src=words + (UOp.const(0, dtypes.uint64),) * (CMD_SIZE - len(words)), arg="cmd")


def install(threads: int) -> None:
  """Runs our kernels on `threads` threads from now on (once per process; 1 changes nothing). Before any kernel
  is captured: a capture keeps the kernels it was made with."""
  global _parts, _lib, _fork
  from tinygrad.helpers import getenv
  if threads <= 1 or _lib is not None or not getenv("HCQ2"): return  # without compiled queues, no queue calls fork_kernel
  from tinygrad.runtime import ops_cpu
  from tinygrad.uop.ops import Ops, PatternMatcher, UPat
  lib = ctypes.CDLL(str(_build()))
  if lib.start(threads, ctypes.c_long(SPIN_NS)) != 0: raise ExoError(f"cannot start {threads - 1} CPU helper threads")
  _fork = ctypes.cast(lib.fork_kernel, ctypes.c_void_p).value
  # into tinygrad's own matcher, first: its queue encoder holds that object (a pattern's function keeps the globals
  # it saw when first matched), and the matchers it is added to are cached
  ours = PatternMatcher([(UPat(Ops.CALL, src=(UPat(Ops.PROGRAM, name="prg"),), name="call", allow_any_len=True), _fork_call)])
  ops_cpu.pm_cpu_opsel.patterns[:0] = ours.patterns
  ops_cpu.pm_cpu_opsel.pdict[Ops.CALL][:0] = ours.pdict[Ops.CALL]
  PatternMatcher.__add__.cache_clear()
  _lib, _parts = lib, threads
