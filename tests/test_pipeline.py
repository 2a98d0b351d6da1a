"""A model split across real exo-node processes on 127.0.0.1 generates exactly what one node generates."""
from concurrent.futures import ThreadPoolExecutor
import pytest
from cluster import Cluster
from conftest import PROMPT_IDS, free_port, greedy

GIB = 1 << 30


@pytest.fixture(scope="module")
def single_tokens(full_engine) -> list[int]: return greedy(full_engine, "single", PROMPT_IDS, 8)[0]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
  with Cluster().start([free_port(), free_port()], tmp_path_factory.mktemp("two")) as c:
    c.wait_ready(); yield c


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
  with Cluster().start([free_port() for _ in range(3)], tmp_path_factory.mktemp("three"), memory=[4 * GIB, 2 * GIB, 2 * GIB]) as c:
    yield c, c.wait_ready()


def test_two_nodes_generate_the_single_node_tokens(two_nodes, single_tokens):
  assert two_nodes.procs[0].generate(PROMPT_IDS) == single_tokens


def test_request_entering_a_node_without_layer_zero_is_served(two_nodes, single_tokens):
  last = next(p for p in two_nodes.procs if p.info().start_layer > 0)
  assert last.generate(PROMPT_IDS) == single_tokens


def test_chat_prompt_matches_single_node(two_nodes, full_engine, weights):
  from exo_node.model.loader import open_tokenizer
  tok = open_tokenizer(weights)
  ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]), add_bos=False)
  want = greedy(full_engine, "chat", ids, 6)[0]
  assert two_nodes.procs[1].generate(prompt="What is the capital of France?", raw=False, max_tokens=6) == want


def test_three_nodes_split_layers_by_memory_and_match_single_node(three_nodes, single_tokens):
  c, infos = three_nodes
  assert [(i.node_id, i.start_layer, i.end_layer) for i in infos] == [("n0", 0, 15), ("n1", 15, 23), ("n2", 23, 30)]
  assert c.procs[2].generate(PROMPT_IDS) == single_tokens


def test_four_concurrent_requests_on_two_nodes_all_complete(two_nodes, single_tokens):
  with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda i: two_nodes.procs[i % 2].generate(PROMPT_IDS), range(4)))
  assert results == [single_tokens] * 4
  assert all(p.info().active_sessions == 0 for p in two_nodes.procs)
