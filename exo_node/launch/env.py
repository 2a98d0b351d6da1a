"""What each child inherits: the launcher's environment minus secret-looking names, plus ranks and overrides."""
from __future__ import annotations
import fnmatch
from typing import Mapping

SECRET_PATTERNS = ("*TOKEN*", "*SECRET*", "*PASSWORD*", "*KEY*", "*CREDENTIAL*")
SECRET_ENV = "EXO_CLUSTER_SECRET"  # handed to children explicitly by the launcher, never inherited


def is_secret(name: str) -> bool: return any(fnmatch.fnmatchcase(name.upper(), p) for p in SECRET_PATTERNS)


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
  name, eq, value = text.partition("=")
  if not eq or not name or not name.replace("_", "a").isalnum():
    raise ValueError(f"{flag} {text!r}: expected NAME=VALUE")
  return name, value


def inherited(environ: Mapping[str, str], pass_env: set[str]) -> dict[str, str]:
  return {k: v for k, v in environ.items() if k in pass_env or not is_secret(k)}


def masked(env: Mapping[str, str]) -> dict[str, str]:
  return {k: "****" if is_secret(k) else v for k, v in env.items()}
