"""load_shard: open a model (GGUF file, HF folder or registered name) and realize only blocks [start, end)."""
from __future__ import annotations
import logging, time
from pathlib import Path
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType, _to_np_dtype
from exo_node.errors import ModelError
from exo_node.model import host_io, kernels
from exo_node.model.gguf import GGUFWeights
from exo_node.model.llama import Block, ShardModel
from exo_node.model.random_weights import RandomWeights, is_random
from exo_node.model.registry import resolve
from exo_node.model.safetensors import SafetensorsWeights

log = logging.getLogger(__name__)
BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
OPTIONAL_TENSORS = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_q_norm.weight", "attn_k_norm.weight")
Weights = GGUFWeights | SafetensorsWeights | RandomWeights
WDTYPE = dtypes.half  # on every backend: decode streams the weights, and on the CPU kernels.matmul_t widens them in registers
VECTORS = ("norm", "bias")  # block tensors that are not matrices


def open_weights(model: str | Path) -> Weights:
  if is_random(str(model)): return RandomWeights(str(model))
  path = resolve(str(model))
  return SafetensorsWeights(path) if path.is_dir() else GGUFWeights(path)


def load_shard(model: str | Path | Weights, start: int, end: int, device: str | None = None, max_context: int = 4096,
               wdtype: DType | None = None, kv_dtype: DType | None = None) -> ShardModel:
  """kv_dtype: the KV cache's (default: fp32 on a CPU, else the weights')."""
  w = model if isinstance(model, Weights) else open_weights(model)
  cfg = w.config
  if not 0 <= start < end <= cfg.n_layers: raise ModelError(f"bad layer range [{start}, {end}) for a {cfg.n_layers}-layer model")
  dev = device or Tensor.empty(1).device
  wdtype = wdtype or WDTYPE

  def get(name: str, dtype: DType = wdtype) -> Tensor:
    """Host values are copied straight in; the rest is realized with its block, one scheduling pass per block."""
    if not w.has(name): raise ModelError(f"missing tensor {name}")
    if np.dtype(npd := _to_np_dtype(dtype)).itemsize == dtype.itemsize and (a := w.host(name)) is not None:
      return host_io.upload(a.astype(npd), dtype, dev)
    return w.load(name, dev).cast(dtype).contiguous()

  def matrix(name: str) -> Tensor:
    """A weight matrix, packed for the CPU kernel where it takes it."""
    return kernels.pack(t) if kernels.packs(t := get(name)) else t

  t0, blocks = time.monotonic(), []
  for i in range(start, end):
    names = [f"{n}.weight" for n in BLOCK_TENSORS] + [n for n in OPTIONAL_TENSORS if w.has(f"blk.{i}.{n}")]
    blocks.append(Block(cfg, {n: get(f"blk.{i}.{n}", dtypes.float32) if any(v in n for v in VECTORS) else matrix(f"blk.{i}.{n}") for n in names}))
    Tensor.realize(*blocks[-1].w.values())
    log.info("loaded block %d/%d (layers %d..%d)", i - start + 1, end - start, start, end - 1)
  embed = None if start else w.host("token_embd.weight")
  if start == 0 and embed is None: embed = w.load("token_embd.weight", dev).cast(dtypes.float32).numpy()
  norm = head = None
  if end == cfg.n_layers:
    norm, head = get("output_norm.weight", dtypes.float32), matrix("output.weight" if w.has("output.weight") else "token_embd.weight")
    Tensor.realize(norm, head)
  log.info("shard [%d, %d) of %s ready in %.1fs", start, end, cfg.arch, time.monotonic() - t0)
  return ShardModel(cfg, start, end, blocks, embed, norm, head, min(max_context, cfg.context_length), kv_dtype)


def open_tokenizer(w: Weights):
  """None for random weights: their prompts are token ids."""
  from exo_node.model.tokenizer import Tokenizer
  if isinstance(w, RandomWeights): return None
  return Tokenizer.from_hf_folder(w.folder) if isinstance(w, SafetensorsWeights) else Tokenizer.from_gguf_meta(w.file.meta)


def layer_nbytes(w: Weights) -> int:
  c = w.config
  params = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim + 3 * c.dim * c.ffn_dim
  return params * WDTYPE.itemsize
