"""The path other devices take (CUDA, Metal, ...): weights unpacked, tinygrad's own matmul and attention with a
per-row mask, an fp16 KV cache. CI has no GPU, so it runs here on tinygrad's CPU backend with its own x86 renderer (no LLVM library
needed; Debian 12's LLVM 14 and 15 fail tinygrad's LLVM IR), where our C kernels do not apply, and must give the
tokens of the C path, alone and batched with a request at another position."""
import json, os
from conftest import PROMPT_IDS, greedy, script_json

OTHER = [504, 2388, 2001, 282, 1343, 314, 253]
SCRIPT = """
import json, sys, threading
import numpy as np
from exo_node import device
device.bind(None, "CPU:X86")  # must leave tinygrad's compiled command queues (HCQ2) off: only the C renderer has them
from exo_node.engine import Engine
from exo_node.model import kernels
from exo_node.model.loader import load_shard
a, b, n = json.loads(sys.argv[1])
from tinygrad import dtypes
e = Engine(lambda: load_shard("smollm2-135m", 0, 30, max_context=128, kv_dtype=dtypes.float16), max_batch=2)  # as on a GPU
m = e.model
out = {"generic": m.counts is None and not kernels.is_packed(m.blocks[0].w["attn_q.weight"]) and m.kv_dtype == dtypes.float16}
toks = {r: [int(np.argmax(e.forward(r, 0, np.array(ids)).result()))] for r, ids in (("a", a), ("b", b))}
pos = {"a": len(a), "b": len(b)}
for _ in range(n - 1):  # both requests' steps wait together and run as one 2-row pass, at different positions
  gate = threading.Event()
  e.submit(gate.wait)
  futures = {r: e.forward(r, pos[r], np.array(toks[r][-1:])) for r in toks}
  gate.set()
  for r, f in futures.items(): toks[r].append(int(np.argmax(f.result()))); pos[r] += 1
out.update(toks, batched=e.decode_steps[2])
print(json.dumps(out))
"""


def test_the_generic_path_gives_the_c_paths_tokens_alone_and_batched(full_engine):
  n = 6
  env = {k: v for k, v in os.environ.items() if k not in ("HCQ2", "DEV")}  # as a fresh shell has it
  got = script_json(SCRIPT, json.dumps([PROMPT_IDS, OTHER, n]), env=env, timeout=900)
  assert got["generic"] and got["batched"] == n - 1
  assert got["a"] == greedy(full_engine, "generic-a", PROMPT_IDS, n)[0]
  assert got["b"] == greedy(full_engine, "generic-b", OTHER, n)[0]
