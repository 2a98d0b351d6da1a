"""The CUDA path without a GPU: tinygrad's NULL device renders and compiles every kernel for an H100 (sm_90,
through NVRTC from pip) and runs none, so the captured steps can be checked where CI runs."""
import os
from importlib.metadata import files
from conftest import script_json

SCRIPT = """
import json, os
import numpy as np
from exo_node import device
device.bind(None, None)  # DEV as given: the arch must keep its case
from tinygrad.uop.ops import Ops
from exo_node.engine import Engine
from exo_node.model.loader import load_shard
e = Engine(lambda: load_shard("random:llama-tiny", 0, 4, max_context=64), max_batch=2)
for r in ("a", "b"): e.forward(r, 0, np.array([1, 2, 3])).result()
e.forward("a", 3, np.array([5])).result()
e.warm().result()
out = {}
for (kind, rows, _), jit in e._jits.items():
  for p in (u.arg for u in jit.captured._linear.toposort() if u.op is Ops.PROGRAM):
    # as tinygrad's CUDA graph adds a kernel node: every variable at 0
    symbolic = not all(isinstance(d, int) for d in (*p.global_size, *p.local_size))
    out[f"{kind}{rows}:{p.function_name}"] = [symbolic, [list(d) for d in p.launch_dims({v.expr: 0 for v in p.vars})]]
print(json.dumps({"device": e.model.device, "kernels": out}))
"""


def nvrtc() -> str:
  lib = next((f for f in files("nvidia-cuda-nvrtc-cu12") or () if f.name.startswith("libnvrtc.so.")), None)
  assert lib is not None, "nvidia-cuda-nvrtc-cu12 is not installed (scripts/setup.sh --test installs it)"
  return str(lib.locate())


def test_no_kernel_of_a_captured_step_gets_an_empty_grid_when_cuda_builds_its_graph():
  """tinygrad's CUDA graph creates each kernel node with every variable at 0 and sets the real values at launch. A
  grid of the span's size was empty there: CUDA Error 1 (invalid argument), and a GPU node failed its first
  request. The decode steps now bind the span less one."""
  env = {**os.environ, "DEV": "NULL:CUDA:sm_90", "NULL_ALLOW_COPYOUT": "1", "NVRTC_PATH": nvrtc()}
  env.pop("HCQ2", None)
  got = script_json(SCRIPT, env=env)
  assert got["device"].startswith("NULL")
  kernels = got["kernels"]
  assert {k.split(":")[0] for k in kernels} >= {"prefill1", "decode1", "decode2"}
  assert any(symbolic for symbolic, _ in kernels.values()), "no grid follows a variable: the check would be empty"
  empty = {k: dims for k, (_, dims) in kernels.items() if min(min(d) for d in dims) < 1}
  assert not empty
