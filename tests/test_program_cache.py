"""Lowered kernels on disk (model/program_cache.py): a second process runs them without lowering again, and a file
that does not load is skipped, not fatal."""
import os, subprocess, sys, textwrap

SCRIPT = textwrap.dedent("""
  import sys
  import tinygrad.codegen as cg
  from exo_node.model import program_cache
  from tinygrad import Device, Tensor
  loaded, _ = program_cache.load(), Device["CPU"]  # the device lowers its own queue programs as it opens
  if sys.argv[1] == "reuse":
    def lowered(*a, **k): raise AssertionError("lowered again")
    cg.do_to_program = lowered
  print(loaded, (Tensor([1.0, 2.0, 3.0]).realize() * 2 + 1).tolist(), program_cache.save())
""")


def run(tmp_path, mode: str) -> list[str]:
  env = {**os.environ, "CACHEDB": str(tmp_path / "cache.db"), "DEV": "CPU"}
  p = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  return p.stdout.split(maxsplit=1)


def test_a_second_process_reuses_the_lowered_programs_and_skips_a_broken_file(tmp_path):
  loaded, rest = run(tmp_path, "first")
  assert loaded == "0" and rest.startswith("[3.0, 5.0, 7.0]") and int(rest.split()[-1]) >= 1
  folder = next(tmp_path.glob("exo-programs-*"))
  files = sorted(folder.glob("*.pkl"))
  assert len(files) == int(rest.split()[-1])
  (folder / "broken.pkl").write_bytes(b"not a pickle")
  loaded, rest = run(tmp_path, "reuse")  # lowering raises here: the kernel must come from the files
  assert int(loaded) == len(files) and rest.split() == ["[3.0,", "5.0,", "7.0]", "0"]
