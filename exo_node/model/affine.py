"""Block-affine uint8 weights: w = q * scale + offset per group of 32 columns. GGUF Q4_0, Q4_1 and Q8_0 blocks map
onto this exactly, so a CPU shard holds 1.25 bytes per weight instead of 4 (fp32) with the same numbers; clang's fp16
conversions are too slow to halve the bytes that way. Measured on SmolLM2, 2 cores: 137 ms/token against 150 fp32."""
from __future__ import annotations
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, dtypes

GROUP = 32
_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}  # Q4_0, Q4_1, Q8_0: 32 weights per block


@dataclass
class Affine:
  q: Tensor       # (rows, cols) uint8
  scale: Tensor   # (rows, cols // GROUP) float32
  offset: Tensor  # (rows, cols // GROUP) float32

  @property
  def shape(self) -> tuple[int, ...]: return self.q.shape
  @property
  def device(self) -> str: return self.q.device
  @property
  def dtype(self): return self.scale.dtype

  def matmul_t(self, x: Tensor) -> Tensor:
    """x @ w.T as sum_g scale_g * (x_g . q_g) + offset_g * sum(x_g): per weight one cast and one multiply-add."""
    r, c = self.q.shape
    xg = x.reshape(*x.shape[:-1], 1, c // GROUP, GROUP)
    dots = (xg * self.q.reshape(r, c // GROUP, GROUP).cast(dtypes.float32)).sum(-1)
    return (dots * self.scale).sum(-1) + (xg.sum(-1) * self.offset).sum(-1)

  def nbytes(self) -> int: return self.q.nbytes() + self.scale.nbytes() + self.offset.nbytes()

  def map_rows(self, f) -> Affine: return Affine(*(f(t).contiguous() for t in (self.q, self.scale, self.offset)))


def is_affine(ggml_type: int, shape: tuple[int, ...]) -> bool: return ggml_type in _BLOCK_BYTES and len(shape) == 2


def ggml_affine(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(q, scale, offset) of a GGUF tensor whose type is block-affine with 32-weight blocks (see is_affine)."""
  b = raw.reshape(-1, _BLOCK_BYTES[ggml_type])
  d = b[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
  if ggml_type == 8: q, off = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), -128 * d
  else:
    nib = b[:, 2:] if ggml_type == 2 else b[:, 4:]
    q = np.concatenate([nib & 15, nib >> 4], axis=1)  # ggml: low nibbles are weights 0..15, high ones 16..31
    off = -8 * d if ggml_type == 2 else b[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
  rows, cols = shape
  return q.reshape(rows, cols), d.reshape(rows, cols // GROUP), off.reshape(rows, cols // GROUP)
