"""OpenAI request bodies -> validated generation requests, and OpenAI-shaped responses and errors."""
from __future__ import annotations
import time, uuid
from dataclasses import dataclass
from typing import Any
from exo_node.model.sampling import SamplingParams


class APIError(Exception):
  """Becomes an HTTP error with OpenAI's error body."""
  def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    super().__init__(message); self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

  def body(self) -> dict[str, Any]: return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
  chat: bool
  model: str
  messages: list[dict] | None
  prompt: str | list[int] | None
  params: SamplingParams
  stops: tuple[str, ...]
  stream: bool
  include_usage: bool
  id: str
  created: int


def _num(body: dict, key: str, kind: type, default, lo: float | None = None, hi: float | None = None):
  v = body.get(key, default)
  if v is None: return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
    raise APIError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}", param=key)
  if (lo is not None and v < lo) or (hi is not None and v > hi): raise APIError(400, f"'{key}' must be between {lo} and {hi}", param=key)
  return kind(v)


def parse(body: Any, chat: bool, max_tokens_cap: int) -> CompletionRequest:
  if not isinstance(body, dict): raise APIError(400, "the request body must be a JSON object")
  model = body.get("model")
  if not isinstance(model, str) or not model: raise APIError(400, "'model' is required", param="model")
  if _num(body, "n", int, 1) != 1: raise APIError(400, "only n=1 is supported: this server generates one choice per request", param="n")
  messages = prompt = None
  if chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages: raise APIError(400, "'messages' must be a non-empty list", param="messages")
    for m in messages:
      if not isinstance(m, dict) or not isinstance(m.get("role"), str): raise APIError(400, "each message needs a 'role' and 'content'", param="messages")
      c = m.get("content")
      if isinstance(c, list): c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
      if not isinstance(c, str): raise APIError(400, "each message needs a 'role' and 'content'", param="messages")
      m["content"] = c
  else:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str): prompt = prompt[0]
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt))):
      raise APIError(400, "'prompt' must be a string or a list of token ids", param="prompt")
  stop = body.get("stop") or ()
  if isinstance(stop, str): stop = (stop,)
  if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
    raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
  seed = body.get("seed")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)): raise APIError(400, "'seed' must be an integer", param="seed")
  params = SamplingParams(temperature=_num(body, "temperature", float, 1.0, 0, 2), top_k=_num(body, "top_k", int, 0, 0),
                          top_p=_num(body, "top_p", float, 1.0, 0, 1), seed=seed,
                          max_tokens=_num(body, "max_tokens", int, None, 1, max_tokens_cap) or
                          _num(body, "max_completion_tokens", int, 256, 1, max_tokens_cap))
  opts = body.get("stream_options") or {}
  return CompletionRequest(chat, model, messages, prompt, params, tuple(stop), bool(body.get("stream", False)),
                           bool(isinstance(opts, dict) and opts.get("include_usage")),
                           f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chunk(r: CompletionRequest, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
  """One streamed object: chat.completion.chunk or text_completion."""
  if r.chat:
    delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
    return {"id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
  return {"id": r.id, "object": "text_completion", "created": r.created, "model": r.model,
          "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def full(r: CompletionRequest, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
  choice = {"index": 0, "message": {"role": "assistant", "content": text}} if r.chat else {"index": 0, "text": text, "logprobs": None}
  return {"id": r.id, "object": "chat.completion" if r.chat else "text_completion", "created": r.created, "model": r.model,
          "choices": [choice | {"finish_reason": finish}], "usage": usage(prompt_tokens, completion_tokens)}
