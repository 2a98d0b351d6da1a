"""Host dequantization of GGUF blocks against llama.cpp's own Python package (gguf.quants)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as llama_cpp_dequantize
from exo_node.model.gguf import GGML_TYPES, HOST_TYPES, dequantize


def random_blocks(type_id: int, n_blocks: int = 64) -> np.ndarray:
  """Random quants with finite fp16 scales (random bytes would make some of them inf or NaN)."""
  name, per_block, block = GGML_TYPES[type_id]
  rng = np.random.default_rng(type_id)
  if per_block == 1:
    vals = rng.standard_normal(n_blocks * 32).astype(np.float32)
    return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8) if name == "BF16" else \
      vals.astype(np.float32 if name == "F32" else np.float16).view(np.uint8)
  raw = rng.integers(0, 256, size=(n_blocks, block), dtype=np.uint8)
  raw[:, 0:2] = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
  if name == "Q4_1": raw[:, 2:4] = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
  return raw.reshape(-1)


@pytest.mark.parametrize("type_id", [t for t, (name, _, _) in GGML_TYPES.items() if name in HOST_TYPES], ids=lambda t: GGML_TYPES[t][0])
def test_host_dequantization_matches_llama_cpp(type_id):
  raw = random_blocks(type_id)
  ours = dequantize(raw, type_id)
  assert ours.dtype == np.float32 and ours.size == 64 * 32 and np.isfinite(ours).all()
  np.testing.assert_array_equal(ours, llama_cpp_dequantize(raw, GGMLQuantizationType(type_id)).reshape(-1))
