"""The shard model: blocks [start, end) of a Llama-family transformer (Llama 2/3, SmolLM2, Qwen2, Qwen3).
The first shard embeds tokens (on the host, one row per token); the last applies the final norm and head."""
from __future__ import annotations
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import DType
from exo_node.device import is_cpu
from exo_node.model import host_io, kernels
from exo_node.model.config import ModelConfig

MAX_ROWS = 64  # rows of a step that kernels.scores/attend take (--max-batch is at most 16, a CPU chunk 8)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
  return (x * (x.square().mean(-1, keepdim=True) + eps).rsqrt()) * w


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
  """Grouped-query attention with the softmax realized on its own: fused into the product with V (tinygrad's
  scaled_dot_product_attention), every output lane recomputed the exps, which made it the slowest kernel of a step."""
  k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
  scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
  return (scores if mask is None else scores + mask).softmax(-1).contiguous() @ v


def linear(x: Tensor, w: Tensor) -> Tensor: return kernels.matmul_t(x, w) if kernels.is_packed(w) else x.matmul(w.T)


@dataclass
class Row:
  """One request's rows in a step: its KV cache (one buffer per block of the shard) and where they start."""
  kv: list[Tensor]
  start_pos: int | UOp


@dataclass
class Span:
  """What the blocks of a step share: every row attends over the first `length` cache positions (the longest
  row's), masked past its own; the rotary angles of all rows at once."""
  length: int | UOp
  mask: Tensor | None
  cos: Tensor
  sin: Tensor
  counts: Tensor | None = None  # each row's (or chunk position's) length, in a buffer, for kernels.scores/attend (CPU)


@dataclass
class Block:
  cfg: ModelConfig
  w: dict[str, Tensor]  # canonical names without the "blk.N." prefix

  def lin(self, name: str, x: Tensor) -> Tensor:
    y = linear(x, self.w[f"{name}.weight"])
    return y + self.w[f"{name}.bias"] if f"{name}.bias" in self.w else y

  def __call__(self, x: Tensor, rows: list[Row], i: int, span: Span) -> Tensor:
    """x: (B, T, dim), row b belonging to rows[b]'s request; i: this block's place in the shard (its KV buffer in
    every row). The projections and the attention run once for all rows."""
    c, (B, T, _) = self.cfg, x.shape
    h = rms_norm(x, self.w["attn_norm.weight"], c.norm_eps)
    q = self.lin("attn_q", h).reshape(B, T, c.n_heads, c.head_dim)
    k = self.lin("attn_k", h).reshape(B, T, c.n_kv_heads, c.head_dim)
    v = self.lin("attn_v", h).reshape(B, T, c.n_kv_heads, c.head_dim)
    if "attn_q_norm.weight" in self.w:
      q, k = rms_norm(q, self.w["attn_q_norm.weight"], c.norm_eps), rms_norm(k, self.w["attn_k_norm.weight"], c.norm_eps)
    attn = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rows, i, span)
    x = x + self.lin("attn_output", attn.transpose(1, 2).reshape(B, T, -1))
    h = rms_norm(x, self.w["ffn_norm.weight"], c.norm_eps)
    return (x + self.lin("ffn_down", self.lin("ffn_gate", h).silu() * self.lin("ffn_up", h))).contiguous()

  def cache(self, flat: Tensor) -> Tensor: return flat.reshape(2, 1, self.cfg.n_kv_heads, -1, self.cfg.head_dim)  # K|V, row, head, pos

  def attend(self, q: Tensor, k: Tensor, v: Tensor, rows: list[Row], i: int, s: Span) -> Tensor:
    """Each row's new K/V goes into its own cache at its own position; then one attention over all rows."""
    q, k, T = rope(q, s.cos, s.sin), rope(k, s.cos, s.sin), q.shape[2]
    caches = [self.cache(r.kv[i]) for r in rows]
    for b, (r, kv) in enumerate(zip(rows, caches)):
      kv[:, :, :, r.start_pos:r.start_pos + T, :].assign(Tensor.stack(k[b:b + 1], v[b:b + 1]).cast(kv.dtype)).realize()
    if s.counts is not None:  # on a CPU: our kernels, straight from each row's cache; a chunk's positions act as rows
      (B, H, _, D), n_kv = q.shape, self.cfg.n_kv_heads
      flat = [r.kv[i] for r in rows] if T == 1 else [rows[0].kv[i]] * T
      q = q.reshape(B, H, D) if T == 1 else q[0].transpose(0, 1)
      sc = kernels.scores(q, flat, s.counts, n_kv) if T == 1 else kernels.chunk_scores(q, flat[0], s.counts, n_kv)
      out = kernels.attend(sc, flat, s.counts, n_kv)
      return out.reshape(B, H, 1, D) if T == 1 else out.transpose(0, 1).reshape(1, H, T, D)
    keys, values = (Tensor.cat(*(kv[j, :, :, 0:s.length, :] for kv in caches)).cast(q.dtype) for j in (0, 1))
    if len(rows) > 1: keys, values = keys.contiguous(), values.contiguous()  # one copy, not a gather inside the products
    # a decode step's query is realized first: fused into tinygrad's score product, its rotation was recomputed at every
    # cache position (CPU, before our kernels: 8 rows at span 20 14.8 -> 13.7 ms). A prefill chunk's fused product is
    # the faster one (64 tokens: 133 against 177 ms)
    return attention(q.contiguous() if T == 1 else q, keys, values, s.mask)


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
    self.kv_dtype = kv_dtype or (dtypes.float32 if is_cpu(self.device) else
                                 (blocks[0].w["attn_k.weight"] if blocks else head).dtype)
    angles = np.outer(np.arange(2 * max_context, dtype=np.float32), cfg.inv_freq())
    self.cos, self.sin = (Tensor(f, device=self.device).realize()
                          for f in (np.cos(angles), np.sin(angles)))
    # positions for the causal mask: tinygrad's arange (and so triu) is a cumsum, a span x span reduce in every step
    self.positions = Tensor(np.arange(2 * max_context, dtype=np.int32), device=self.device).realize()
    # the lengths a step's rows (or a chunk's positions) attend over, for kernels.scores/attend: set before each step
    self.counts = host_io.upload(np.ones(MAX_ROWS, np.int32), dtypes.int32, self.device) \
      if kernels.scores_apply(self.device, cfg.head_dim) and self.kv_dtype == dtypes.float32 else None

  def set_counts(self, starts: list[int]) -> None:
    if self.counts is not None: host_io.write(self.counts, self.count_values(starts))

  def count_values(self, starts: list[int]) -> np.ndarray:
    """What set_counts writes, for a caller that writes it raw (model/gate.py)."""
    assert len(starts) <= MAX_ROWS, f"a step takes at most {MAX_ROWS} rows"
    return np.array([p + 1 for p in starts] + [1] * (MAX_ROWS - len(starts)), np.int32)

  @property
  def is_first(self) -> bool: return self.start == 0
  @property
  def is_last(self) -> bool: return self.end == self.cfg.n_layers

  def new_cache(self, pad: int = 0) -> list[Tensor]:
    """One buffer per block (a single buffer for all blocks makes every cache write touch all of them), flat (a
    flat buffer is what TinyJit checks fastest, on every call, for every input); Block.cache gives it its shape."""
    c = self.cfg
    if self.counts is not None: pad = max(pad, kernels.PAD)  # kernels.scores and attend read whole blocks of positions
    n = 2 * c.n_kv_heads * (self.max_context + pad) * c.head_dim
    return [host_io.zeros(n, self.kv_dtype, self.device) for _ in self.blocks]

  def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
    return self.embed[ids]

  def __call__(self, x: Tensor, rows: list[Row], n: int | UOp = 1, span: int | UOp | None = None) -> Tensor:
    """x: (B, T, dim) with row b for rows[b]; it holds n real positions (the rest is padding, written to the cache
    past them and overwritten later). span: how many cache positions to attend over, at least the longest row's
    start_pos + T (default: the first row's). Returns the hidden state, or each row's logits at position n-1 (B, vocab)."""
    T = x.shape[1]
    span = rows[0].start_pos + T if span is None else span
    keys = self.positions[0:span].reshape(1, 1, 1, span)
    mask = None if len(rows) == 1 and T == 1 else Tensor.cat(*(
      (keys > (self.positions[0:T] + r.start_pos).reshape(1, 1, T, 1)).where(float("-inf"), 0.0).cast(x.dtype) for r in rows))
    angles = lambda f: Tensor.cat(*(f[r.start_pos:r.start_pos + T].reshape(1, 1, T, -1) for r in rows))
    s = Span(span, mask, angles(self.cos), angles(self.sin), self.counts if T == 1 or len(rows) == 1 else None)
    for i, blk in enumerate(self.blocks): x = blk(x, rows, i, s)
    if not self.is_last: return x
    return linear(rms_norm(x[:, n - 1, :], self.norm, self.cfg.norm_eps), self.head)
