"""A Hugging Face model folder: config.json, tokenizer.json and model*.safetensors (sharded via the index
file or not). Tensors are read by offset from an mmap and renamed to the canonical GGUF names."""
from __future__ import annotations
import json, mmap, re
from pathlib import Path
from typing import TYPE_CHECKING
import numpy as np
from exo_node.errors import ModelError
from exo_node.model.config import from_hf_config
if TYPE_CHECKING: from tinygrad import Tensor  # imported where used: parsing a file needs no tinygrad

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def canonical_name(hf: str) -> str | None:
  if hf in _TOP: return _TOP[hf]
  m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
  if m and m.group(2) in _LAYER: return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
  return None


class SafetensorsWeights:
  def __init__(self, folder: str | Path):
    self.folder = Path(folder)
    try: cfg = json.loads((self.folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e: raise ModelError(f"cannot read {self.folder / 'config.json'}: {e}") from None
    self.config = from_hf_config(cfg, str(self.folder / "config.json"))
    index = self.folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
      sorted(p.name for p in self.folder.glob("model*.safetensors"))
    if not files: raise ModelError(f"no model*.safetensors in {self.folder}")
    self._index: dict[str, tuple[mmap.mmap, str, tuple[int, ...], int, int]] = {}
    for fn in files:
      with open(self.folder / fn, "rb") as f: mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      n = int.from_bytes(mm[:8], "little")
      try: header = json.loads(mm[8:8 + n])
      except (json.JSONDecodeError, UnicodeDecodeError): raise ModelError(f"corrupt safetensors header in {fn}") from None
      for hf, v in header.items():
        if hf == "__metadata__" or (name := canonical_name(hf)) is None: continue
        if v["dtype"] not in _DTYPES: raise ModelError(f"unsupported safetensors dtype {v['dtype']} in tensor {hf}")
        start, end = v["data_offsets"]
        self._index[name] = (mm, v["dtype"], tuple(v["shape"]), 8 + n + start, end - start)
    self.bytes_read = 0

  def has(self, name: str) -> bool: return name in self._index

  def host(self, name: str) -> np.ndarray:
    mm, dtype, shape, off, nbytes = self._index[name]
    self.bytes_read += nbytes
    a = np.frombuffer(mm, dtype=_DTYPES[dtype], count=nbytes // np.dtype(_DTYPES[dtype]).itemsize, offset=off).reshape(shape)
    return (a.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else a.astype(np.float32)

  def load(self, name: str, device: str) -> "Tensor":
    from tinygrad import Tensor
    return Tensor(self.host(name), device=device)
