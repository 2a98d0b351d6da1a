"""Text <-> token ids with the Hugging Face `tokenizers` library, built from GGUF metadata or a tokenizer.json, plus the
model's own jinja chat template, so prompts are tokenized exactly as the model was trained."""
from __future__ import annotations
import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable
import jinja2, jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from exo_node.errors import ModelError

# GGUF 'tokenizer.ggml.pre' names (as llama.cpp spells them) grouped by pre-tokenizer
_GPT2_PRE, _SMOLLM_PRE = ("gpt-2", "gpt2", "phi-2"), ("smollm",)
_LLAMA3_PRE, _QWEN2_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ("qwen2", "deepseek-r1-qwen")
_SPLIT_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")
_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _raise(msg: str): raise jinja2.TemplateError(msg)
def _tojson(x: Any, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  """HF's tojson: keeps non-ASCII and '<>&' as is; jinja's own escapes them for HTML, which changes the prompt."""
  return json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

# the environment transformers renders chat templates in, so templates written against it behave the same here
_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))


def _read_json(path: Path) -> dict[str, Any]:
  try: return json.loads(path.read_text()) if path.is_file() else {}
  except (OSError, ValueError) as e: raise ModelError(f"cannot read {path}: {e}") from None


class Tokenizer:
  """Encodes without the library's post-processing (only the optional BOS), so a prompt rendered from the chat
  template, which already holds its special tokens, is never wrapped twice."""

  def __init__(self, hf: tokenizers.Tokenizer, bos_id: int | None, eos_ids: Iterable[int | None], add_bos: bool, chat_template: str | None):
    eos = [i for i in eos_ids if i is not None]  # the first is the model's own eos, rendered as `eos_token`
    self.hf, self.bos_id, self.add_bos, self.chat_template = hf, bos_id, add_bos, chat_template
    self.eos_ids = frozenset(eos + [i for i in map(hf.token_to_id, _END_OF_TURN) if i is not None])
    self.bos_token = hf.id_to_token(bos_id) if bos_id is not None else None
    self.eos_token = hf.id_to_token(eos[0]) if eos else None
    self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_gguf_meta(cls, meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from 'tokenizer.ggml.*'; the GGUF tokens are already in byte-level form, as in a tokenizer.json."""
    if (kind := meta.get("tokenizer.ggml.model")) != "gpt2":
      raise ModelError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2' is supported)")
    tokens, types, pre = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", []), meta.get("tokenizer.ggml.pre", "gpt-2")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    hf = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in _LLAMA3_PRE))
    if pre in _GPT2_PRE + _SMOLLM_PRE:
      hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
      # smollm's regex splits every digit first (no effect on SmolLM2's own vocab, which has no multi-digit tokens)
      if pre in _SMOLLM_PRE: hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), hf.pre_tokenizer])
    elif pre in _LLAMA3_PRE + _QWEN2_PRE:
      split = pre_tokenizers.Split(Regex(_SPLIT_RE % ("" if pre in _QWEN2_PRE else "{1,3}")), behavior="isolated")
      hf.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else: raise ModelError(f"unsupported GGUF pre-tokenizer {pre!r}")
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)])
    return cls(hf, meta.get("tokenizer.ggml.bos_token_id"), [meta.get("tokenizer.ggml.eos_token_id")],
               meta.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_PRE), meta.get("tokenizer.chat_template"))

  @classmethod
  def from_hf_folder(cls, folder: str | Path) -> Tokenizer:
    """tokenizer.json, with BOS/EOS and the chat template from tokenizer_config.json and extra EOS ids from generation_config.json."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file(): raise ModelError(f"no tokenizer.json in {folder}")
    try: hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e: raise ModelError(f"cannot load {folder / 'tokenizer.json'}: {e}") from None
    cfg, gen = _read_json(folder / "tokenizer_config.json"), _read_json(folder / "generation_config.json")
    def tid(t: str | dict | None) -> int | None: return hf.token_to_id(t["content"] if isinstance(t, dict) else t) if t else None
    bos, gen_eos = tid(cfg.get("bos_token")), gen.get("eos_token_id", [])
    # no add_bos_token key (Llama 3): BOS is added exactly when the tokenizer.json post-processor would add it
    add_bos = cfg.get("add_bos_token", bos is not None and hf.encode("", add_special_tokens=True).ids[:1] == [bos])
    template = cfg.get("chat_template")
    if isinstance(template, list): template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file(): template = (folder / "chat_template.jinja").read_text()
    return cls(hf, bos, [tid(cfg.get("eos_token")), *(gen_eos if isinstance(gen_eos, list) else [gen_eos])], add_bos, template)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = self.hf.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None else ids

  def decode(self, ids: Iterable[int]) -> str: return self.hf.decode(list(ids), skip_special_tokens=False)

  @cached_property
  def _template(self) -> jinja2.Template:
    try: return _ENV.from_string(self.chat_template or _CHATML)
    except jinja2.TemplateSyntaxError as e: raise ModelError(f"the model's chat template does not parse: {e}") from None

  def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text for a conversation; models without a template get ChatML."""
    try: return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                                      eos_token=self.eos_token or "")
    except jinja2.TemplateError as e: raise ModelError(f"chat template failed: {e}") from None


class StreamDecoder:
  """Text of a token stream, piece by piece: a character split across tokens is held back until complete, and only a
  short window of ids is re-decoded per token, so streaming stays O(1) per token. Without a tokenizer (random
  weights) there is no text: the stream is its ids."""

  def __init__(self, tok: Tokenizer | None): self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

  def _new_text(self) -> str:
    if self.tok is None: return ""
    return self.tok.decode(self.ids[self.prefix:])[len(self.tok.decode(self.ids[self.prefix:self.read])):]

  def push(self, token_id: int) -> str:
    self.ids.append(token_id)
    if (text := self._new_text()).endswith("\ufffd"): return ""
    self.prefix, self.read = self.read, len(self.ids)
    return text

  def flush(self) -> str:
    """Whatever is still held back (an incomplete UTF-8 sequence at the end decodes to U+FFFD)."""
    text = self._new_text()
    self.prefix = self.read = len(self.ids)
    return text
