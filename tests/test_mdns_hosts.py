"""Discovery across two simulated hosts (network namespaces + veth), with and without a system mDNS responder."""
import os, shutil, signal, subprocess, sys, time
import pytest
from netns import avahi, can_make_namespaces, two_hosts

REASON = can_make_namespaces()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cannot simulate two hosts: {REASON}")


def node(ns: str, ip: str, node_id: str, log, *extra: str) -> subprocess.Popen:
  args = ["--node-id", node_id, "--node-port", "8001", "--api-port", "0", "--discovery", "mdns", "--cluster", "lan",
          "--mdns-interface", ip, "--max-context", "256", *extra]
  return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "exo_node", *args], stdout=subprocess.PIPE,
                          stderr=open(log, "w"), text=True, start_new_session=True)


@pytest.mark.parametrize("responder", ["none", "avahi"])
def test_two_hosts_discover_each_other_over_mdns_and_run_a_pipeline(tmp_path, responder):
  if responder == "avahi" and shutil.which("avahi-daemon") is None: pytest.skip("avahi-daemon is not installed")
  with two_hosts() as ((ns1, ip1), (ns2, ip2)):
    daemon = avahi(ns1, tmp_path) if responder == "avahi" else None
    try:
      if daemon: time.sleep(1); assert daemon.poll() is None, daemon.stdout.read()
      server = node(ns1, ip1, "h1", tmp_path / "h1.log")
      client = node(ns2, ip2, "h2", tmp_path / "h2.log", "--wait-for-peers", "1", "--peer-timeout", "120",
                    "--prompt", "The capital of France is", "--raw", "--max-tokens", "8", "--temperature", "0")
      out, _ = client.communicate(timeout=400)
      log = (tmp_path / "h2.log").read_text()
      assert client.returncode == 0, log[-3000:]
      assert out == " Paris.\n\nThe answer is:\n"
      assert "peer h1 joined at 10.211.7.1:8001" in log
      assert server.poll() is None
    finally:
      for p in [locals().get("server"), locals().get("client"), daemon]:
        if p is not None and p.poll() is None:
          if p is daemon: p.terminate()
          else: os.killpg(p.pid, signal.SIGTERM)
          try: p.wait(10)
          except subprocess.TimeoutExpired: p.kill()
