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
