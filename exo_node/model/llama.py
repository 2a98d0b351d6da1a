"""The shard model: blocks [start, end) of a Llama-family transformer (Llama 2/3, SmolLM2, Qwen2, Qwen3).
The first shard embeds tokens (on the host, one row per token); the last applies the final norm and head."""
from __future__ import annotations
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import DType
from exo_node.model import kernels
from exo_node.model.config import ModelConfig


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
  return (x * (x.square().mean(-1, keepdim=True) + eps).rsqrt()) * w


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def linear(x: Tensor, w: Tensor) -> Tensor: return kernels.matmul_t(x, w) if kernels.fits(x, w) else x.matmul(w.T)


@dataclass
class Row:
  """One request's rows in a step: its KV cache (one buffer per block of the shard) and where they start."""
  kv: list[Tensor]
  start_pos: int | UOp
  cos: Tensor | None = None
  sin: Tensor | None = None


@dataclass
class Block:
  cfg: ModelConfig
  w: dict[str, Tensor]  # canonical names without the "blk.N." prefix

  def lin(self, name: str, x: Tensor) -> Tensor:
    y = linear(x, self.w[f"{name}.weight"])
    return y + self.w[f"{name}.bias"] if f"{name}.bias" in self.w else y

  def __call__(self, x: Tensor, rows: list[Row], i: int) -> Tensor:
    """x: (B, T, dim), row b belonging to rows[b]'s request; i: this block's place in the shard (its KV buffer in
    every row). The projections run once for all rows."""
    c, (B, T, _) = self.cfg, x.shape
    h = rms_norm(x, self.w["attn_norm.weight"], c.norm_eps)
    q = self.lin("attn_q", h).reshape(B, T, c.n_heads, c.head_dim)
    k = self.lin("attn_k", h).reshape(B, T, c.n_kv_heads, c.head_dim)
    v = self.lin("attn_v", h).reshape(B, T, c.n_kv_heads, c.head_dim)
    if "attn_q_norm.weight" in self.w:
      q, k = rms_norm(q, self.w["attn_q_norm.weight"], c.norm_eps), rms_norm(k, self.w["attn_k_norm.weight"], c.norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    parts = [self.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], r, r.kv[i]) for b, r in enumerate(rows)]
    attn = (parts[0] if B == 1 else parts[0].cat(*parts[1:])).transpose(1, 2).reshape(B, T, -1)
    x = x + self.lin("attn_output", attn)
    h = rms_norm(x, self.w["ffn_norm.weight"], c.norm_eps)
    return (x + self.lin("ffn_down", self.lin("ffn_gate", h).silu() * self.lin("ffn_up", h))).contiguous()

  def attend(self, q: Tensor, k: Tensor, v: Tensor, r: Row, kv: Tensor) -> Tensor:
    T, p = q.shape[2], r.start_pos
    q, k = rope(q, r.cos, r.sin), rope(k, r.cos, r.sin)
    kv[:, :, :, p:p + T, :].assign(Tensor.stack(k, v).cast(kv.dtype)).realize()
    keys, values = (kv[j, :, :, 0:p + T, :].cast(q.dtype) for j in (0, 1))
    mask = Tensor.full((1, 1, T, p + T), float("-inf"), dtype=q.dtype).triu(p + 1) if T > 1 else None
    return q.scaled_dot_product_attention(keys, values, attn_mask=mask, enable_gqa=True)


class ShardModel:
  """Runs blocks [start, end). Input: embedded tokens (first shard) or a hidden state, shape (B, T, dim).
  Output: the hidden state, or the last position's logits (B, vocab) on the last shard."""

  def __init__(self, cfg: ModelConfig, start: int, end: int, blocks: list[Block], embed: np.ndarray | None,
               norm: Tensor | None, head: Tensor | None, max_context: int, kv_dtype: DType | None = None):
    self.cfg, self.start, self.end, self.blocks = cfg, start, end, blocks
    self.embed, self.norm, self.head = embed, norm, head
    self.device = (blocks[0].w["attn_norm.weight"] if blocks else head).device
    # the cache follows the weights unless told, except on the CPU: attention there runs on tinygrad's own kernels,
    # and fp16 K/V would cost clang's scalar fp16 conversions on every step
    self.max_context = max_context
    self.kv_dtype = kv_dtype or (dtypes.float32 if self.device.split(":")[0] == "CPU" else
                                 (blocks[0].w["attn_k.weight"] if blocks else head).dtype)
    angles = np.outer(np.arange(2 * max_context, dtype=np.float32), cfg.inv_freq())
    self.cos, self.sin = (Tensor(f, device=self.device).realize()
                          for f in (np.cos(angles), np.sin(angles)))

  @property
  def is_first(self) -> bool: return self.start == 0
  @property
  def is_last(self) -> bool: return self.end == self.cfg.n_layers

  def new_cache(self, batch: int = 1, pad: int = 0) -> list[Tensor]:
    """One buffer per block: a single buffer for all blocks makes every cache write touch all of them."""
    c = self.cfg
    return [Tensor.zeros(2, batch, c.n_kv_heads, self.max_context + pad, c.head_dim, dtype=self.kv_dtype,
                         device=self.device).contiguous().realize() for _ in self.blocks]

  def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
    return self.embed[ids]

  def __call__(self, x: Tensor, rows: list[Row], n: int | UOp = 1) -> Tensor:
    """x: (B, T, dim) with row b for rows[b]; it holds n real positions (the rest is padding, written to the cache
    past them and overwritten later). Returns the hidden state, or each row's logits at position n-1 (B, vocab)."""
    T = x.shape[1]
    for r in rows: r.cos, r.sin = (f[r.start_pos:r.start_pos + T].reshape(1, 1, T, -1) for f in (self.cos, self.sin))
    for i, blk in enumerate(self.blocks): x = blk(x, rows, i)
    if not self.is_last: return x
    return linear(rms_norm(x[:, n - 1, :], self.norm, self.cfg.norm_eps), self.head)
