"""The cluster secret (an HMAC proof on every gRPC call, replay-protected) and the API's bearer key, against real
exo-node processes on 127.0.0.1."""
import json, signal, time, urllib.error, urllib.request
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from conftest import free_port, spawn, wait_until
from exo_node.local_cluster import Proc
from exo_node.transport.auth import HEADER, Verifier, proof
from exo_node.transport.pb import exo_node_pb2 as pb

INFO = "/exo_node.v1.ExoNode/Info"


def test_a_proof_is_good_once_for_its_method_and_secret():
  v = Verifier("s3cret")
  good = proof("s3cret", INFO)
  assert v.check(good, INFO) is None
  assert v.check(good, INFO) == "replayed cluster proof"
  assert v.check(proof("other", INFO), INFO).startswith("wrong cluster proof")
  assert v.check(proof("s3cret", "/exo_node.v1.ExoNode/Forward"), INFO).startswith("wrong cluster proof")
  assert v.check(proof("s3cret", INFO, now=time.time() - 120), INFO).startswith("stale cluster proof")
  assert v.check(None, INFO).startswith("no cluster proof") and v.check("x.y", INFO) == "malformed cluster proof"
  assert "s3cret" not in good


@pytest.fixture
def nodes(tmp_path):
  procs: list[Proc] = []
  def start(node_id: str, *args: str) -> Proc: procs.append(spawn(tmp_path, *args, node_id=node_id)); return procs[-1]
  yield start
  for p in procs: p.popen.send_signal(signal.SIGKILL); p.popen.wait()


def test_calls_without_a_valid_proof_are_unauthenticated(nodes):
  p = nodes("locked", "--discovery", "none", "--api-port", "0", "--cluster-secret", "s3cret")
  stub = p.stub()
  info = wait_until(lambda: stub.Info(pb.InfoRequest(), timeout=2, metadata=[(HEADER, proof("s3cret", INFO))]))
  assert info.node_id == "locked"
  replay = proof("s3cret", INFO)
  stub.Info(pb.InfoRequest(), timeout=2, metadata=[(HEADER, replay)])
  for md in ([], [(HEADER, proof("wrong", INFO))], [(HEADER, replay)]):
    with pytest.raises(grpc.RpcError) as e: stub.Info(pb.InfoRequest(), timeout=2, metadata=md)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
  with pytest.raises(grpc.RpcError) as e:  # the streams too: nothing is opened, nothing is run
    list(stub.Forward(iter([pb.Frame(header=pb.Header(request_id="x"))]), timeout=5))
  assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
  with pytest.raises(grpc.RpcError) as e:
    health_pb2_grpc.HealthStub(grpc.insecure_channel(p.address)).Check(health_pb2.HealthCheckRequest(), timeout=2)
  assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
  assert "refused a call to /exo_node.v1.ExoNode/Info: no cluster proof" in p.log.read_text()


def test_a_node_with_the_wrong_secret_never_joins(nodes):
  common = ["--api-port", "0", "--cluster", "sec", "--discovery", "mdns", "--mdns-interface", "127.0.0.1"]
  a = nodes("a", *common, "--cluster-secret", "right")
  b = nodes("b", *common, "--cluster-secret", "right")
  c = nodes("c", *common, "--cluster-secret", "wrong")
  ask = lambda p, s: p.stub().Info(pb.InfoRequest(), timeout=2, metadata=[(HEADER, proof(s, INFO))])
  wait_until(lambda: list(ask(a, "right").peers) == ["b"] and list(ask(b, "right").peers) == ["a"])
  time.sleep(2)  # c has had its chance: mDNS found it within this time on loopback
  assert list(ask(a, "right").peers) == ["b"] and list(ask(b, "right").peers) == ["a"] and list(ask(c, "wrong").peers) == []
  assert wait_until(lambda: "not admitted: UNAUTHENTICATED: wrong cluster proof" in c.log.read_text())
  assert "right" not in c.log.read_text() and "wrong cluster proof" in a.log.read_text()


def test_the_api_key_guards_the_api_but_not_the_page_or_health(nodes):
  api = free_port()
  nodes("k", "--discovery", "none", "--api-port", str(api), "--api-key", "k3y")
  url = f"http://127.0.0.1:{api}"
  def get(path, key=None):
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
      with urllib.request.urlopen(req, timeout=5) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()
  wait_until(lambda: get("/")[0] == 200)
  for key in (None, "nope"):
    status, body = get("/v1/models", key)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
  assert get("/v1/models", "k3y")[0] == 200 and get("/metrics")[0] == 401 and get("/metrics", "k3y")[0] == 200
  assert get("/healthz")[0] in (200, 503)  # open: loading (503) or serving (200), never 401
