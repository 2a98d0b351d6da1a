"""A model split across real exo-node processes on 127.0.0.1 generates exactly what one node generates."""
from concurrent.futures import ThreadPoolExecutor
import pytest
from exo_node.local_cluster import Cluster
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


@pytest.fixture(scope="module")
def long_prompt(full_engine) -> tuple[list[int], list[int]]:
  """A prompt the coordinator feeds in three parts (64, 64, 22), and what one node generates from it."""
  from exo_node.orchestrator import PROMPT_PART
  ids = (PROMPT_IDS * 40)[:2 * PROMPT_PART + 22]
  return ids, greedy(full_engine, "long", ids, 4)[0]


@pytest.mark.parametrize("entry", ["first", "last"])
def test_a_prompt_fed_in_parts_generates_the_single_node_tokens(two_nodes, long_prompt, entry):
  """The last shard samples only after the prompt's last part, and each part lands at its own positions; entering
  the last node, the coordinator feeds the parts over gRPC."""
  ids, want = long_prompt
  node = next(p for p in two_nodes.procs if (p.info().start_layer == 0) == (entry == "first"))
  assert node.generate(ids, max_tokens=4) == want


def test_a_prompt_in_parts_crosses_three_nodes(three_nodes, long_prompt):
  ids, want = long_prompt
  assert three_nodes[0].procs[0].generate(ids, max_tokens=4) == want


def test_four_concurrent_requests_on_two_nodes_all_complete(two_nodes, single_tokens):
  with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda i: two_nodes.procs[i % 2].generate(PROMPT_IDS), range(4)))
  assert results == [single_tokens] * 4
  assert two_nodes.sessions() == [0, 0]


def _forward(proc, frames, timeout=30, hold=0.0):
  """Sends frames on one Forward stream, keeping it open `hold` seconds as a coordinator would; the error or None."""
  import grpc, time
  def gen():
    yield from frames
    time.sleep(hold)
  try: list(proc.stub().Forward(gen(), timeout=timeout)); return None
  except grpc.RpcError as e: return e


def _header(plan, rid="bad-1"):
  from exo_node.transport.pb import exo_node_pb2 as pb
  return pb.Frame(header=pb.Header(request_id=rid, model_id="smollm2-135m", coordinator_id="tester", coordinator_address="127.0.0.1:1",
                                   plan=[pb.PlanEntry(node_id=n, address=a, start_layer=s, end_layer=e) for n, a, s, e in plan]))


def _hidden(dtype="float32", shape=(1, 576), nbytes=None, step=0, partial=False):
  from exo_node.transport.pb import exo_node_pb2 as pb
  import numpy as np
  n = nbytes if nbytes is not None else int(np.prod(shape)) * np.dtype(dtype).itemsize
  return pb.Frame(step=pb.Step(step=step, position=0, hidden=pb.TensorProto(data=bytes(n), dtype=dtype, shape=list(shape)), partial=partial))


@pytest.mark.parametrize("case", ["int8 dtype", "byte count", "hidden size", "unknown request", "step order", "decode step in parts"])
def test_malformed_frames_are_refused_and_the_node_keeps_serving(two_nodes, single_tokens, case):
  import grpc
  second = next(p for p in two_nodes.procs if p.info().start_layer > 0)
  plan = [("ghost", "127.0.0.1:1", 0, 15), (second.node_id, second.address, 15, 30)]
  frames = {"int8 dtype": [_header(plan), _hidden("int8")], "byte count": [_header(plan), _hidden(nbytes=100)],
            "hidden size": [_header(plan), _hidden(shape=(1, 575))], "unknown request": [_hidden()],
            "step order": [_header(plan), _hidden(step=3)], "decode step in parts": [_header(plan), _hidden(step=1, partial=True)]}[case]
  err = _forward(second, frames)
  assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
  assert {"int8 dtype": "int8", "byte count": "100", "hidden size": "575", "unknown request": "unknown request",
          "step order": "out of order", "decode step in parts": "only the prompt (step 0) comes in parts"}[case] in err.details()
  assert second.info().active_sessions == 0
  assert two_nodes.procs[0].generate(PROMPT_IDS) == single_tokens


def test_a_dead_next_hop_is_reported_by_address_within_seconds(two_nodes):
  import grpc, time
  from exo_node.transport.pb import exo_node_pb2 as pb
  first = next(p for p in two_nodes.procs if p.info().start_layer == 0)
  dead = f"127.0.0.1:{free_port()}"
  t0 = time.monotonic()
  err = _forward(first, [_header([(first.node_id, first.address, 0, 15), ("ghost", dead, 15, 30)], "dead-hop"),
                         pb.Frame(step=pb.Step(step=0, position=0, tokens=pb.TokenIds(ids=PROMPT_IDS)))], hold=15)
  assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE and dead in err.details()
  assert time.monotonic() - t0 < 10
  assert first.info().active_sessions == 0


def test_cli_names_an_unreachable_peer_and_exits(tmp_path):
  from conftest import exo_node
  dead = f"127.0.0.1:{free_port()}"
  r = exo_node("--node-port", str(free_port()), "--api-port", "0", "--peers", dead, "--wait-for-peers", "1",
               "--peer-timeout", "2", "--prompt", "hi", timeout=60)
  assert r.returncode == 2 and dead in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
