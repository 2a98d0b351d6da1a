"""One exo-node alone, on two threads (cpu_threads.py): the engine thread runs its requests' steps back to back
(Stage.chain). Greedy tokens match the engine's, concurrent streams batch and stay correct, and a stream cancelled
mid-way stops and frees its session."""
import threading, time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
import grpc
import pytest
from conftest import PROMPT_IDS, free_port, greedy
from exo_node.local_cluster import Cluster
from exo_node.transport.pb import exo_node_pb2 as pb


@pytest.fixture(scope="module")
def node(tmp_path_factory):
  with Cluster().start([free_port()], tmp_path_factory.mktemp("single"), extra=["--threads", "2"]) as c:  # both cores
    c.wait_ready()
    yield c


def test_a_lone_node_generates_the_engine_tokens_and_stops_at_max_tokens(node, full_engine):
  want = greedy(full_engine, "alone", PROMPT_IDS, 12)[0]
  assert node.procs[0].generate(PROMPT_IDS, max_tokens=12) == want
  assert node.procs[0].generate(PROMPT_IDS, max_tokens=1) == want[:1]


def test_eight_concurrent_streams_on_a_lone_node_get_their_own_tokens(node, full_engine):
  prompts = [PROMPT_IDS, PROMPT_IDS[:3], [6403, 1980, 253, 655], PROMPT_IDS[1:]] * 2
  want = [greedy(full_engine, f"w{i}", p, 10)[0] for i, p in enumerate(prompts)]
  with ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda p: node.procs[0].generate(p, max_tokens=10), prompts))
  assert got == want
  assert node.sessions() == [0]


def test_a_cancelled_stream_frees_its_session_and_the_node_serves_on(node, full_engine):
  proc = node.procs[0]
  stream = proc.stub().Generate(pb.GenerateRequest(prompt_ids=[6403, 1980, 253, 655], raw=True,
                                                   sampling=pb.Sampling(temperature=0, max_tokens=400)), timeout=120)
  assert len([next(stream) for _ in range(3)]) == 3
  assert proc.info().active_sessions == 1
  stream.cancel()
  with pytest.raises(grpc.RpcError):
    for _ in stream: pass
  assert node.sessions(settle=10) == [0]
  assert proc.generate(PROMPT_IDS, max_tokens=4) == greedy(full_engine, "after", PROMPT_IDS, 4)[0]


def test_a_stream_in_flight_gets_tokens_while_a_long_prompt_prefills(node):
  """The prompt holds the engine one slice at a time (Engine._prefill): before, the stream got nothing from the
  prompt's arrival to its first token (here ~0.7 s). The prompt's token is the one it gets alone."""
  proc, stamps, long = node.procs[0], [], [504 + i % 300 for i in range(400)]
  alone = proc.generate(long, max_tokens=1)
  consume = threading.Thread(target=lambda: stamps.extend(t for _, t in proc.stream([6403, 1980, 253, 655], max_tokens=300)))
  consume.start()
  while len(stamps) < 3: time.sleep(0.01)
  t0 = time.monotonic()
  (tok, t1), = proc.stream(long, max_tokens=1)
  consume.join()
  assert [tok] == alone and len(stamps) == 300
  assert len([t for t in stamps if t0 < t < t1]) >= 3, (t1 - t0, [round(t - t0, 3) for t in stamps if t0 - 0.1 < t < t1 + 0.1])


def test_the_lone_node_computes_on_a_helper_thread_too(node):
  tasks = Path(f"/proc/{node.procs[0].popen.pid}/task")
  assert [t.name for t in tasks.iterdir() if (t / "comm").read_text().strip() == "exo-cpu-helper"]
