"""TensorProto codec: exact round trips, and every malformed frame is a FrameError, never anything else."""
import numpy as np, pytest
from hypothesis import given, settings, strategies as st
from exo_node.errors import ExoError
from exo_node.transport.codec import ALLOWED_DTYPES, MAX_RANK, FrameError, decode_tensor, decode_tokens, encode_tensor
from exo_node.transport.pb import exo_node_pb2 as pb

def tp(data: bytes = b"\0" * 16, dtype: str = "float32", shape=(2, 2)) -> pb.TensorProto: return pb.TensorProto(data=data, dtype=dtype, shape=shape)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 8), (7,)])
def test_round_trip(dtype, shape):
  a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
  t = encode_tensor(a)
  assert t.dtype == dtype and list(t.shape) == list(shape) and len(t.data) == a.nbytes
  out = decode_tensor(pb.TensorProto.FromString(t.SerializeToString()), hidden_size=shape[-1], max_elements=a.size)
  assert out.dtype == np.float32 and out.shape == shape and out.flags.writeable and out.flags.owndata
  np.testing.assert_array_equal(out, a.astype(np.float32))

def test_encode_is_little_endian_and_contiguous():
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  for v in (a.astype(">f4"), a.T, a[:, ::2]):
    t = encode_tensor(v)
    assert t.data == np.ascontiguousarray(v, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_tensor(t), v)

def test_encode_refuses_other_dtypes():
  with pytest.raises(FrameError, match="float64"): encode_tensor(np.zeros(4))

def test_frame_error_is_an_exo_error(): assert issubclass(FrameError, ExoError)

@pytest.mark.parametrize("t, kw, match", [
  (tp(dtype="float64", data=b"\0" * 32), {}, "dtype 'float64' not allowed"),
  (tp(dtype=""), {}, "not allowed"),
  (tp(shape=()), {}, "rank 0"),
  (tp(shape=(1,) * (MAX_RANK + 1), data=b"\0" * 4), {}, "rank 9"),
  (tp(shape=(-2, -2)), {}, "dimension <= 0"),
  (tp(shape=(0, 4), data=b""), {}, "dimension <= 0"),
  (tp(shape=(2**62, 2**62, 2**62)), {}, "does not match its 16 bytes"),
  (tp(shape=(2**62, 2**62, 2**62)), {"max_elements": 1000}, "exceeds the limit of 1000"),
  (tp(shape=(2, 4)), {"max_elements": 4}, "exceeds the limit of 4"),
  (tp(shape=(2, 3)), {}, "does not match its 16 bytes"),
  (tp(data=b"\0" * 15), {}, "does not match its 15 bytes"),
  (tp(dtype="float16"), {}, "does not match"),
  (tp(), {"hidden_size": 3}, "last dimension is 2, expected hidden size 3"),
])
def test_decode_rejects(t, kw, match):
  with pytest.raises(FrameError, match=match) as e: decode_tensor(t, **kw)
  assert "\n" not in str(e.value)

def test_decode_tokens():
  out = decode_tokens(pb.TokenIds(ids=[0, 5, 9]).ids, 10)
  assert out.dtype == np.int64 and out.tolist() == [0, 5, 9]
  with pytest.raises(FrameError, match="empty"): decode_tokens([], 10)
  with pytest.raises(FrameError, match=r"token id 10 outside the vocabulary \[0, 10\)"): decode_tokens([1, 10, 11], 10)
  with pytest.raises(FrameError, match="token id -1"): decode_tokens(pb.TokenIds(ids=[3, -1]).ids, 10)


dims = st.one_of(st.integers(-3, 6), st.integers(-2**63, 2**63 - 1), st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1]))

@st.composite
def tensors(draw) -> pb.TensorProto:
  junk = st.one_of(st.sampled_from(["float64", "int8", "bfloat16", "<f4", "f2", "object", "V4", "FLOAT32"]), st.text(max_size=8))
  dtype = draw(st.sampled_from(sorted(ALLOWED_DTYPES)) if draw(st.integers(0, 3)) else junk)
  shape = draw(st.lists(dims, max_size=MAX_RANK + 3))
  if draw(st.booleans()) and dtype in ALLOWED_DTYPES:  # often a consistent frame, so decoding succeeds too
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize + draw(st.sampled_from([0, 0, 0, -1, 1]))
    data = draw(st.binary(min_size=max(n, 0), max_size=max(n, 0)))
  else: data = draw(st.binary(max_size=64))
  return pb.TensorProto(data=data, dtype=dtype, shape=shape)

@settings(max_examples=2000, deadline=None)
@given(tensors(), st.one_of(st.none(), st.integers(-2, 8)), st.one_of(st.none(), st.integers(-1, 2**64)))
def test_decode_arbitrary_frames_decodes_or_raises_frame_error(t, hidden_size, max_elements):
  t = pb.TensorProto.FromString(t.SerializeToString())  # as it arrives off the wire
  try: out = decode_tensor(t, hidden_size=hidden_size, max_elements=max_elements)
  except FrameError as e: return assert_one_line(e)
  assert out.dtype == np.float32 and list(out.shape) == list(t.shape) and out.size * np.dtype(t.dtype).itemsize == len(t.data)
  assert hidden_size is None or out.shape[-1] == hidden_size
  assert max_elements is None or out.size <= max_elements

def assert_one_line(e: Exception) -> None: assert str(e) and "\n" not in str(e)
