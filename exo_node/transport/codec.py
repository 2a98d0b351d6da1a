"""numpy <-> TensorProto. Frames come from the network, so decoding checks everything before it allocates:
a bad frame is a FrameError for that stream, never a crash or a huge allocation."""
from __future__ import annotations
from typing import Iterable
import numpy as np
from exo_node.errors import ExoError
from exo_node.transport.pb import exo_node_pb2 as pb

ALLOWED_DTYPES = {"float16", "float32"}
MAX_RANK = 8  # hidden states are (seq, dim) or (batch, seq, dim); numpy itself stops at 64


class FrameError(ExoError):
  """A frame from a peer is malformed; the stream that carried it is refused."""


def encode_tensor(a: np.ndarray) -> pb.TensorProto:
  """Raw little-endian bytes; copies only when `a` is non-contiguous or big-endian, plus the one copy into bytes."""
  if a.dtype.name not in ALLOWED_DTYPES: raise FrameError(f"cannot send a {a.dtype.name} tensor (allowed: {', '.join(sorted(ALLOWED_DTYPES))})")
  a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
  return pb.TensorProto(data=a.tobytes(), dtype=a.dtype.name, shape=a.shape)


def decode_tensor(t: pb.TensorProto, hidden_size: int | None = None, max_elements: int | None = None) -> np.ndarray:
  """A fresh float32 array (fp16 is upcast) that owns its memory, so the frame can be freed."""
  if t.dtype not in ALLOWED_DTYPES: raise FrameError(f"tensor dtype {t.dtype[:32]!r} not allowed (allowed: {', '.join(sorted(ALLOWED_DTYPES))})")
  if not 1 <= len(t.shape) <= MAX_RANK: raise FrameError(f"tensor rank {len(t.shape)} outside [1, {MAX_RANK}]")
  if any(d <= 0 for d in t.shape): raise FrameError(f"tensor shape {list(t.shape)} has a dimension <= 0")
  dt = np.dtype(t.dtype).newbyteorder("<")
  # the element count with Python ints, stopping once past a bound: no overflow, no big numbers for absurd shapes
  n, cap = 1, len(t.data) // dt.itemsize if max_elements is None else max_elements
  for d in t.shape:
    if (n := n * d) > cap: break
  if max_elements is not None and n > max_elements: raise FrameError(f"tensor shape {list(t.shape)} exceeds the limit of {max_elements} elements")
  if n * dt.itemsize != len(t.data): raise FrameError(f"tensor shape {list(t.shape)} of {t.dtype} does not match its {len(t.data)} bytes of data")
  if hidden_size is not None and t.shape[-1] != hidden_size: raise FrameError(f"tensor last dimension is {t.shape[-1]}, expected hidden size {hidden_size}")
  return np.frombuffer(t.data, dtype=dt).reshape(tuple(t.shape)).astype(np.float32)


def decode_tokens(ids: Iterable[int], vocab_size: int) -> np.ndarray:
  """int64 token ids, each in [0, vocab_size)."""
  a = np.fromiter(ids, dtype=np.int64)
  if a.size == 0: raise FrameError("empty token id list")
  if (bad := (a < 0) | (a >= vocab_size)).any(): raise FrameError(f"token id {int(a[bad.argmax()])} outside the vocabulary [0, {vocab_size})")
  return a

