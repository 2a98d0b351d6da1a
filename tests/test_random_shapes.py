"""Random-weight models of a named shape (`--model random:NAME`): the same weights on every node, token ids in and
out, and the bench runs on them without a weight file."""
import json, os, subprocess, sys, threading
from pathlib import Path
import grpc
import numpy as np
import pytest
from exo_node.local_cluster import Cluster
from conftest import PROMPT_IDS, exo_node, free_port, greedy, http, script_json

MODEL = "random:llama-tiny"
ROOT = Path(__file__).resolve().parents[1]


def test_shapes_name_every_tensor_a_llama_shard_loads():
  from exo_node.model.loader import BLOCK_TENSORS, layer_nbytes, open_weights
  w = open_weights("random:llama-1b")
  c = w.config
  assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (16, 2048, 32, 8, 128256)
  assert all(w.has(f"blk.15.{n}.weight") for n in BLOCK_TENSORS) and w.has("token_embd.weight") and w.has("output_norm.weight")
  assert not w.has("output.weight") and open_weights("random:llama-8b").has("output.weight")  # 1B ties its head
  assert not w.has("blk.0.attn_q.bias") and w.shape_of("blk.3.ffn_down.weight") == (2048, 8192)
  assert 1.2e9 < layer_nbytes(w) * c.n_layers / 2 + c.vocab_size * c.dim < 1.3e9  # Llama 3.2 1B: 1.24 B parameters


def test_unknown_shape_is_one_line_and_exit_2():
  r = exo_node("--model", "random:llama-70b", "--discovery", "none", "--api-port", "0", "--prompt", "hi", timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == \
    "exo-node: error: unknown random shape 'llama-70b' (known: random:llama-1b, random:llama-8b, random:llama-tiny)"


@pytest.fixture(scope="module")
def two_tiny(tmp_path_factory):
  with Cluster().start([free_port(), free_port()], tmp_path_factory.mktemp("tiny"), extra=["--model", MODEL],
                       api_ports=[free_port(), free_port()]) as c:
    yield c, c.wait_ready()


def test_a_pipeline_of_random_weights_generates_the_single_process_tokens(two_tiny):
  from exo_node.engine import Engine
  from exo_node.model.loader import load_shard, open_weights
  c, infos = two_tiny
  assert sorted((i.start_layer, i.end_layer) for i in infos) == [(0, 2), (2, 4)] and infos[0].model_id == MODEL
  w = open_weights(MODEL)
  want = greedy(Engine(lambda: load_shard(w, 0, w.config.n_layers, max_context=256)), "tiny", PROMPT_IDS, 8)[0]
  assert len(set(want)) > 1  # random weights still give a varied, deterministic sequence
  assert c.procs[0].generate(PROMPT_IDS) == want and c.procs[1].generate(PROMPT_IDS) == want


def test_a_text_prompt_is_refused_without_a_tokenizer(two_tiny):
  with pytest.raises(grpc.RpcError) as e: two_tiny[0].procs[0].generate(prompt="The capital of France is")
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert e.value.details() == f"model {MODEL} has no tokenizer: send the prompt as token ids"
  url = two_tiny[0].procs[1].url
  for path, body in (("/v1/completions", {"prompt": "The capital of France is"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
    status, reply = http(url + path, {"model": MODEL, "max_tokens": 2, **body})
    assert status == 400 and reply["error"]["message"] == f"model {MODEL} has no tokenizer: send the prompt as token ids", reply


def test_bench_runs_a_shape_in_one_and_two_nodes(tmp_path):
  r = subprocess.run([sys.executable, "scripts/bench.py", "--shape", "llama-tiny", "--nodes", "1,2", "--tokens", "8", "--runs", "1",
                      "--warmup", "1", "--prefill-tokens", "16", "--context", "24", "--concurrency", "2", "--out", str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
  assert [(x["mode"], x.get("nodes")) for x in rows] == [("single", 1), ("pipeline", 2), ("concurrent", 1), ("concurrent", 2),
                                                          ("summary", [1, 2])]
  assert all(x["model"] == MODEL for x in rows) and rows[0]["decode_tok_s"] > 0 and rows[-1]["pipeline_vs_single_2"] > 0
  assert rows[1]["sampled_decode_tok_s"] > 0 and rows[-1]["sampled_vs_greedy_1"] > 0  # streams at temperature 1.0 too
  assert rows[0]["stall_ms"] > 0 and rows[1]["stall_ms"] > 0  # a stream's longest gap while the long prompt came
  assert rows[-1]["context"] == 24  # decoded after a 24-token prompt
  assert rows[-1]["prefill_vs_single_2"] == round(rows[1]["prefill_tok_s"] / rows[0]["prefill_tok_s"], 3)
  assert rows[2]["aggregate_vs_one_stream"] > 0 and rows[-1]["concurrent_2_vs_one_2"] == rows[3]["aggregate_vs_one_stream"]
  assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_warmed_engine_has_every_batch_size_captured_and_serves_batches_without_capturing():
  """--warm: the prefill steps (of 8 and 16 positions on a CPU) and decode passes of 1, 2 and 4 rows (and on a CPU
  the one-row pass's twin, Engine._launch_behind) are captured at load, before any request; without it only the
  8-position step, at first use."""
  from exo_node.engine import Engine
  from exo_node.model.loader import load_shard
  e = Engine(lambda: load_shard(MODEL, 0, 4, max_context=256), max_batch=4)
  e.forward("cold", 0, np.arange(12)).result()  # before warm: 8-position steps only, no capture of a larger one
  assert set(e._jits) == {("prefill", 1, 8)}
  e.free("cold")
  e.warm().result(timeout=600)
  captured = set(e._jits)
  assert captured == {("prefill", 1, 8), ("prefill", 1, 16), ("decode", 1, 1), ("twin", 1, 1), ("decode", 2, 1), ("decode", 4, 1)}
  want = greedy(e, "alone", PROMPT_IDS, 3)[0]
  first = {r: int(np.argmax(e.forward(r, 0, np.array(PROMPT_IDS)).result())) for r in ("w0", "w1", "w2")}
  gate = threading.Event()
  e.submit(gate.wait)  # the three steps below wait in one queue and run as one padded pass of 4
  steps = {r: e.forward(r, len(PROMPT_IDS), np.array([t])) for r, t in first.items()}
  gate.set()
  assert [[first[r], int(np.argmax(f.result()))] for r, f in steps.items()] == [want[:2]] * 3
  assert set(e._jits) == captured and e.decode_steps[3] == 1


BEAM_SCRIPT = """
import json
import numpy as np
from tinygrad.codegen.opt import search
from exo_node.engine import Engine
from exo_node.model.loader import load_shard
searched = []
search.beam_search = lambda k, *a: searched.append(k.ast) or k  # records what would be searched, keeps the heuristics' kernel
e = Engine(lambda: load_shard("random:llama-tiny", 0, 4, max_context=64), max_batch=1, beam=2)
counts = [len(searched)]
tok = int(np.argmax(e.forward("a", 0, np.array([1, 2, 3])).result()))
counts.append(len(searched))
for pos in (3, 4, 5):
  tok = int(np.argmax(e.forward("a", pos, np.array([tok])).result()))
  counts.append(len(searched))
print(json.dumps(counts))
"""


def test_beam_searches_the_decode_steps_kernels_and_leaves_prefill_to_the_heuristics():
  """--beam N: a decode step's kernels are searched as it is captured (they set a stream's speed); prefill's are
  not (searching its kernels took minutes more on an H100), and a replay searches nothing."""
  env = {**os.environ, "CACHELEVEL": "0"}  # nothing from an earlier search on disk
  load, prefill, first, *later = script_json(BEAM_SCRIPT, env=env)
  assert load == prefill and first > prefill and later == [first] * len(later)
