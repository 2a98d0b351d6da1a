"""Runs the children: one process group each, logs teed to a file and to the console, readiness, restarts and a
shutdown that leaves no process behind (SIGTERM, a grace period, then SIGKILL)."""
from __future__ import annotations
import collections, ctypes, json, os, shlex, signal, subprocess, sys, threading, time, urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from exo_node.launch.spec import NodeSpec

HOST_BOUND = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "HOSTNAME", "TERM", "DISPLAY", "MAIL", "SHLVL",
              "TMPDIR", "VIRTUAL_ENV", "_"}  # never carried to another host: they describe this one
_print_lock = threading.Lock()


def say(msg: str) -> None:
  with _print_lock: print(f"exo-cluster: {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
  """The kernel SIGTERMs the child if the launcher itself dies, even by SIGKILL: no orphans."""
  try: ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError): pass


def terminate(popens: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM each process, wait up to `grace` seconds, then SIGKILL its whole process group: whatever it left behind
  (compile workers, a stuck child) goes too. The group is not signalled first, so a node shuts its workers down itself."""
  for p in popens:
    if p.poll() is None: p.terminate()
  deadline = time.monotonic() + grace
  for p in popens:
    try: p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired: pass
    try: os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError): pass
    p.wait()


def _healthy(node: dict) -> bool:
  """At the address the cluster itself uses for that node."""
  try:
    with urllib.request.urlopen(f"http://{node['address'].rsplit(':', 1)[0]}:{node['api_port']}/healthz", timeout=2) as r: return r.status == 200
  except (OSError, ValueError): return False


@dataclass
class Child:
  spec: NodeSpec
  argv: list[str]
  env: dict[str, str]
  log_path: Path
  ssh: list[str]
  popen: subprocess.Popen | None = None
  restarts: int = 0
  lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))

  @property
  def node_id(self) -> str: return self.spec.node_id

  def command(self) -> tuple[list[str], dict[str, str]]:
    """Locally the env goes to Popen; over ssh it is spelled out in the remote command line."""
    if self.spec.host.local: return self.argv, self.env
    assigns = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()) if k not in HOST_BOUND]
    remote = f"cd {shlex.quote(os.getcwd())} && exec env {' '.join(assigns)} {shlex.join(self.argv)}"
    return [*self.ssh, self.spec.host.name, remote], {k: v for k, v in os.environ.items()}

  def start(self) -> None:
    argv, env = self.command()
    self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_die_with_parent)
    threading.Thread(target=self._pump, args=(self.popen,), daemon=True).start()

  def _pump(self, popen: subprocess.Popen) -> None:
    with open(self.log_path, "ab") as log:
      for raw in popen.stdout:
        log.write(raw); log.flush()
        line = raw.decode(errors="replace").rstrip("\r\n")
        self.lines.append(line)
        with _print_lock: print(f"[{self.node_id}] {line}", flush=True)

  def tail(self, n: int = 15) -> str: return "\n".join(f"    {l}" for l in list(self.lines)[-n:]) or "    (no output)"


@dataclass
class Supervisor:
  children: list[Child]
  restart: str = "no"
  max_restarts: int = 3
  grace: float = 10.0
  stopping: threading.Event = field(default_factory=threading.Event)
  gone: set[str] = field(default_factory=set)  # exited and not restarted

  def start(self) -> None:
    for c in self.children: c.start()

  def api_url(self) -> str:
    s = self.children[0].spec
    return f"http://{'127.0.0.1' if s.host.local else s.host.name}:{s.api_port}"

  def cluster_view(self) -> dict | None:
    try:
      with urllib.request.urlopen(self.api_url() + "/v1/cluster", timeout=2) as r: return json.load(r)
    except (OSError, ValueError): return None

  def missing(self, view: dict | None) -> list[Child]:
    """Children not yet in rank 0's view with a share of the plan and their layers loaded (/healthz answers 200)."""
    planned = {s["node_id"] for s in view["plan"]} if view else set()
    listed = {n["id"]: n for n in view["nodes"]} if view else {}
    return [c for c in self.children if c.node_id not in planned or c.node_id not in listed or not _healthy(listed[c.node_id])]

  def wait_ready(self, timeout: float) -> dict | None:
    """The cluster view once every node is up and planned; None on timeout, interrupt or a node that exited."""
    deadline = time.monotonic() + timeout
    while not self.stopping.is_set():
      if self._reap(): return None  # a node that exits during start-up and is not restarted: fail fast
      view = self.cluster_view()
      if not (missing := self.missing(view)): return view
      if time.monotonic() > deadline:
        for c in missing: say(f"timed out after {timeout:.0f}s: {c.node_id} ({c.spec.host.name}) is not in the cluster yet; its last log lines:\n{c.tail()}")
        return None
      self.stopping.wait(0.5)
    return None

  def report(self, c: Child) -> None:
    say(f"{c.node_id} exited with code {c.popen.returncode}; log {c.log_path}, last lines:\n{c.tail()}")

  def _reap(self) -> set[str]:
    """Reports nodes that exited and restarts them when the policy allows; the ids of those gone for good."""
    for c in self.children:
      if c.node_id in self.gone or c.popen.poll() is None: continue
      self.report(c)
      if self.restart == "on-failure" and c.popen.returncode != 0 and c.restarts < self.max_restarts:
        c.restarts += 1; say(f"restarting {c.node_id} ({c.restarts}/{self.max_restarts})"); c.start()
      else: self.gone.add(c.node_id)
    return self.gone

  def watch(self) -> int:
    """Until interrupted (0) or every node is gone for good (1)."""
    while not self.stopping.wait(0.5):
      if len(self._reap()) == len(self.children):
        say("every node has exited"); return 1
    return 0

  def stop(self) -> None:
    terminate([c.popen for c in self.children if c.popen is not None], self.grace)
