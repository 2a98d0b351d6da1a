"""From text to text: tokenize (chat template unless raw), run the cluster, stream the detokenized completion
with stop strings applied. Shared by the CLI, the Generate RPC and the HTTP API."""
from __future__ import annotations
from contextlib import aclosing
from typing import AsyncIterator
from exo_node.config import NodeConfig
from exo_node.errors import ExoError
from exo_node.model.sampling import SamplingParams
from exo_node.model.tokenizer import StreamDecoder
from exo_node.orchestrator import Stats


class PromptError(ExoError):
  """The request itself is wrong (too long, empty, bad ids): the client's fault, not the cluster's."""


def check_prompt(node, ids: list[int]) -> list[int]:
  if not ids: raise PromptError("empty prompt")
  if len(ids) >= node.cfg.max_context: raise PromptError(f"prompt is {len(ids)} tokens, over the context of {node.cfg.max_context} tokens")
  if (bad := [i for i in ids if not 0 <= i < node.weights.config.vocab_size]): raise PromptError(f"token id {bad[0]} out of the vocabulary")
  return ids


def _tokenizer(node):
  if node.tokenizer is None: raise PromptError(f"model {node.model_id} has no tokenizer: send the prompt as token ids")
  return node.tokenizer


def prompt_ids(node, text: str, raw: bool) -> list[int]:
  tok = _tokenizer(node)
  return check_prompt(node, tok.encode(text) if raw else tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_bos=False))


def chat_ids(node, messages: list[dict]) -> list[int]:
  tok = _tokenizer(node)
  return check_prompt(node, tok.encode(tok.apply_chat_template(messages), add_bos=False))


def _stop_at(text: str, stops: tuple[str, ...]) -> int:
  return min((i for s in stops if (i := text.find(s)) >= 0), default=-1)


async def generate(node, ids: list[int], params: SamplingParams, stops: tuple[str, ...] = (),
                   stats: Stats | None = None) -> AsyncIterator[tuple[int | None, str]]:
  """(token id, text ready to show) pairs. Text that could begin a stop string is held back until it cannot;
  a stop string ends the request (stats.finish = "stop") and is not shown. A final (None, rest) flushes."""
  params.max_tokens = min(params.max_tokens, node.cfg.max_context - len(ids))
  tok, held, keep = node.tokenizer, "", max((len(s) for s in stops), default=1) - 1
  dec = StreamDecoder(tok)
  stats = stats if stats is not None else Stats()
  async with aclosing(node.orchestrator.generate(ids, params, tok.eos_ids if tok else frozenset(), stats=stats)) as tokens:
    async for t in tokens:
      held += dec.push(t)
      if (cut := _stop_at(held, stops)) >= 0:
        stats.finish = "stop"; yield t, held[:cut]; return
      ready, held = (held[:len(held) - keep], held[len(held) - keep:]) if keep else (held, "")
      yield t, ready
  held += dec.flush()
  if (cut := _stop_at(held, stops)) >= 0: stats.finish, held = "stop", held[:cut]
  if held: yield None, held


async def generate_text(node, cfg: NodeConfig) -> AsyncIterator[str]:
  params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed, cfg.max_tokens)
  async for _, text in generate(node, prompt_ids(node, cfg.prompt, cfg.raw), params):
    if text: yield text
