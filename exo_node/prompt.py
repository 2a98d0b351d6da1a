"""One-shot generation from the CLI: tokenize (chat template unless --raw), run the cluster, stream text."""
from __future__ import annotations
from typing import AsyncIterator
from exo_node.config import NodeConfig
from exo_node.errors import ExoError
from exo_node.model.sampling import SamplingParams
from exo_node.model.tokenizer import StreamDecoder


def prompt_ids(node, text: str, raw: bool) -> list[int]:
  tok = node.tokenizer
  ids = tok.encode(text) if raw else tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_bos=False)
  if len(ids) >= node.cfg.max_context:
    raise ExoError(f"prompt is {len(ids)} tokens, over the context of {node.cfg.max_context} tokens")
  return ids


async def generate_text(node, cfg: NodeConfig) -> AsyncIterator[str]:
  ids = prompt_ids(node, cfg.prompt, cfg.raw)
  params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed, min(cfg.max_tokens, cfg.max_context - len(ids)))
  dec = StreamDecoder(node.tokenizer)
  async for t in node.orchestrator.generate(ids, params, node.tokenizer.eos_ids):
    if text := dec.push(t): yield text
  if text := dec.flush(): yield text
