"""One-shot generation from the CLI: tokenize (chat template unless --raw), run the cluster, stream text."""
from __future__ import annotations
from typing import AsyncIterator
from exo_node.config import NodeConfig
from exo_node.errors import ExoError
from exo_node.model.sampling import SamplingParams
from exo_node.model.tokenizer import StreamDecoder


class PromptError(ExoError):
  """The request itself is wrong (too long, empty, bad ids): the client's fault, not the cluster's."""


def check_prompt(node, ids: list[int]) -> list[int]:
  if not ids: raise PromptError("empty prompt")
  if len(ids) >= node.cfg.max_context: raise PromptError(f"prompt is {len(ids)} tokens, over the context of {node.cfg.max_context} tokens")
  if (bad := [i for i in ids if not 0 <= i < node.weights.config.vocab_size]): raise PromptError(f"token id {bad[0]} out of the vocabulary")
  return ids


def prompt_ids(node, text: str, raw: bool) -> list[int]:
  tok = node.tokenizer
  return check_prompt(node, tok.encode(text) if raw else tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_bos=False))


async def generate(node, ids: list[int], params: SamplingParams) -> AsyncIterator[tuple[int | None, str]]:
  """(token id, newly completed text) pairs; a final (None, rest) flushes held-back bytes."""
  params.max_tokens = min(params.max_tokens, node.cfg.max_context - len(ids))
  dec = StreamDecoder(node.tokenizer)
  async for t in node.orchestrator.generate(ids, params, node.tokenizer.eos_ids): yield t, dec.push(t)
  if text := dec.flush(): yield None, text


async def generate_text(node, cfg: NodeConfig) -> AsyncIterator[str]:
  params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed, cfg.max_tokens)
  async for _, text in generate(node, prompt_ids(node, cfg.prompt, cfg.raw), params):
    if text: yield text
