"""Hypothesis against the frame decoder and the servicer: over 10,000 generated messages (random bytes, wrong dtypes
and shapes, huge declared shapes, negative or overflowing positions, unknown requests, steps out of order). Nothing
may crash: each stream ends cleanly or with INVALID_ARGUMENT, and no request or KV session is left behind."""
import asyncio
import numpy as np
import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings, strategies as st
from exo_node.transport.codec import FrameError, decode_tensor, decode_tokens
from exo_node.transport.pb import exo_node_pb2 as pb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
HIDDEN, VOCAB, CTX, LAYERS = 64, 256, 64, 2
def fuzz(n: int) -> settings: return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
dtypes_ = st.sampled_from(["float32", "float16", "int8", "float64", "bfloat16", "", "float32\x00", "object"]) | st.text(max_size=12)
dims = st.integers(-3, 5) | st.sampled_from([HIDDEN, 2**31, 2**62, 2**63 - 1, -(2**63)])


def tensors() -> st.SearchStrategy[pb.TensorProto]:
  def build(dtype, shape, data, exact):
    if exact and dtype in ("float32", "float16") and all(0 < d < 64 for d in shape):
      data = bytes(int(np.prod(shape)) * (4 if dtype == "float32" else 2))  # a consistent tensor: right or wrong hidden size
    return pb.TensorProto(dtype=dtype, shape=shape, data=data)
  return st.builds(build, dtypes_, st.lists(dims, max_size=10), st.binary(max_size=96), st.booleans())


@fuzz(2500)
@given(tensors())
def test_decode_tensor_refuses_or_returns_what_was_declared(t):
  try: a = decode_tensor(t, hidden_size=HIDDEN, max_elements=CTX * HIDDEN)
  except FrameError: return
  assert a.dtype == np.float32 and list(a.shape) == list(t.shape) and a.shape[-1] == HIDDEN


@fuzz(1500)
@given(st.binary(max_size=200))
def test_random_bytes_never_get_past_parsing_and_validation(raw):
  try: frame = pb.Frame.FromString(raw)
  except DecodeError: return
  if frame.WhichOneof("kind") == "step":
    s = frame.step
    try:
      if s.WhichOneof("payload") == "hidden": decode_tensor(s.hidden, hidden_size=HIDDEN, max_elements=CTX * HIDDEN)
      elif s.WhichOneof("payload") == "tokens": decode_tokens(s.tokens.ids, VOCAB)
    except FrameError: pass


@fuzz(1500)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20))
def test_decode_tokens_keeps_ids_inside_the_vocabulary(ids):
  try: a = decode_tokens(ids, VOCAB)
  except FrameError: assert not ids or min(ids) < 0 or max(ids) >= VOCAB; return
  assert a.tolist() == ids


# ---------------------------------------------------------------- the servicer, in process

class Aborted(Exception):
  def __init__(self, code, details): super().__init__(details); self.code = code


class Context:
  async def abort(self, code, details): raise Aborted(code, details)


@pytest.fixture(scope="module")
def servicers(tmp_path_factory):
  """Two real servicers over a tiny random Llama: node "a" holds all of it (takes tokens), "b" the last layer (takes
  a hidden state). Each coordinates request "r", so a valid stream's tokens stay in the process."""
  from tinygrad import dtypes
  from exo_node.engine import Engine
  from exo_node.model.loader import load_shard
  from exo_node.stage import Stage
  from exo_node.transport.link import Channels
  from exo_node.transport.server import Servicer
  cfg = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                 vocab_size=VOCAB, num_hidden_layers=LAYERS, max_position_embeddings=CTX)
  folder = tmp_path_factory.mktemp("tiny")
  transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
  loop = asyncio.new_event_loop()
  out = {}
  for node, (start, end) in {"a": (0, 2), "b": (1, 2)}.items():
    engine = Engine(lambda: load_shard(folder, start, end, max_context=CTX, wdtype=dtypes.float32))
    stage = Stage(node, engine, Channels(), None, LAYERS)
    stage.deliver["r"] = lambda step, tok: None
    out[node] = Servicer(stage, lambda: pb.NodeInfo(), None)
  yield loop, out
  loop.close()


PLAN = [pb.PlanEntry(node_id="a", address="127.0.0.1:1", start_layer=0, end_layer=1),
        pb.PlanEntry(node_id="b", address="127.0.0.1:2", start_layer=1, end_layer=2)]
SOLO = [pb.PlanEntry(node_id="a", address="127.0.0.1:1", start_layer=0, end_layer=2)]
plans = st.sampled_from([PLAN, SOLO, PLAN[:1], PLAN[::-1], [], [PLAN[0], PLAN[0]],
                         [PLAN[0], pb.PlanEntry(node_id="b", address="x", start_layer=1, end_layer=9)]])
headers = st.builds(lambda rid, plan, back: pb.Frame(header=pb.Header(request_id=rid, plan=plan, to_coordinator=back)),
                    st.sampled_from(["r", "", "other"]), plans, st.booleans())
payloads = st.one_of(st.builds(lambda ids: {"tokens": pb.TokenIds(ids=ids)}, st.lists(st.integers(-5, VOCAB + 5), max_size=4)),
                     st.builds(lambda t: {"hidden": t}, tensors()), st.just({}))
steps = st.builds(lambda n, pos, p: pb.Frame(step=pb.Step(step=n, position=pos, **p)),
                  st.integers(0, 3) | st.just(2**32 - 1), st.integers(-3, 3) | st.sampled_from([CTX, 2**62, -(2**63)]), payloads)
frames = st.lists(st.one_of(headers, steps, st.just(pb.Frame(end=pb.End(reason="x"))), st.just(pb.Frame())), max_size=6)


@fuzz(4500)
@given(st.sampled_from("ab"), frames)
def test_the_servicer_refuses_bad_streams_and_keeps_nothing(servicers, node, seq):
  loop, svc = servicers
  svc = svc[node]
  async def source():
    for f in seq:
      if f.WhichOneof("kind") == "header": f.header.coordinator_id = node
      yield f
  try: loop.run_until_complete(svc.Forward(source(), Context()))
  except Aborted as e: assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e
  assert svc.stage.requests == {} and svc.stage.engine.n_sessions == 0
