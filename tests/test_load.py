"""Load on the shared 2-node API cluster: 50 concurrent requests through both nodes all complete correctly (more
requests than KV session slots: the rest wait), a stalled reader blocks nobody, and no session leaks."""
import json, socket, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
from prometheus_client.parser import text_string_to_metric_families
from conftest import PROMPT_IDS, greedy, http


def sessions(url: str) -> float:
  with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
    fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
  return next(s.value for f in fams.values() for s in f.samples if "kv_sessions" in s.name)


def test_fifty_concurrent_requests_complete_and_a_stalled_reader_blocks_nobody(api_cluster, full_engine, weights):
  from exo_node.model.loader import open_tokenizer
  want = open_tokenizer(weights).decode(greedy(full_engine, "load", PROMPT_IDS, 1)[0])
  urls = [p.url for p in api_cluster.procs]
  body = {"model": "smollm2-135m", "prompt": PROMPT_IDS, "max_tokens": 1, "temperature": 0}
  host, port = urls[0][7:].split(":")
  stalled = socket.create_connection((host, int(port)))  # asks for a long stream, then never reads it
  req = json.dumps({**body, "max_tokens": 30, "stream": True})
  stalled.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(req)}\r\n\r\n{req}".encode())
  t0 = time.monotonic()
  with ThreadPoolExecutor(50) as pool:
    results = list(pool.map(lambda i: http(urls[i % 2] + "/v1/completions", body), range(50)))
  print(f"\n50 concurrent requests (1 token each) on 2 nodes: {time.monotonic() - t0:.1f}s")
  assert [s for s, _ in results] == [200] * 50
  assert {r["choices"][0]["text"] for _, r in results} == {want} and all(r["usage"]["completion_tokens"] == 1 for _, r in results)
  stalled.close()
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and any(sessions(u) for u in urls): time.sleep(0.2)  # the stalled stream is cancelled
  assert [sessions(u) for u in urls] == [0, 0]
