"""Model hyperparameters, read from GGUF metadata or a Hugging Face config.json into one dataclass."""
from __future__ import annotations
import math
from dataclasses import dataclass, field
from typing import Any
import numpy as np
from exo_node.errors import ModelError

ARCHS = ("llama", "qwen2", "qwen3")
_HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass(frozen=True)
class ModelConfig:
  arch: str
  n_layers: int
  dim: int
  ffn_dim: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  vocab_size: int
  norm_eps: float
  rope_theta: float
  context_length: int
  rope_scaling: dict[str, Any] | None = None  # HF llama3-style scaling
  rope_factors: tuple[float, ...] | None = field(default=None, repr=False)  # GGUF rope_freqs.weight

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies, with Llama 3 scaling applied when the model asks for it."""
    inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
    if self.rope_factors is not None: return (inv / np.asarray(self.rope_factors, dtype=np.float64)).astype(np.float32)
    s = self.rope_scaling or {}
    if s.get("rope_type", s.get("type")) == "llama3":
      factor, lo, hi, orig = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0), s["original_max_position_embeddings"]
      wavelen = 2 * math.pi / inv
      smooth = np.clip((orig / wavelen - lo) / (hi - lo), 0.0, 1.0)
      inv = np.where(wavelen > orig / lo, inv / factor, np.where(wavelen < orig / hi, inv, (1 - smooth) * inv / factor + smooth * inv))
    elif s.get("rope_type", s.get("type")) not in (None, "default"):
      raise ModelError(f"unsupported rope scaling: {s.get('rope_type', s.get('type'))}")
    return inv.astype(np.float32)


def _need(d: dict[str, Any], key: str, where: str) -> Any:
  if key not in d: raise ModelError(f"missing model metadata {key!r} in {where}")
  return d[key]


def from_gguf_meta(meta: dict[str, Any], rope_factors: tuple[float, ...] | None, where: str) -> ModelConfig:
  arch = _need(meta, "general.architecture", where)
  if arch not in ARCHS: raise ModelError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHS)})")
  g = lambda k: _need(meta, f"{arch}.{k}", where)
  n_heads, dim = g("attention.head_count"), g("embedding_length")
  n_kv = meta.get(f"{arch}.attention.head_count_kv", n_heads)
  return ModelConfig(arch=arch, n_layers=g("block_count"), dim=dim, ffn_dim=g("feed_forward_length"), n_heads=n_heads,
                     n_kv_heads=n_kv, head_dim=meta.get(f"{arch}.attention.key_length", dim // n_heads),
                     vocab_size=meta.get(f"{arch}.vocab_size") or len(_need(meta, "tokenizer.ggml.tokens", where)),
                     norm_eps=g("attention.layer_norm_rms_epsilon"), rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
                     context_length=g("context_length"), rope_factors=rope_factors)


def from_hf_config(cfg: dict[str, Any], where: str) -> ModelConfig:
  mt = cfg.get("model_type")
  if mt not in _HF_ARCHS: raise ModelError(f"unsupported architecture {mt!r} (supported: {', '.join(_HF_ARCHS)})")
  g = lambda k: _need(cfg, k, where)
  n_heads, dim = g("num_attention_heads"), g("hidden_size")
  params = cfg.get("rope_parameters") or {}  # transformers 5 moved theta/scaling here
  scaling = cfg.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
  return ModelConfig(arch=_HF_ARCHS[mt], n_layers=g("num_hidden_layers"), dim=dim, ffn_dim=g("intermediate_size"),
                     n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                     head_dim=cfg.get("head_dim") or dim // n_heads, vocab_size=g("vocab_size"), norm_eps=g("rms_norm_eps"),
                     rope_theta=cfg.get("rope_theta", params.get("rope_theta", 10000.0)),
                     context_length=cfg.get("max_position_embeddings", 4096), rope_scaling=scaling)
