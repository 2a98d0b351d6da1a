"""The OpenAI-compatible API on a real 2-node cluster, through the official client and raw HTTP."""
import json, time, urllib.error, urllib.request
import pytest
from conftest import free_port, greedy, http
from exo_node.local_cluster import Cluster

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def api(api_cluster): return api_cluster


@pytest.fixture(scope="module")
def client(api):
  import openai
  return openai.OpenAI(base_url=f"{api.procs[1].url}/v1", api_key="unused", timeout=300)


@pytest.fixture(scope="module")
def chat_want(full_engine, weights):
  from exo_node.model.loader import open_tokenizer
  tok = open_tokenizer(weights)
  ids = tok.encode(tok.apply_chat_template(CHAT), add_bos=False)
  out = greedy(full_engine, "chat-api", ids, 12)[0]
  out = out[:min(out.index(e) for e in tok.eos_ids if e in out)] if tok.eos_ids & set(out) else out
  return tok.decode(out), len(ids), len(out)


def test_chat_completion_through_the_openai_client(client, chat_want):
  want, n_prompt, n_completion = chat_want
  r = client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=12, temperature=0)
  assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
  assert r.choices[0].finish_reason == "stop"
  assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n_completion, n_prompt + n_completion)


def test_streamed_chat_completion_through_the_openai_client(client, chat_want):
  chunks = list(client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=12, temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_want[0]
  assert chunks[-1].choices[0].finish_reason == "stop" and all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_equals_the_cli_output(client):
  r = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0)
  assert r.choices[0].text == " Paris.\n\nThe answer is:"  # what `exo-node --prompt ... --raw` prints (test_cli)
  assert r.choices[0].finish_reason == "length" and (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 8)


def test_stop_string_ends_the_completion(client):
  r = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0, stop=["\n"])
  assert r.choices[0].text == " Paris." and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
  a, b = (client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=7).choices[0].text
          for _ in range(2))
  assert a == b


def test_models_and_cluster_describe_both_nodes(api):
  _, models = http(f"{api.procs[0].url}/v1/models", method="GET")
  assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
  _, cl = http(f"{api.procs[0].url}/v1/cluster", method="GET")
  assert sorted(n["id"] for n in cl["nodes"]) == ["n0", "n1"] and all(n["healthy"] for n in cl["nodes"])
  assert [(p["node_id"], p["start"], p["end"]) for p in cl["plan"]] == [("n0", 0, 15), ("n1", 15, 30)]
  status, health = http(f"{api.procs[1].url}/healthz", method="GET")
  assert status == 200 and health["status"] == "ok"


@pytest.mark.parametrize("body,status,needle", [
  (b"{not json", 400, "not valid JSON"),
  ({"model": "smollm2-135m"}, 400, "'messages'"),
  ({"messages": CHAT}, 400, "'model'"),
  ({"model": "gpt-4", "messages": CHAT}, 404, "gpt-4"),
  ({"model": "smollm2-135m", "messages": CHAT, "n": 2}, 400, "n=1"),
  ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "over the context"),
  ({"model": "smollm2-135m", "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
])
def test_bad_chat_requests_get_openai_errors(api, body, status, needle):
  got, err = http(f"{api.procs[0].url}/v1/chat/completions", body)
  assert got == status and needle in err["error"]["message"] and err["error"]["type"] == "invalid_request_error"


def test_no_node_able_to_serve_gives_503(tmp_path):
  with Cluster().start([free_port()], tmp_path, extra=["--memory", "1000"], api_ports=[free_port()]) as c:
    url = c.procs[0].url
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      try: status, err = http(f"{url}/v1/completions", {"model": "smollm2-135m", "prompt": "hi"}); break
      except (urllib.error.URLError, ConnectionError): time.sleep(0.3)
    assert status == 503 and "not enough memory" in err["error"]["message"]


def metrics(url: str) -> dict[str, float]:
  from prometheus_client.parser import text_string_to_metric_families
  _, text = http(f"{url}/metrics", method="GET")
  return {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_parse_and_move_after_a_request(api, client):
  url = api.procs[1].url
  before = metrics(url)
  client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=3, temperature=0)
  after = metrics(url)
  key = 'exo_requests_total{"endpoint": "/v1/completions", "status": "200"}'
  assert after[key] == before.get(key, 0) + 1
  assert after["exo_tokens_generated_total{}"] == before["exo_tokens_generated_total{}"] + 3
  assert after["exo_time_to_first_token_seconds_count{}"] == before["exo_time_to_first_token_seconds_count{}"] + 1
  assert after["exo_inflight_requests{}"] == 0
  steps = 'exo_decode_steps_total{"batch": "1"}'
  assert after[steps] == before.get(steps, 0) + 2  # the prompt's pass gives the first token, two decode passes the rest
  # the first decode pass launches the second ahead, behind a gate its input opens (model/gate.py)
  assert after["exo_decode_steps_ahead_total{}"] == before["exo_decode_steps_ahead_total{}"] + 1
  deadline = time.monotonic() + 5  # the End frame frees sessions just after the response
  while metrics(url)["exo_kv_sessions{}"] and time.monotonic() < deadline: time.sleep(0.05)
  assert metrics(url)["exo_kv_sessions{}"] == 0
  assert any(k.startswith("exo_peer_hop_latency_seconds") for k in after)


def test_client_disconnect_frees_the_sessions_on_both_nodes(api):
  import http.client
  conn = http.client.HTTPConnection("127.0.0.1", api.procs[0].api_port, timeout=300)
  conn.request("POST", "/v1/completions", json.dumps({"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 400,
                                                      "temperature": 0, "stream": True}), {"Content-Type": "application/json"})
  resp = conn.getresponse()
  assert resp.status == 200
  lines = [resp.readline() for _ in range(6)]
  assert any(l.startswith(b"data: {") for l in lines)
  assert all(p.info().active_sessions == 1 for p in api.procs)
  conn.sock.close(); conn.close()
  assert api.sessions(settle=10) == [0, 0]
  assert metrics(api.procs[0].url)["exo_inflight_requests{}"] == 0
