"""Models of a known shape with random weights (`--model random:llama-1b`): benchmarks on any device without a
weight file. Each tensor is drawn from tinygrad's counter-based RNG on the node's own device, seeded by its name,
so every node draws the same weights for a layer and only ever draws its own layers. They have no tokenizer:
prompts are token ids."""
from __future__ import annotations
import math, zlib
from typing import TYPE_CHECKING
from exo_node.errors import ModelError
from exo_node.model.config import ModelConfig
if TYPE_CHECKING: from tinygrad import Tensor  # imported where it is used

PREFIX = "random:"
_LLAMA3 = dict(arch="llama", vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, context_length=8192)
SHAPES: dict[str, ModelConfig] = {
  "llama-1b": ModelConfig(n_layers=16, dim=2048, ffn_dim=8192, n_heads=32, n_kv_heads=8, head_dim=64, **_LLAMA3),
  "llama-8b": ModelConfig(n_layers=32, dim=4096, ffn_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128, **_LLAMA3),
  # for tests and CI: a real pipeline of several layers that loads in a moment on a CPU
  "llama-tiny": ModelConfig("llama", n_layers=4, dim=64, ffn_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=8192,
                            norm_eps=1e-5, rope_theta=10000.0, context_length=2048),
}
_UNTIED = {"llama-8b"}  # Llama 3.1 8B has its own output matrix; 1B ties it to the embedding


def is_random(model: str) -> bool: return model.startswith(PREFIX)


class RandomWeights:
  def __init__(self, model: str):
    self.shape = model.removeprefix(PREFIX)
    if self.shape not in SHAPES: raise ModelError(f"unknown random shape {self.shape!r} (known: {', '.join(PREFIX + s for s in SHAPES)})")
    self.config = SHAPES[self.shape]
    self.bytes_read = 0  # nothing is read: kept so every kind of weights answers the same questions

  def has(self, name: str) -> bool: return self.shape_of(name) is not None

  def shape_of(self, name: str) -> tuple[int, ...] | None:
    c = self.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"token_embd": (c.vocab_size, c.dim), "attn_q": (q, c.dim), "attn_k": (kv, c.dim), "attn_v": (kv, c.dim),
              "attn_output": (c.dim, q), "ffn_gate": (c.ffn_dim, c.dim), "ffn_up": (c.ffn_dim, c.dim),
              "ffn_down": (c.dim, c.ffn_dim), "attn_norm": (c.dim,), "ffn_norm": (c.dim,), "output_norm": (c.dim,)}
    if self.shape in _UNTIED: shapes["output"] = (c.vocab_size, c.dim)
    base, _, kind = name.rpartition(".")
    return shapes.get(base.rpartition(".")[2]) if kind == "weight" else None

  def host(self, name: str) -> None: return None  # drawn on the device

  def load(self, name: str, device: str) -> "Tensor":
    from tinygrad import Tensor
    if (shape := self.shape_of(name)) is None: raise ModelError(f"{PREFIX}{self.shape} has no tensor {name}")
    if len(shape) == 1: return Tensor.ones(*shape, device=device)  # norms
    Tensor.manual_seed(zlib.crc32(name.encode()))
    bound = math.sqrt(3.0 / shape[1])  # unit-variance outputs for unit-variance inputs: activations stay O(1)
    return Tensor.uniform(*shape, low=-bound, high=bound, device=device)
