"""Shards compose, a shard reads and holds only its own layers, and concurrent decode steps batch."""
import gc, threading, time
import pytest
import numpy as np
from conftest import PROMPT_IDS, greedy
from exo_node.engine import Engine, EngineError
from exo_node.model.gguf import GGUFWeights
from exo_node.model.loader import load_shard


def test_three_shards_chained_equal_the_whole_model(gguf_path, full_engine):
  w = GGUFWeights(gguf_path)
  engines = [Engine(lambda a=a, b=b: load_shard(w, a, b, max_context=256)) for a, b in ((0, 10), (10, 20), (20, 30))]
  whole, _ = greedy(full_engine, "whole", PROMPT_IDS, 4)
  x, pos, toks, first_logits = np.array(PROMPT_IDS), 0, [], None
  for _ in range(4):
    h = x
    for e in engines: h = e.forward("chain", pos, h).result()
    first_logits = h if first_logits is None else first_logits
    pos += len(x); toks.append(int(np.argmax(h))); x = np.array(toks[-1:])
  assert toks == whole
  ref = full_engine.forward("ref", 0, np.array(PROMPT_IDS)).result()
  full_engine.free("ref")
  np.testing.assert_allclose(first_logits, ref, rtol=1e-4, atol=1e-3)


def held(model) -> int: return sum(t.nbytes() for b in model.blocks for t in b.w.values())


def test_a_third_of_the_blocks_reads_and_holds_a_third_of_the_block_bytes(gguf_path, full_engine):
  w = GGUFWeights(gguf_path)
  block_bytes = sum(t.nbytes for n, t in w.file.tensors.items() if n.startswith("blk."))
  embd = w.file.tensors["token_embd.weight"].nbytes
  before = w.bytes_read
  e = Engine(lambda: load_shard(w, 10, 20, max_context=64))  # middle shard: no embedding, no head
  read = w.bytes_read - before
  assert abs(read / block_bytes - 1 / 3) < 0.01
  assert abs(held(e.model) / held(full_engine.model) - 1 / 3) < 0.01
  assert e.model.embed is None and e.model.head is None and embd > 0


def test_concurrent_decode_steps_share_one_pass_and_match_one_at_a_time(full_engine):
  """Four requests at different positions decode three steps as one batch of 4, and every request gets the tokens
  it gets alone."""
  prompts = [PROMPT_IDS, PROMPT_IDS[:3], [504, 3575], PROMPT_IDS[1:]]
  alone = [greedy(full_engine, f"alone{i}", p, 4)[0] for i, p in enumerate(prompts)]
  logits = {f"b{i}": full_engine.forward(f"b{i}", 0, np.array(p)).result() for i, p in enumerate(prompts)}
  pos, toks = {r: len(p) for r, p in zip(logits, prompts)}, {r: [] for r in logits}
  for _ in range(3):
    gate = threading.Event()
    full_engine.submit(gate.wait)  # hold the engine thread so that every step below waits in one queue
    futures = {}
    for r, lg in logits.items():
      toks[r].append(int(np.argmax(lg)))
      futures[r] = full_engine.forward(r, pos[r], np.array(toks[r][-1:])); pos[r] += 1
    gate.set()
    logits = {r: f.result() for r, f in futures.items()}
  for r, lg in logits.items(): toks[r].append(int(np.argmax(lg))); full_engine.free(r)
  assert [toks[f"b{i}"] for i in range(4)] == alone
  assert ("decode", 4, 1) in full_engine._jits


def test_a_refused_step_leaves_three_that_run_padded_in_the_captured_pass_of_4(full_engine):
  """Four requests decode as a batch of 4; at the next step one is out of order and refused. The three others run
  as one pass of the captured size 4 with a padding row, and no pass of 3 is captured (a capture stalls every
  request for seconds)."""
  logits = {f"p{i}": full_engine.forward(f"p{i}", 0, np.array(PROMPT_IDS)).result() for i in range(4)}
  want = greedy(full_engine, "alone", PROMPT_IDS, 3)[0]
  pos = len(PROMPT_IDS)
  for step in range(2):
    gate = threading.Event()
    full_engine.submit(gate.wait)
    before = dict(full_engine.decode_steps)
    futures = {r: full_engine.forward(r, pos + (step == 1 and r == "p1"), np.array([want[step]])) for r in logits}
    gate.set()
    if step == 1:
      with pytest.raises(EngineError, match=f"position {pos + 1} out of order"): futures.pop("p1").result()
    assert [int(np.argmax(f.result())) for f in futures.values()] == [want[step + 1]] * len(futures)
    assert full_engine.decode_steps[len(futures)] == before.get(len(futures), 0) + 1
    pos += 1
  assert ("decode", 4, 1) in full_engine._jits and ("decode", 3, 1) not in full_engine._jits
  for r in logits: full_engine.free(r)


def batch_of_two(engine: Engine, names: tuple[str, str]) -> dict[str, np.ndarray]:
  """Prefills two requests and runs their first decode step as one batch; returns each one's next token."""
  logits = {r: engine.forward(r, 0, np.array(PROMPT_IDS)).result() for r in names}
  gate = threading.Event()
  engine.submit(gate.wait)
  first = {r: engine.forward(r, len(PROMPT_IDS), np.array([int(np.argmax(lg))])) for r, lg in logits.items()}
  gate.set()
  return {r: np.array([int(np.argmax(f.result()))]) for r, f in first.items()}


def test_a_batch_that_just_finished_waits_for_its_requests_to_come_back(full_engine, monkeypatch):
  """Two requests decode as a batch of 2; their next steps arrive apart, yet run together again. The window is long
  here, so the test does not depend on timing."""
  monkeypatch.setattr(full_engine, "gather_s", 30.0)
  nxt = batch_of_two(full_engine, ("g0", "g1"))
  before = dict(full_engine.decode_steps)
  g0 = full_engine.forward("g0", len(PROMPT_IDS) + 1, nxt["g0"])
  time.sleep(0.3)
  assert not g0.done()  # held for g1, which was in its batch
  g1 = full_engine.forward("g1", len(PROMPT_IDS) + 1, nxt["g1"])
  assert np.array_equal(g0.result(), g1.result())  # same prompt, same tokens: the same logits
  assert full_engine.decode_steps[2] == before.get(2, 0) + 1 and full_engine.decode_steps[1] == before.get(1, 0)
  for r in nxt: full_engine.free(r)


def test_a_batch_whose_requests_are_back_does_not_wait_for_another_batch(full_engine, monkeypatch):
  """In a pipeline two batches take turns on every shard: one whose requests are all back runs at once, while the
  requests of the batch that ran after it are still on another node. The window is 10^3 s: a wait fails the test."""
  monkeypatch.setattr(full_engine, "gather_s", 1e3)
  nxt = batch_of_two(full_engine, ("a0", "a1"))
  away = batch_of_two(full_engine, ("b0", "b1"))  # ran last; their next steps never come here
  before = dict(full_engine.decode_steps)
  a0, a1 = (full_engine.forward(r, len(PROMPT_IDS) + 1, nxt[r]) for r in nxt)
  assert np.array_equal(a0.result(timeout=120), a1.result(timeout=120))
  assert full_engine.decode_steps[2] == before.get(2, 0) + 1
  for r in (*nxt, *away): full_engine.free(r)


def test_a_step_whose_batch_mate_stays_away_runs_alone_once_the_window_has_passed(full_engine, monkeypatch):
  monkeypatch.setattr(full_engine, "gather_s", 0.2)
  nxt = batch_of_two(full_engine, ("w0", "w1"))
  before = dict(full_engine.decode_steps)
  t0 = time.monotonic()
  full_engine.forward("w0", len(PROMPT_IDS) + 1, nxt["w0"]).result(timeout=120)
  assert time.monotonic() - t0 >= 0.2  # it waited for w1 the whole window
  assert full_engine.decode_steps[1] == before.get(1, 0) + 1 and full_engine.decode_steps[2] == before.get(2, 0)
  for r in nxt: full_engine.free(r)


def test_a_cache_left_by_an_ended_request_serves_the_next_one_unchanged(full_engine, monkeypatch):
  """A new request takes the cache of an ended one without clearing it: the stale positions past its own must never
  count, even in a batch whose other row attends further."""
  monkeypatch.setattr(full_engine, "_spare", [])
  want, _ = greedy(full_engine, "fresh", PROMPT_IDS, 2)
  alone = full_engine.forward("alone", 0, np.array(PROMPT_IDS)).result()
  alone = full_engine.forward("alone", len(PROMPT_IDS), np.array([want[0]])).result()
  full_engine.free("alone")
  full_engine.forward("long", 0, np.arange(1000, 1040)).result()
  stale = full_engine.sessions["long"].kv
  full_engine.free("long")
  first = {r: full_engine.forward(r, 0, np.array(ids)).result() for r, ids in (("short", PROMPT_IDS), ("other", list(range(2000, 2012))))}
  assert full_engine.sessions["short"].kv is stale  # the spare taken last is the one freed last
  gate = threading.Event()
  full_engine.submit(gate.wait)
  steps = {r: full_engine.forward(r, len(PROMPT_IDS) if r == "short" else 12, np.array([int(np.argmax(lg))])) for r, lg in first.items()}
  before = full_engine.decode_steps[2]
  gate.set()
  short = steps["short"].result()
  assert full_engine.decode_steps[2] == before + 1  # short attended over other's 13 positions, 7 of them stale
  assert int(np.argmax(first["short"])) == want[0] and int(np.argmax(short)) == want[1]
  np.testing.assert_allclose(short, alone, rtol=1e-4, atol=1e-3)
  for r in steps: full_engine.free(r)


def test_in_a_pipeline_of_two_shards_four_waiting_steps_run_as_two_passes_of_two(full_engine):
  """Two batches that take turns keep both shards busy; one batch of four would leave one of them idle."""
  assert not full_engine.sessions  # a pass takes at most half of the requests here: these four
  logits = {f"h{i}": full_engine.forward(f"h{i}", 0, np.array(PROMPT_IDS)).result() for i in range(4)}
  want = greedy(full_engine, "alone", PROMPT_IDS, 2)[0]
  gate = threading.Event()
  full_engine.submit(gate.wait)  # the four steps below wait in one queue
  before = dict(full_engine.decode_steps)
  steps = [full_engine.forward(r, len(PROMPT_IDS), np.array([int(np.argmax(lg))]), stages=2) for r, lg in logits.items()]
  gate.set()
  assert [int(np.argmax(f.result())) for f in steps] == [want[1]] * 4
  assert full_engine.decode_steps[2] == before.get(2, 0) + 2 and full_engine.decode_steps[4] == before.get(4, 0)
  for r in logits: full_engine.free(r)


@pytest.mark.parametrize("shard", [(0, 30), (10, 20)])
def test_a_short_prompt_among_waiting_steps_runs_as_rows_of_their_passes(weights, full_engine, shard):
  """A prompt that arrives while another request's step waits takes one position per pass, the first as a row of
  that step's pass, and returns what a prefill chunk returns: the logits, or a middle shard's hidden state of
  every position."""
  start, end = shard
  e = full_engine if shard == (0, 30) else Engine(lambda: load_shard(weights, start, end, max_context=256))
  prompt = np.array(PROMPT_IDS) if start == 0 else np.random.default_rng(0).standard_normal((5, e.model.cfg.dim)).astype(np.float32)
  chunked = e.forward("alone", 0, prompt).result()
  e.free("alone")
  e.forward("a", 0, prompt).result()
  gate = threading.Event()
  e.submit(gate.wait)  # "a"'s step waits in the queue when "b" arrives
  before = dict(e.decode_steps)
  step = e.forward("a", len(prompt), prompt[:1])
  rows = e.forward("b", 0, prompt)
  gate.set()
  np.testing.assert_allclose(rows.result(timeout=120), chunked, rtol=1e-4, atol=1e-3)
  step.result(timeout=120)
  assert {k: v - before.get(k, 0) for k, v in e.decode_steps.items() if v != before.get(k, 0)} == {2: 1, 1: len(prompt) - 1}
  for r in ("a", "b"): e.free(r)


def test_a_long_prompt_lets_the_steps_of_requests_in_flight_run_between_its_steps(full_engine, monkeypatch):
  """A prompt holds the engine for one slice of its steps while others wait (here a slice is one step): a request in
  flight gets its next token after that, not after all of the prompt, and the prompt's result does not change."""
  monkeypatch.setattr("exo_node.engine.prefill.PROMPT_SLICE_S", 0.0)
  long = np.arange(1000, 1064)
  alone = full_engine.forward("alone", 0, long).result()
  full_engine.free("alone")
  want = greedy(full_engine, "ref", PROMPT_IDS, 2)[0]
  full_engine.forward("a", 0, np.array(PROMPT_IDS)).result()
  gate, order = threading.Event(), []
  full_engine.submit(gate.wait)  # the prompt's first step and the step of "a" wait in the queue, in that order
  prompt = full_engine.forward("long", 0, long)
  step = full_engine.forward("a", len(PROMPT_IDS), np.array(want[:1]))
  for name, f in (("long", prompt), ("a", step)): f.add_done_callback(lambda _, name=name: order.append(name))
  gate.set()
  np.testing.assert_allclose(prompt.result(timeout=120), alone, rtol=1e-4, atol=1e-3)
  assert int(np.argmax(step.result(timeout=120))) == want[1] and order == ["a", "long"]
  for r in ("a", "long"): full_engine.free(r)


def test_a_request_freed_during_its_prompt_stops_there(full_engine, monkeypatch):
  """Its cache went to the spares when it was freed: the prompt's later steps must not write into it."""
  monkeypatch.setattr("exo_node.engine.prefill.PROMPT_SLICE_S", 0.0)
  gate = threading.Event()
  full_engine.submit(gate.wait)
  prompt = full_engine.forward("gone", 0, np.arange(1000, 1064))
  full_engine.submit(lambda: full_engine.free("gone"))  # runs after the prompt's first step
  gate.set()
  with pytest.raises(EngineError, match="'gone' ended during its prompt"): prompt.result(timeout=120)
  assert "gone" not in full_engine.sessions
  assert greedy(full_engine, "next", PROMPT_IDS, 2)[0] == greedy(full_engine, "again", PROMPT_IDS, 2)[0]


def test_a_load_leaves_its_objects_out_of_the_cyclic_gcs_scans(weights):
  """A full collection over a loaded model's objects (over a million) stalled every thread of a node for ~0.3 s."""
  gc.unfreeze()
  Engine(lambda: load_shard(weights, 0, 2, max_context=64))
  assert gc.get_freeze_count() > 100_000 and len(gc.get_objects()) < 10_000
