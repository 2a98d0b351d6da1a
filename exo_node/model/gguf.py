"""GGUF reading by offset: the header is parsed once from an mmap, tensor bytes are touched only
when a shard asks for them, so a node holds only its own layers."""
from __future__ import annotations
import mmap, struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
import numpy as np
from exo_node.errors import ModelError
if TYPE_CHECKING: from tinygrad import Tensor  # imported where used: parsing a file needs no tinygrad

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
  0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
  12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # row-major, outermost first (GGUF stores dims innermost first)
  ggml_type: int
  offset: int  # absolute, in bytes
  nbytes: int

  @property
  def numel(self) -> int: return int(np.prod(self.shape))


class _Reader:
  def __init__(self, buf: memoryview): self.buf, self.pos = buf, 0

  def take(self, n: int) -> memoryview:
    if self.pos + n > len(self.buf): raise ModelError("corrupt GGUF: header runs past the end of the file (truncated?)")
    out = self.buf[self.pos:self.pos + n]; self.pos += n
    return out

  def scalar(self, fmt: str) -> Any: return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
  def string(self) -> str: return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

  def value(self, typ: int) -> Any:
    if typ in _SCALARS: return self.scalar(_SCALARS[typ])
    if typ == _STRING: return self.string()
    if typ == _ARRAY:
      sub, n = self.scalar("<I"), self.scalar("<Q")
      if sub in _SCALARS and sub != 7:  # fast path for big numeric arrays (token types, scores)
        return np.frombuffer(self.take(n * struct.calcsize(_SCALARS[sub])), dtype=_SCALARS[sub]).tolist()
      return [self.value(sub) for _ in range(n)]
    raise ModelError(f"corrupt GGUF: unknown metadata value type {typ}")


class GGUFFile:
  """Metadata and tensor index of one GGUF file; `raw(name)` returns the tensor's bytes without copying."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    try: f: BinaryIO = open(self.path, "rb")
    except OSError as e: raise ModelError(f"cannot open model file {self.path}: {e.strerror}") from None
    with f:
      if f.read(4) != b"GGUF": raise ModelError(f"not a GGUF file (bad magic): {self.path}")
      self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = _Reader(memoryview(self._mm)); r.take(4)
    version, n_tensors, n_kv = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    if version not in (2, 3): raise ModelError(f"unsupported GGUF version {version}: {self.path}")
    self.meta: dict[str, Any] = {}
    for _ in range(n_kv):
      key = r.string(); self.meta[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
      name = r.string(); dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
      infos.append((name, tuple(reversed(dims)), r.scalar("<I"), r.scalar("<Q")))
    align = self.meta.get("general.alignment", 32)
    data_start = -(-r.pos // align) * align
    self.tensors: dict[str, TensorInfo] = {}
    for name, shape, typ, off in infos:
      if typ not in GGML_TYPES: raise ModelError(f"unsupported GGUF quant type id {typ} in tensor {name}")
      _, per_block, block_bytes = GGML_TYPES[typ]
      nbytes = int(np.prod(shape)) // per_block * block_bytes
      if data_start + off + nbytes > len(self._mm): raise ModelError(f"corrupt GGUF: tensor {name} runs past the end of the file (truncated?)")
      self.tensors[name] = TensorInfo(name, shape, typ, data_start + off, nbytes)
    self.bytes_read = 0  # tensor bytes handed out, to prove a shard only touches its own layers

  def raw(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    self.bytes_read += info.nbytes
    return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
  """float32 values of the formats in HOST_TYPES, vectorized on the host: a tinygrad dequantization graph per tensor
  costs a scheduling pass and a command-queue compile (SmolLM2: 7 s of a 10 s load, against ~1 s here)."""
  name, _, block = GGML_TYPES[ggml_type]
  if name == "F32": return raw.view(np.float32)
  if name == "F16": return raw.view(np.float16).astype(np.float32)
  if name == "BF16": return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  b = raw.reshape(-1, block)
  d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # one fp16 scale per block of 32
  if name == "Q8_0": return (d * b[:, 2:].copy().view(np.int8)).reshape(-1)
  qs = b[:, -16:]
  q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # low nibbles are the first 16 values
  if name == "Q4_0": return (d * (q - 8)).reshape(-1)
  return (d * q + b[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(-1)  # Q4_1: scale and minimum


HOST_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")  # the K-quants go through tinygrad's dequantization


def _unpermute(w: "Tensor | np.ndarray", n_heads: int) -> "Tensor | np.ndarray":
  """llama.cpp stores Llama q/k rows interleaved for its RoPE; restore the half-split layout of the HF weights."""
  shape = w.shape
  w = w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
  return (w.swapaxes(1, 2) if isinstance(w, np.ndarray) else w.transpose(1, 2)).reshape(shape)


class GGUFWeights:
  """A model in one GGUF file. Tensor names are the GGUF names, which are our canonical ones."""

  def __init__(self, path: str | Path):
    from exo_node.model.config import from_gguf_meta
    self.file = GGUFFile(path)
    factors = self.file.tensors.get("rope_freqs.weight")
    rope_factors = tuple(np.frombuffer(self.file.raw(factors.name), np.float32).tolist()) if factors else None
    self.config = from_gguf_meta(self.file.meta, rope_factors, str(path))

  def has(self, name: str) -> bool: return name in self.file.tensors

  @property
  def bytes_read(self) -> int: return self.file.bytes_read

  def host(self, name: str) -> np.ndarray | None:
    """float32 on the host where numpy can dequantize it, else None (load() then dequantizes on the device)."""
    info = self.file.tensors[name]
    if GGML_TYPES[info.ggml_type][0] not in HOST_TYPES: return None
    return self._fix_rows(name, dequantize(self.file.raw(name), info.ggml_type).reshape(info.shape))

  def load(self, name: str, device: str) -> "Tensor":
    from tinygrad import Tensor
    from tinygrad.llm.gguf import ggml_data_to_tensor
    info = self.file.tensors[name]
    t = ggml_data_to_tensor(Tensor(self.file.raw(name), device=device), info.numel, info.ggml_type).reshape(info.shape)
    return self._fix_rows(name, t)

  def _fix_rows(self, name: str, t: "Tensor | np.ndarray") -> "Tensor | np.ndarray":
    if self.config.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
      return _unpermute(t, self.config.n_heads if "attn_q" in name else self.config.n_kv_heads)
    return t
