"""The single-node CLI: prints only the completion, and refuses bad input with one line and exit code 2."""
import pytest
from conftest import exo_node

SOLO = ("--discovery", "none", "--node-port", "0")


def test_raw_prompt_prints_only_the_greedy_completion(gguf_path):
  r = exo_node(*SOLO, "--prompt", "The capital of France is", "--raw", "--max-tokens", "8", "--temperature", "0")
  assert r.returncode == 0, r.stderr
  assert r.stdout == " Paris.\n\nThe answer is:\n"  # the numpy oracle's first 8 tokens, decoded
  assert "loaded block" in r.stderr  # load progress goes to stderr


def test_chat_prompt_uses_the_models_template(gguf_path):
  r = exo_node(*SOLO, "--prompt", "What is the capital of France?", "--max-tokens", "12", "--temperature", "0")
  assert r.returncode == 0, r.stderr
  assert "Paris" in r.stdout and "<|im_" not in r.stdout


def _assert_clean_error(r, *needles):
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("exo-node: error: ") and "Traceback" not in r.stderr
  assert all(n in lines[-1] for n in needles), lines[-1]


def test_missing_model_file_is_refused(tmp_path):
  _assert_clean_error(exo_node(*SOLO, "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"), "nope.gguf")


def test_unknown_model_name_is_refused():
  _assert_clean_error(exo_node(*SOLO, "--model", "llama-999b", "--prompt", "hi"), "unknown model", "llama-999b")


def test_bad_magic_is_refused(tmp_path):
  bad = tmp_path / "bad.gguf"; bad.write_bytes(b"NOPE" + bytes(100))
  _assert_clean_error(exo_node(*SOLO, "--model", str(bad), "--prompt", "hi"), "bad magic")


@pytest.mark.parametrize("keep", [64, 2_000_000])  # inside the header, inside the tensor data
def test_truncated_gguf_is_refused(tmp_path, gguf_path, keep):
  cut = tmp_path / "cut.gguf"
  with open(gguf_path, "rb") as f: cut.write_bytes(f.read(keep))
  _assert_clean_error(exo_node(*SOLO, "--model", str(cut), "--prompt", "hi"), "truncated")


def test_prompt_over_the_context_is_refused():
  _assert_clean_error(exo_node(*SOLO, "--max-context", "16", "--prompt", "word " * 40, "--raw"), "over the context")


def test_a_batch_size_that_is_not_a_power_of_two_is_refused():
  _assert_clean_error(exo_node(*SOLO, "--max-batch", "3", "--prompt", "hi"), "--max-batch", "invalid choice: 3")


@pytest.mark.parametrize("given, expected", [(None, "-event_engine_client,-event_engine_listener"), ("", ""), ("-some_flag", "-some_flag")])
def test_grpc_runs_on_its_older_io_manager_unless_the_user_chose(given, expected):
  import os, subprocess, sys
  env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"} | ({} if given is None else {"GRPC_EXPERIMENTS": given})
  code = "import os, exo_node, grpc; print(repr(os.environ['GRPC_EXPERIMENTS']))"
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and r.stdout.strip() == repr(expected), r.stderr
