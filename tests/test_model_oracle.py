"""Our tinygrad shard model against an independent numpy forward pass over the same GGUF."""
import numpy as np
import pytest
from conftest import PROMPT_IDS, greedy
from reference import ReferenceLlama

PROMPTS = [PROMPT_IDS, [504, 2388, 2001, 282, 1343, 314]]  # "The capital of France is", "The first name of ... is"-like


@pytest.fixture(scope="module")
def oracle(gguf_path): return ReferenceLlama(gguf_path)


@pytest.mark.parametrize("ids", PROMPTS)
def test_greedy_tokens_and_logits_match_numpy_reference(full_engine, oracle, ids):
  ours, logits = greedy(full_engine, "oracle", ids, 8)
  assert ours == oracle.greedy(ids, 8)
  ref = oracle.logits(ids)[-1]
  assert np.abs(logits - ref).max() < 2e-2 * np.abs(ref).max()
  assert int(np.argmax(logits)) == int(np.argmax(ref))


def test_smollm2_knows_the_capital_of_france(full_engine):
  assert greedy(full_engine, "paris", PROMPT_IDS, 1)[0] == [7042]  # " Paris"


def test_a_prompt_is_prefilled_in_the_smallest_steps_that_hold_it_and_matches_the_reference(full_engine, oracle, monkeypatch):
  """21 positions on a CPU, once the 16-position step is captured (--warm does it): a 16-position step, then the last
  5 in an 8-position one (not 16 with 11 of padding)."""
  ids, sizes, run, m = PROMPT_IDS * 4 + [314], [], full_engine._chunk_pass, full_engine.model
  full_engine.submit(lambda: run(np.zeros((16, m.cfg.dim), np.float32), 0, m.new_cache(pad=full_engine.chunk), 16)).result()
  monkeypatch.setattr(full_engine, "_chunk_pass", lambda x, start, kv, size: sizes.append((len(x), size)) or run(x, start, kv, size))
  logits = full_engine.forward("steps", 0, np.array(ids)).result()
  full_engine.free("steps")
  assert sizes == [(16, 16), (5, 8)]
  ref = oracle.logits(ids)[-1]
  assert np.abs(logits - ref).max() < 2e-2 * np.abs(ref).max() and int(np.argmax(logits)) == int(np.argmax(ref))
