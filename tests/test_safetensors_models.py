"""Tiny random transformers models saved as HF folders: our safetensors reader, config and tinygrad shard model
must reproduce transformers' own logits (Llama with and without llama3 rope scaling, Qwen2 qkv bias, Qwen3 q/k norm
with head_dim != hidden/heads), in one piece and split into shards."""
from __future__ import annotations
import json
from pathlib import Path
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tinygrad import dtypes
from exo_node.engine import Engine
from exo_node.errors import ModelError
from exo_node.model.loader import load_shard
from exo_node.model.safetensors import SafetensorsWeights, canonical_name

IDS, NEXT = [3, 141, 59, 26, 200, 5, 97], 77
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=256,
            max_position_embeddings=128)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
# name: (transformers arch, config overrides, save_pretrained overrides); theta 5e5 with head_dim 16 puts the llama3
# wavelengths on all three branches (kept, smoothed, divided by factor) for original_max_position_embeddings 64
SPECS = {
  "llama3": ("Llama", dict(num_hidden_layers=2, rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=True), {}),
  "llama": ("Llama", dict(num_hidden_layers=3, tie_word_embeddings=False), dict(max_shard_size="40KB")),  # sharded + index
  "qwen2": ("Qwen2", dict(num_hidden_layers=2, tie_word_embeddings=False), {}),
  "qwen3": ("Qwen3", dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True), {}),
}


def _randomize(model) -> None:
  """HF's init (std 0.02, unit norms, zero biases) makes logits ~0 and hides wrong norms/biases: use O(1) signals."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name: p.uniform_(0.5, 1.5)
      elif "embed" in name: p.normal_(0.0, 1.0)
      else: p.normal_(0.0, 0.15)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
  """name -> (HF folder, the transformers model it was saved from)."""
  out = {}
  for i, (name, (arch, over, save)) in enumerate(SPECS.items()):
    cfg = getattr(transformers, f"{arch}Config")(**TINY, **over)
    torch.manual_seed(i)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).float().eval()
    _randomize(model)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True, **save)
    out[name] = folder, model
  assert (out["llama"][0] / "model.safetensors.index.json").exists() and len(list(out["llama"][0].glob("*.safetensors"))) > 1
  assert not (out["qwen2"][0] / "model.safetensors.index.json").exists()
  return out


def hf_logits(model, ids: list[int]) -> np.ndarray:
  with torch.no_grad(): return model(torch.tensor([ids])).logits[0, -1].numpy()


def close(ours: np.ndarray, ref: np.ndarray) -> None:
  assert ours.shape == ref.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())  # measured: ~1e-6


def full_engine(folder: Path, n_layers: int) -> Engine:
  return Engine(lambda: load_shard(folder, 0, n_layers, wdtype=dtypes.float32))


@pytest.mark.parametrize("name", SPECS)
def test_every_hf_tensor_has_a_canonical_name_and_config_matches(models, name):
  folder, model = models[name]
  w, c = SafetensorsWeights(folder), model.config
  saved = model.state_dict().keys() - ({"lm_head.weight"} if c.tie_word_embeddings else set())
  assert {k for k in saved if not k.startswith("model.rotary_emb")} == {k for k in saved if canonical_name(k)}
  assert all(w.has(canonical_name(k)) for k in saved if canonical_name(k))
  assert w.has("output.weight") != c.tie_word_embeddings
  cfg = w.config
  assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.ffn_dim) == \
         (c.num_hidden_layers, 64, 4, 2, getattr(c, "head_dim", None) or 16, 256, 128)
  np.testing.assert_allclose(cfg.inv_freq(), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_prefill_then_decode_matches_transformers(models, name):
  folder, model = models[name]
  e = full_engine(folder, model.config.num_hidden_layers)
  close(e.forward("r", 0, np.array(IDS)).result(), hf_logits(model, IDS))
  close(e.forward("r", len(IDS), np.array([NEXT])).result(), hf_logits(model, IDS + [NEXT]))


def test_two_shards_chained_equal_the_whole_model(models):
  folder, model = models["llama"]
  n = model.config.num_hidden_layers
  first, rest = (Engine(lambda a=a, b=b: load_shard(folder, a, b, wdtype=dtypes.float32)) for a, b in ((0, 1), (1, n)))
  for pos, ids in ((0, IDS), (len(IDS), [NEXT])):
    h = first.forward("c", pos, np.array(ids)).result()
    assert h.shape == (len(ids), 64) and h.dtype == np.float32
    close(rest.forward("c", pos, h).result(), hf_logits(model, IDS[:pos] + ids))


def test_unsupported_model_type_is_a_one_line_model_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
  with pytest.raises(ModelError) as ei: Engine(lambda: load_shard(tmp_path, 0, 1))
  msg = str(ei.value)
  assert "gpt2" in msg and "\n" not in msg
