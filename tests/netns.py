"""Two simulated hosts: network namespaces joined by a veth pair, made and removed by the test itself."""
from __future__ import annotations
import os, shutil, subprocess, uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def can_make_namespaces() -> str | None:
  """None when namespaces can be made here, else the reason they cannot."""
  if os.geteuid() != 0: return "network namespaces need root"
  if shutil.which("ip") is None: return "iproute2 (`ip`) is not installed"
  probe = f"exoprobe{uuid.uuid4().hex[:6]}"
  r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
  if r.returncode: return f"ip netns add failed: {r.stderr.strip()}"
  subprocess.run(["ip", "netns", "del", probe])
  return None


def sh(*cmd: str) -> None: subprocess.run(cmd, check=True, capture_output=True)


@contextmanager
def two_hosts() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
  """((ns1, ip1), (ns2, ip2)) on 10.211.x.0/24; everything is deleted afterwards."""
  tag = uuid.uuid4().hex[:6]
  hosts = [(f"exo{tag}a", "10.211.7.1"), (f"exo{tag}b", "10.211.7.2")]
  veths = [f"v{tag}a", f"v{tag}b"]
  try:
    for ns, _ in hosts: sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", veths[0], "netns", hosts[0][0], "type", "veth", "peer", "name", veths[1], "netns", hosts[1][0])
    for (ns, ip), veth in zip(hosts, veths):
      sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
      sh("ip", "-n", ns, "link", "set", veth, "up", "multicast", "on")
      sh("ip", "-n", ns, "link", "set", "lo", "up")
    yield hosts[0], hosts[1]
  finally:
    for ns, _ in hosts: subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def avahi(ns: str, workdir: Path) -> subprocess.Popen:
  """A system mDNS responder in the namespace, holding port 5353 beside our nodes (no D-Bus needed)."""
  conf = workdir / f"avahi-{ns}.conf"
  conf.write_text("[server]\nuse-ipv4=yes\nuse-ipv6=no\nenable-dbus=no\n[publish]\npublish-workstation=yes\n")
  return subprocess.Popen(["ip", "netns", "exec", ns, "avahi-daemon", "--no-drop-root", "--no-chroot", "--no-rlimits", "-f", str(conf)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
