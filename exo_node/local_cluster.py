"""Real exo-node processes on 127.0.0.1 with static peers, for tests and the bench; always cleaned up."""
from __future__ import annotations
import os, subprocess, sys, time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
import grpc
from exo_node.launch.supervisor import terminate
from exo_node.transport.pb import exo_node_pb2 as pb, exo_node_pb2_grpc as pbg


@dataclass
class Proc:
  node_id: str
  port: int
  popen: subprocess.Popen
  log: Path
  api_port: int = 0

  @property
  def url(self) -> str: return f"http://127.0.0.1:{self.api_port}"

  @property
  def address(self) -> str: return f"127.0.0.1:{self.port}"

  def stub(self) -> pbg.ExoNodeStub: return pbg.ExoNodeStub(grpc.insecure_channel(self.address))

  def info(self, timeout: float = 2.0) -> pb.NodeInfo: return self.stub().Info(pb.InfoRequest(), timeout=timeout)

  def stream(self, prompt_ids: list[int] | None = None, prompt: str = "", raw: bool = True, max_tokens: int = 8,
             temperature: float = 0.0, timeout: float = 300, seed: int | None = None) -> Iterator[tuple[int, float]]:
    """(token id, arrival time) as the coordinator streams them."""
    sampling = pb.Sampling(temperature=temperature, max_tokens=max_tokens, **({} if seed is None else {"seed": seed}))
    req = pb.GenerateRequest(prompt_ids=prompt_ids or [], prompt=prompt, raw=raw, sampling=sampling)
    for r in self.stub().Generate(req, timeout=timeout):
      for i in r.ids: yield i, time.monotonic()

  def generate(self, *args, **kw) -> list[int]: return [i for i, _ in self.stream(*args, **kw)]

  def peak_rss(self) -> int:
    with open(f"/proc/{self.popen.pid}/status") as f: return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))


@dataclass
class Cluster:
  procs: list[Proc] = field(default_factory=list)

  def __enter__(self) -> Cluster: return self
  def __exit__(self, *exc) -> None: self.stop()

  def start(self, ports: list[int], log_dir: Path, memory: list[int] | None = None, extra: list[str] = (),
            api_ports: list[int] | None = None) -> Cluster:
    for i, port in enumerate(ports):
      peers = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
      discovery = ["--discovery", "static", "--peers", peers, "--wait-for-peers", str(len(ports) - 1)] if peers else ["--discovery", "none"]
      api_port = api_ports[i] if api_ports else 0
      args = ["--node-id", f"n{i}", "--node-port", str(port), "--api-port", str(api_port), *discovery, "--max-context", "512", *extra]
      if memory: args += ["--memory", str(memory[i])]
      log = log_dir / f"n{i}.log"
      self.procs.append(Proc(f"n{i}", port, self._spawn([sys.executable, "-m", "exo_node", *args], log, len(ports)), log, api_port))
    return self

  @staticmethod
  def _spawn(argv: list[str], log: Path, nodes: int) -> subprocess.Popen:
    """nodes: how many share this host, which its CPU threads are divided by (cpu_threads.default_threads)."""
    return subprocess.Popen(argv, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "LOCAL_WORLD_SIZE": str(nodes)})

  def restart(self, i: int) -> None:
    """Starts node i again with the same arguments (after it died)."""
    p = self.procs[i]
    p.popen = self._spawn(p.popen.args, p.log, len(self.procs))

  def wait_ready(self, timeout: float = 300) -> list[pb.NodeInfo]:
    """Until every node holds layers, together they cover the model exactly once, and each sees all the others."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      for p in self.procs:
        if p.popen.poll() is not None: raise RuntimeError(f"{p.node_id} exited {p.popen.returncode}:\n{p.log.read_text()[-3000:]}")
      try: infos = [p.info() for p in self.procs]
      except grpc.RpcError: infos = []
      if infos and all(i.end_layer > 0 for i in infos) and \
         sorted((i.start_layer, i.end_layer) for i in infos)[-1][1] == infos[0].n_layers and \
         sum(i.end_layer - i.start_layer for i in infos) == infos[0].n_layers and \
         all(len(i.peers) == len(infos) - 1 for i in infos):
        return infos
      time.sleep(0.3)
    raise TimeoutError("cluster not ready:\n" + "\n".join(p.log.read_text()[-1500:] for p in self.procs))

  def sessions(self, procs: list[Proc] | None = None, settle: float = 5.0) -> list[int]:
    """Active KV sessions per node once the frees in flight have landed: a request's End frame travels after its
    last token, so a node may still hold the session just after the client has everything."""
    deadline = time.monotonic() + settle
    while any(n := [p.info().active_sessions for p in procs or self.procs]) and time.monotonic() < deadline: time.sleep(0.05)
    return n

  def stop(self) -> None: terminate([p.popen for p in self.procs], grace=10)
