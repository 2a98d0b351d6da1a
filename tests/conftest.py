"""Shared fixtures: the real SmolLM2 GGUF, engines over it, and real exo-node processes on 127.0.0.1."""
from __future__ import annotations
import json, os, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("PYTHONUNBUFFERED", "1")
# the nodes tests start share this box's cores, one thread each (test_single_node's node takes them all)
os.environ.setdefault("EXO_THREADS", "1")
from exo_node import device  # noqa: E402
device.bind(None, None)  # the same tinygrad settings as the exo-node processes, before tinygrad is imported
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
  from exo_node.model.registry import resolve
  return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def weights(gguf_path):
  from exo_node.model.gguf import GGUFWeights
  return GGUFWeights(gguf_path)


@pytest.fixture(scope="session")
def full_engine(weights):
  from exo_node.engine import Engine
  from exo_node.model.loader import load_shard
  return Engine(lambda: load_shard(weights, 0, weights.config.n_layers, max_context=256))


def greedy(engine, rid: str, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
  """n greedy tokens through one full-model engine, and the logits after the prompt."""
  first = logits = engine.forward(rid, 0, np.array(ids)).result()
  out, pos = [], len(ids)
  for _ in range(n):
    out.append(int(np.argmax(logits)))
    if len(out) == n: break
    logits = engine.forward(rid, pos, np.array(out[-1:])).result(); pos += 1
  engine.free(rid)
  return out, first


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def spawn(log_dir: Path, *args: str, node_id: str = "", env: dict | None = None):
  """One real exo-node serving on 127.0.0.1 in its own process group, its output in a log file."""
  from exo_node.local_cluster import Proc
  port = free_port()
  log = log_dir / f"{node_id or 'node'}-{port}.log"
  argv = [sys.executable, "-m", "exo_node", "--node-port", str(port), "--host", "127.0.0.1",
          *(("--node-id", node_id) if node_id else ()), *args]
  popen = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                           start_new_session=True)
  return Proc(node_id, port, popen, log)


def wait_until(cond, timeout: float = 60, what: str = "the condition"):
  """cond's first truthy value; a call to a node that is not up yet counts as not yet."""
  import grpc
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      if r := cond(): return r
    except (grpc.RpcError, OSError): pass
    time.sleep(0.1)
  raise TimeoutError(f"waited {timeout:.0f}s for {what}")


def exo_node(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "exo_node", *args], capture_output=True, text=True, timeout=timeout, **kw)


def script_json(script: str, *args: str, env: dict[str, str], timeout: float = 600):
  """Runs script in a fresh Python (tinygrad settings are read once, at import) and returns its last line of output,
  parsed as JSON."""
  p = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def api_cluster(tmp_path_factory):
  """Two nodes with static peers, each serving the HTTP API; shared by the API and web page tests."""
  from exo_node.local_cluster import Cluster
  with Cluster().start([free_port(), free_port()], tmp_path_factory.mktemp("api"), api_ports=[free_port(), free_port()]) as c:
    c.wait_ready(); yield c


def http(url: str, body=None, method="POST") -> tuple[int, dict | str]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
  req = urllib.request.Request(url, data=data, method=method if data is not None else "GET", headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=300) as r: raw, status = r.read().decode(), r.status
  except urllib.error.HTTPError as e: raw, status = e.read().decode(), e.code
  try: return status, json.loads(raw)
  except json.JSONDecodeError: return status, raw


def sse(url: str, body: dict, timeout: float = 300):
  """(arrival time, event) for each SSE event of a streamed completion."""
  req = urllib.request.Request(url + "/v1/completions", json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=timeout) as r:
    for line in r:
      if line.startswith(b"data: ") and line.strip() != b"data: [DONE]": yield time.monotonic(), json.loads(line[6:])
