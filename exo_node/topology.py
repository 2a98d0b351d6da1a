"""Who runs which layers. `partition` is a pure function of the peer list, so every node that sees the same peers
computes the same plan without a leader; the coordinator then pins it in each request's Header."""
from __future__ import annotations
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterable
from exo_node.errors import ExoError
from exo_node.transport.pb import exo_node_pb2 as pb


class PartitionError(ExoError):
  """The peers cannot hold the model, or a plan is malformed."""


@dataclass(frozen=True)
class PeerInfo:
  node_id: str
  address: str
  memory_bytes: int
  device: str = "CPU"
  api_port: int = 0


@dataclass(frozen=True)
class Shard:
  """Node `node_id` runs layers [start, end)."""
  node_id: str
  address: str
  start: int
  end: int


@dataclass(frozen=True)
class Plan:
  """Shards in pipeline order; always contiguous from layer 0, each non-empty, one per node (checked on build,
  since plans also arrive over the wire)."""
  shards: tuple[Shard, ...]

  def __post_init__(self):
    if not self.shards: raise PartitionError("plan has no shards")
    if dup := sorted(i for i, c in Counter(s.node_id for s in self.shards).items() if c > 1): raise PartitionError(f"malformed plan: node(s) {', '.join(dup)} listed twice")
    at = 0
    for s in self.shards:
      if s.start != at or s.end <= s.start: raise PartitionError(f"malformed plan: node {s.node_id} has layers [{s.start}, {s.end}), expected a non-empty range from {at}")
      at = s.end

  @property
  def first(self) -> Shard: return self.shards[0]
  @property
  def last(self) -> Shard: return self.shards[-1]
  @property
  def n_layers(self) -> int: return self.last.end

  def shard_of(self, node_id: str) -> Shard | None: return next((s for s in self.shards if s.node_id == node_id), None)

  def next_after(self, node_id: str) -> Shard | None:
    """The hop after `node_id`; None for the last shard or a node not in the plan."""
    i = next((i for i, s in enumerate(self.shards) if s.node_id == node_id), None)
    return self.shards[i + 1] if i is not None and i + 1 < len(self.shards) else None

  def to_proto(self) -> list[pb.PlanEntry]:
    return [pb.PlanEntry(node_id=s.node_id, address=s.address, start_layer=s.start, end_layer=s.end) for s in self.shards]

  @classmethod
  def from_proto(cls, entries: Iterable[pb.PlanEntry]) -> Plan: return cls(tuple(Shard(e.node_id, e.address, e.start_layer, e.end_layer) for e in entries))


def partition(nodes: list[PeerInfo], n_layers: int, layer_bytes: int = 0) -> Plan:
  """Contiguous layer ranges weighted by memory. Nodes are ordered by (memory desc, node_id asc); each gets
  round(n_layers * share) by largest remainder, ties going to the earlier node (2:1:1 over 30 -> 15, 8, 7). A node
  the rounding left empty takes a layer from the most over-served node. With `layer_bytes`, layers that do not fit
  a node's memory move, one at a time, to the node with the most room."""
  if n_layers <= 0: raise PartitionError(f"cannot partition a model with {n_layers} layers")
  if not nodes: raise PartitionError("no nodes to run the model on")
  if dup := sorted(i for i, c in Counter(p.node_id for p in nodes).items() if c > 1): raise PartitionError(f"duplicate node id(s): {', '.join(dup)}")
  if len(nodes) > n_layers: raise PartitionError(f"{len(nodes)} nodes but the model has only {n_layers} layers: each node needs at least one")
  order = sorted(nodes, key=lambda p: (-p.memory_bytes, p.node_id))
  mem = [max(p.memory_bytes, 0) for p in order]
  total = sum(mem)
  # exact quotas as fractions num/total (equal shares when no node reports memory), rounded by largest remainder
  num = [n_layers * m for m in mem] if total else [n_layers] * len(order)
  den = total or len(order)
  counts = [q // den for q in num]
  for i in sorted(range(len(order)), key=lambda i: -(num[i] % den))[:n_layers - sum(counts)]: counts[i] += 1
  for i in range(len(order)):
    if counts[i] == 0:
      j = max((j for j in range(len(order)) if counts[j] > 1), key=lambda j: counts[j] * den - num[j])
      counts[i], counts[j] = 1, counts[j] - 1
  if layer_bytes > 0:
    cap = [m // layer_bytes for m in mem]
    if sum(cap) < n_layers:
      raise PartitionError(f"not enough memory: {n_layers} layers need {_size(n_layers * layer_bytes)}, the {len(order)} nodes have "
                           f"{_size(total)} (room for {sum(cap)} whole layers of {_size(layer_bytes)})")
    if small := [p.node_id for p, k in zip(order, cap) if k == 0]:
      raise PartitionError(f"node(s) {', '.join(small)} have less memory than one layer ({_size(layer_bytes)}) but each node needs at least one")
    spill = sum(max(c - k, 0) for c, k in zip(counts, cap))
    counts = [min(c, k) for c, k in zip(counts, cap)]
    for _ in range(spill):
      j = max(range(len(order)), key=lambda j: cap[j] - counts[j])
      counts[j] += 1
  return Plan(tuple(Shard(p.node_id, p.address, e - c, e) for p, c, e in zip(order, counts, accumulate(counts))))


def _size(n: int) -> str:
  unit = next(u for u in range(4, -1, -1) if n >= 1024 ** u or u == 0)
  return f"{n} B" if unit == 0 else f"{n / 1024 ** unit:.2f} {'KMGT'[unit - 1]}iB"
