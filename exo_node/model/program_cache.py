"""Lowered kernels kept on disk across processes. tinygrad's own disk cache keeps only the compiler's output, so every
process lowers each kernel again, about half of a capture on a CPU: warming SmolLM2's steps took 30-32 s, 16 s with
the lowered programs loaded from here. One file per program, so processes that save at once never clash."""
from __future__ import annotations
import hashlib, logging, os, pickle, tempfile
from importlib.metadata import version
from pathlib import Path
from tinygrad.codegen import to_program_cache
from tinygrad.helpers import CACHEDB, CACHELEVEL

log = logging.getLogger(__name__)
_saved: set[tuple] = set()  # keys already on disk (loaded or saved by this process)


def folder() -> Path: return Path(CACHEDB).with_name(f"exo-programs-{version('tinygrad')}")


def _name(key: tuple) -> str: return hashlib.sha256(repr(key).encode()).hexdigest()


def load() -> int:
  """Adds the programs on disk to tinygrad's in-memory cache; a file that does not load is skipped. Returns how many
  programs this process knows to be on disk."""
  if CACHELEVEL < 1 or not (d := folder()).is_dir(): return 0
  for f in d.glob("*.pkl"):
    try: key, prg = pickle.loads(f.read_bytes())
    except Exception as e:
      log.warning("skipping cached program %s: %s", f.name, e)
      continue
    to_program_cache.setdefault(key, prg)
    _saved.add(key)
  return len(_saved)


def save() -> int:
  """Writes the programs lowered since the last load or save; returns how many."""
  if CACHELEVEL < 1: return 0
  new = [k for k in to_program_cache if k not in _saved]
  if new: (d := folder()).mkdir(parents=True, exist_ok=True)
  for key in new:
    try: data = pickle.dumps((key, to_program_cache[key]))
    except Exception as e:
      log.warning("cannot cache a lowered program: %s", e)
      continue
    with tempfile.NamedTemporaryFile(dir=d, suffix=".tmp", delete=False) as f: f.write(data)
    os.replace(f.name, d / f"{_name(key)}.pkl")
  _saved.update(new)
  return len(new)
