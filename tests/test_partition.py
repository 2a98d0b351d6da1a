"""partition(): memory-weighted, contiguous, deterministic; and the Plan helpers every hop relies on."""
import itertools, math, pytest
from fractions import Fraction
from hypothesis import given, settings, strategies as st
from exo_node.errors import ExoError
from exo_node.topology import PartitionError, PeerInfo, Plan, Shard, partition
from exo_node.transport.pb import exo_node_pb2 as pb

GiB = 2**30

def peer(node_id: str, memory: int) -> PeerInfo: return PeerInfo(node_id, f"{node_id}:50051", memory)
def ranges(plan: Plan) -> list[tuple[str, int, int]]: return [(s.node_id, s.start, s.end) for s in plan.shards]

def check(plan: Plan, nodes: list[PeerInfo], n_layers: int) -> None:
  """Every layer once, in order; every node exactly once with at least one layer."""
  assert sorted(s.node_id for s in plan.shards) == sorted(p.node_id for p in nodes)
  assert [l for s in plan.shards for l in range(s.start, s.end)] == list(range(n_layers))
  assert all(s.end - s.start >= 1 for s in plan.shards) and plan.n_layers == n_layers


def test_2_1_1_largest_remainder_tie_goes_to_the_earlier_node():
  # quotas 15, 7.5, 7.5: the one leftover layer goes to b, first of the tied nodes in (memory desc, node_id) order
  assert ranges(partition([peer("c", 8 * GiB), peer("a", 16 * GiB), peer("b", 8 * GiB)], 30)) == [("a", 0, 15), ("b", 15, 23), ("c", 23, 30)]

def test_equal_memory_splits_evenly():
  assert ranges(partition([peer("y", GiB), peer("x", GiB)], 30)) == [("x", 0, 15), ("y", 15, 30)]

def test_single_node_takes_everything():
  assert ranges(partition([peer("solo", GiB)], 24)) == [("solo", 0, 24)]

def test_no_memory_reported_means_equal_shares():
  assert ranges(partition([peer("a", 0), peer("b", 0), peer("c", 0)], 10)) == [("a", 0, 4), ("b", 4, 7), ("c", 7, 10)]

def test_deterministic_under_permutation():
  nodes = [peer("n1", 3 * GiB), peer("n2", 5 * GiB), peer("n3", 3 * GiB), peer("n4", GiB)]
  plans = {partition(list(p), 32, GiB // 4) for p in itertools.permutations(nodes)}
  assert len(plans) == 1

def test_tiny_node_still_gets_a_layer():
  nodes = [peer("big", 1000 * GiB), peer("small", GiB), peer("tiny", 1)]
  plan = partition(nodes, 8)
  check(plan, nodes, 8)
  assert ranges(plan) == [("big", 0, 6), ("small", 6, 7), ("tiny", 7, 8)]

def test_more_nodes_than_layers():
  with pytest.raises(PartitionError, match="3 nodes but the model has only 2 layers"): partition([peer(c, GiB) for c in "abc"], 2)

@pytest.mark.parametrize("nodes, n_layers, match", [
  ([], 4, "no nodes"),
  ([peer("a", GiB)], 0, "0 layers"),
  ([peer("a", GiB), peer("a", 2 * GiB)], 4, "duplicate node id.*: a"),
])
def test_bad_inputs(nodes, n_layers, match):
  with pytest.raises(PartitionError, match=match): partition(nodes, n_layers)

def test_memory_too_small_names_needed_and_available():
  with pytest.raises(PartitionError) as e: partition([peer("a", 4 * GiB), peer("b", 2 * GiB)], 30, GiB // 4)
  msg = str(e.value)
  assert isinstance(e.value, ExoError) and "\n" not in msg
  assert "30 layers need 7.50 GiB" in msg and "have 6.00 GiB" in msg and "room for 24 whole layers" in msg

def test_node_smaller_than_one_layer():
  with pytest.raises(PartitionError, match="node.*pi have less memory than one layer"): partition([peer("big", 64 * GiB), peer("pi", 100)], 30, GiB)

def test_layers_that_do_not_fit_move_to_the_node_with_most_room():
  # 7 layers of 3 bytes over 12:8:5 bytes. By memory: quotas 3.36, 2.24, 1.4 -> 3, 2, 2 (the leftover goes to c's .4),
  # but c holds only one layer; its extra one goes to a (room for 4, has 3), not b (room for 2, has 2)
  nodes = [peer("a", 12), peer("b", 8), peer("c", 5)]
  assert ranges(partition(nodes, 7)) == [("a", 0, 3), ("b", 3, 5), ("c", 5, 7)]
  assert ranges(partition(nodes, 7, 3)) == [("a", 0, 4), ("b", 4, 6), ("c", 6, 7)]
  with pytest.raises(PartitionError, match="room for 7 whole layers"): partition(nodes, 8, 3)

@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=12), st.integers(1, 128), st.sampled_from([0, 1, 2**20, 2**30]), st.randoms(use_true_random=False))
def test_partition_properties(mems, n_layers, layer_bytes, rnd):
  nodes = [peer(f"n{i:02d}", m) for i, m in enumerate(mems)]
  try: plan = partition(nodes, n_layers, layer_bytes)
  except PartitionError as e:
    assert "\n" not in str(e)
    assert len(nodes) > n_layers or (layer_bytes and (sum(m // layer_bytes for m in mems) < n_layers or min(mems) < layer_bytes))
    return
  check(plan, nodes, n_layers)
  if layer_bytes: assert all((s.end - s.start) * layer_bytes <= next(p for p in nodes if p.node_id == s.node_id).memory_bytes for s in plan.shards)
  else:  # without caps: ordered by memory, each count is its quota rounded (up only when it was below one layer)
    total, order = sum(mems), sorted(nodes, key=lambda p: (-p.memory_bytes, p.node_id))
    quotas = [Fraction(n_layers * p.memory_bytes, total) if total else Fraction(n_layers, len(nodes)) for p in order]
    assert [s.node_id for s in plan.shards] == [p.node_id for p in order]
    for s, q in zip(plan.shards, quotas): assert s.end - s.start <= max(1, math.ceil(q))
    if min(quotas) >= 1: assert all(abs((s.end - s.start) - q) < 1 for s, q in zip(plan.shards, quotas))
  rnd.shuffle(nodes)
  assert partition(nodes, n_layers, layer_bytes) == plan


def test_plan_helpers_and_proto_round_trip():
  plan = partition([peer("a", 2 * GiB), peer("b", GiB), peer("c", GiB)], 30)
  assert plan.first.node_id == "a" and plan.last.node_id == "c" and plan.n_layers == 30
  assert plan.shard_of("b") == Shard("b", "b:50051", 15, 23) and plan.shard_of("zz") is None
  assert plan.next_after("a").node_id == "b" and plan.next_after("b").node_id == "c"
  assert plan.next_after("c") is None and plan.next_after("zz") is None
  entries = plan.to_proto()
  assert all(isinstance(e, pb.PlanEntry) for e in entries) and (entries[1].start_layer, entries[1].end_layer) == (15, 23)
  header = pb.Header.FromString(pb.Header(request_id="r", plan=entries).SerializeToString())
  assert Plan.from_proto(header.plan) == plan

@pytest.mark.parametrize("shards, match", [
  ((), "no shards"),
  ((Shard("a", "", 0, 4), Shard("b", "", 5, 8)), "node b has layers \\[5, 8\\), expected a non-empty range from 4"),
  ((Shard("a", "", 1, 4),), "from 0"),
  ((Shard("a", "", 0, 4), Shard("b", "", 4, 4)), "node b"),
  ((Shard("a", "", 0, 4), Shard("a", "", 4, 8)), "a listed twice"),
])
def test_malformed_plan_is_refused(shards, match):
  with pytest.raises(PartitionError, match=match): Plan(shards)
  with pytest.raises(PartitionError, match=match): Plan.from_proto([pb.PlanEntry(node_id=s.node_id, start_layer=s.start, end_layer=s.end) for s in shards])
