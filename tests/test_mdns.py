"""mDNS discovery on the loopback interface: real exo-node processes find each other with no peer list."""
import os, signal, time
import pytest
from conftest import PROMPT_IDS, greedy, spawn, wait_until
from exo_node.launch.supervisor import terminate
from exo_node.local_cluster import Proc


def start(tmp_path, node_id: str, cluster: str = "t") -> Proc:
  return spawn(tmp_path, "--api-port", "0", "--discovery", "mdns", "--cluster", cluster, "--mdns-interface", "127.0.0.1",
               "--max-context", "512", node_id=node_id)


def stop(*procs: Proc) -> None: terminate([p.popen for p in procs], grace=15)


def peers_of(p: Proc) -> set[str]:
  return set(p.info().peers)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mdns")
  procs = [start(tmp, f"m{i}") for i in range(3)]
  try:
    wait_until(lambda: all(peers_of(p) == {q.node_id for q in procs} - {p.node_id} for p in procs), 120, "3 nodes discover each other")
    yield procs, tmp
  finally: stop(*procs)


def test_three_nodes_discover_each_other_and_agree_on_the_plan(trio):
  procs, _ = trio
  plans = {tuple((e.node_id, e.start_layer, e.end_layer) for e in p.info().plan) for p in procs}
  assert len(plans) == 1 and len(plan := plans.pop()) == 3 and plan[-1][2] == 30


def test_three_mdns_nodes_generate_the_single_node_tokens(trio, full_engine):
  procs, _ = trio
  want = greedy(full_engine, "mdns", PROMPT_IDS, 8)[0]
  assert procs[1].generate(PROMPT_IDS) == want


def test_killed_node_leaves_within_3s_and_comes_back_on_restart(trio):
  procs, tmp = trio
  extra = start(tmp, "m9")
  try:
    wait_until(lambda: "m9" in peers_of(procs[0]), 60, "m9 joins")
    os.killpg(extra.popen.pid, signal.SIGKILL); extra.popen.wait()
    t0 = time.monotonic()
    wait_until(lambda: "m9" not in peers_of(procs[0]) and "m9" not in peers_of(procs[1]), 10, "m9 dropped")
    assert time.monotonic() - t0 < 3.0
    extra = start(tmp, "m9")
    wait_until(lambda: "m9" in peers_of(procs[0]), 60, "m9 back")
  finally: stop(extra)


def test_another_cluster_on_the_same_host_stays_apart_and_a_lone_node_loads_while_mdns_registers(trio):
  procs, tmp = trio
  other = start(tmp, "x0", cluster="other")
  try:
    wait_until(lambda: other.info().end_layer > 0, 60, "x0 up")
    time.sleep(2)
    assert peers_of(other) == set() and all("x0" not in peers_of(p) for p in procs)
    log = other.log.read_text()  # alone, it loads its layers while mDNS probes its name
    assert log.index("loading layers [0, 30)") < log.index("mDNS: advertising")
  finally: stop(other)


def test_duplicate_node_id_is_refused_and_the_running_node_is_untouched(trio):
  procs, tmp = trio
  dup = start(tmp, "m0")
  try: dup.popen.wait(60)
  finally: stop(dup)
  assert dup.popen.returncode == 2
  assert "already taken" in dup.log.read_text().strip().splitlines()[-1]
  assert procs[0].popen.poll() is None and {"m1", "m2"} <= peers_of(procs[0])
