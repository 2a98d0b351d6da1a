"""exo-cluster: real launcher processes bringing up real exo-node children on 127.0.0.1 (mDNS on loopback), with a
fake nvidia-smi for the GPU list and a local stand-in for ssh."""
import os, re, signal, subprocess, sys, threading, time, uuid
from pathlib import Path
import grpc
import pytest
from conftest import PROMPT_IDS, free_port, greedy, http, sse
from exo_node.launch.env import inherited, is_secret, masked
from exo_node.launch.spec import assign, parse_hosts, world_env
from exo_node.errors import ExoError
from exo_node.transport.auth import HEADER, proof
from exo_node.transport.pb import exo_node_pb2 as pb, exo_node_pb2_grpc as pbg

LOOPBACK = ["--host", "127.0.0.1", "--mdns-interface", "127.0.0.1", "--max-context", "512"]


class Launcher:
  """One exo-cluster process; its console output collected line by line."""
  def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, nodes: list[str] = ()):
    self.base, self.api, self.cluster = free_port(), free_port(), f"t-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "exo_node.launch.cli", "--base-port", str(self.base), "--api-port", str(self.api),
            "--cluster", self.cluster, "--log-dir", str(tmp / "logs"), "--grace", "10", *args, "--", *LOOPBACK, *nodes]
    self.popen = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.secret = args[args.index("--cluster-secret") + 1] if "--cluster-secret" in args else None
    self.lines: list[str] = []
    threading.Thread(target=lambda: self.lines.extend(iter(self.popen.stdout.readline, "")), daemon=True).start()

  @property
  def output(self) -> str: return "".join(self.lines)

  def wait_for(self, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if m := re.search(pattern, self.output): return m
      if self.popen.poll() is not None: time.sleep(0.2); break
      time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the launcher's output:\n{self.output[-4000:]}")

  def info(self, rank: int, timeout: float = 60) -> pb.NodeInfo:
    stub, deadline = pbg.ExoNodeStub(grpc.insecure_channel(f"127.0.0.1:{self.base + rank}")), time.monotonic() + timeout
    while True:
      proof_md = [(HEADER, proof(self.secret, "/exo_node.v1.ExoNode/Info"))] if self.secret else []
      try: return stub.Info(pb.InfoRequest(), timeout=2, metadata=proof_md)
      except grpc.RpcError:
        if time.monotonic() > deadline: raise
        time.sleep(0.2)

  def children(self) -> list[int]:
    """Pids of every process that carries this cluster's name: the nodes and anything they started."""
    out = subprocess.run(["pgrep", "-f", "--", f"--cluster {self.cluster}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != self.popen.pid]

  def stop(self, sig=signal.SIGTERM) -> int:
    if self.popen.poll() is None: self.popen.send_signal(sig)
    try: return self.popen.wait(40)
    finally:
      for pid in self.children(): os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path):
  started: list[Launcher] = []
  def start(*args, **kw) -> Launcher:
    started.append(Launcher(tmp_path, *args, **kw)); return started[-1]
  yield start
  for l in started: l.stop(signal.SIGKILL)


@pytest.fixture
def fake_gpus(tmp_path) -> dict[str, str]:
  """A PATH whose nvidia-smi lists two GPUs."""
  bin_dir = tmp_path / "bin"; bin_dir.mkdir()
  smi = bin_dir / "nvidia-smi"
  smi.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\necho 'GPU 1: Fake GPU (UUID: GPU-1)'\n"); smi.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_secret_looking_names_are_filtered_unless_passed():
  env = {"HF_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s", "db_password": "p", "GIT_CREDENTIALS": "c", "SSH_KEYFILE": "k", "BEAM": "2"}
  assert inherited(env, set()) == {"BEAM": "2"}
  assert inherited(env, {"HF_TOKEN"}) == {"HF_TOKEN": "t", "BEAM": "2"}
  assert masked({"HF_TOKEN": "t", "DEBUG": "2"}) == {"HF_TOKEN": "****", "DEBUG": "2"}
  assert not is_secret("HSA_OVERRIDE_GFX_VERSION")


def test_ranks_and_ports_follow_torchrun(tmp_path):
  hosts = tmp_path / "hosts"
  hosts.write_text("# lab\nlocalhost gpus=0,1\nlabbox cpu-nodes=2  # the old laptop\n")
  specs = assign(parse_hosts(hosts), 8001, 52415)
  assert [(s.node_id, s.host.name, s.gpu, s.port, s.api_port) for s in specs] == [
    ("node-0", "localhost", 0, 8001, 52415), ("node-1", "localhost", 1, 8002, 52416),
    ("node-2", "labbox", None, 8001, 52415), ("node-3", "labbox", None, 8002, 52416)]
  env = world_env(specs[3], specs)
  assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT")} == \
    {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "MASTER_PORT": "8001"}
  assert "CUDA_VISIBLE_DEVICES" not in env and world_env(specs[1], specs)["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("text, error", [("labbox gpus=a", r"hosts:1: cannot read .gpus=a."), ("labbox", "runs no node"), ("labbox mem=3", "cannot read 'mem=3'")])
def test_bad_hosts_file_is_refused_with_the_line(tmp_path, text, error):
  (tmp_path / "hosts").write_text(text + "\n")
  with pytest.raises(ExoError, match=error): parse_hosts(tmp_path / "hosts")


@pytest.mark.parametrize("args, error", [
  (["--gpus", "0,1"], "--gpus 0,1: no NVIDIA GPU found"),
  (["--gpus", "0,7", "+fake"], "--gpus 0,7: GPU 7 not present (found 0,1)"),
  ([], "nothing to start"),
  (["--cpu-nodes", "1", "--node-env", "3:A=b"], "--node-env '3:A=b': expected RANK:NAME=VALUE with RANK < 1"),
  (["--cpu-nodes", "1", "--env", "novalue"], "--env 'novalue': expected NAME=VALUE"),
  (["--hosts", "/nonexistent/hosts"], "--hosts /nonexistent/hosts: No such file or directory"),
])
def test_bad_launch_arguments_fail_in_one_line(args, error, fake_gpus):
  env = {**os.environ, **(fake_gpus if "+fake" in args else {"PATH": "/usr/bin:/bin"})}
  r = subprocess.run([sys.executable, "-m", "exo_node.launch.cli", *[a for a in args if a != "+fake"]], capture_output=True, text=True, env=env, timeout=60)
  assert r.returncode == 2 and r.stderr.startswith(f"exo-cluster: error: {error}") and r.stderr.count("\n") == 1, r.stderr
  assert "Traceback" not in r.stderr


def test_print_env_shows_each_gpu_and_masks_secrets(fake_gpus):
  env = {**os.environ, **fake_gpus, "EXO_TEST_TOKEN": "hunter2"}
  r = subprocess.run([sys.executable, "-m", "exo_node.launch.cli", "--gpus", "all", "--print-env", "--pass-env", "EXO_TEST_TOKEN",
                      "--cluster-secret", "s3cret"], capture_output=True, text=True, env=env, timeout=60)
  assert r.returncode == 0, r.stderr
  nodes = re.split(r"^node-", r.stdout, flags=re.M)[1:]
  assert [re.search(r"CUDA_VISIBLE_DEVICES=(\d)", n)[1] for n in nodes] == ["0", "1"]
  assert all("DEV=CUDA" in n and "EXO_TEST_TOKEN=****" in n and "EXO_CLUSTER_SECRET=****" in n for n in nodes)
  assert "hunter2" not in r.stdout and "s3cret" not in r.stdout


def test_children_get_their_gpu_ranks_and_the_filtered_environment(launch, fake_gpus):
  """Read back from each child's real environment (node-info), before the model loads; then Ctrl-C mid start-up."""
  env = {**fake_gpus, "EXO_TEST_INHERITED": "yes", "EXO_TEST_TOKEN": "hunter2", "EXO_TEST_API_KEY": "k1", "BEAM": "0"}
  l = launch("--gpus", "0,1", "--env", "DEV=CPU", "--pass-env", "EXO_TEST_API_KEY", "--node-env", "1:EXO_TEST_INHERITED=override",
             "--restart", "on-failure", env=env)
  got = [dict(l.info(r).env) for r in (0, 1)]
  assert [(e["CUDA_VISIBLE_DEVICES"], e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"]) for e in got] == \
    [("0", "0", "0", "2", "2", "0"), ("1", "1", "1", "2", "2", "0")]
  assert all(e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == str(l.base) and e["BEAM"] == "0" for e in got)
  assert [e.get("EXO_TEST_INHERITED") for e in got] == ["yes", "override"]
  assert all("EXO_TEST_TOKEN" not in e and e["EXO_TEST_API_KEY"] == "k1" for e in got)

  os.kill(int(subprocess.run(["pgrep", "-f", "--", f"--node-id node-1 .*--cluster {l.cluster}"], capture_output=True, text=True).stdout.split()[0]), signal.SIGKILL)
  l.wait_for(r"node-1 exited with code -9; log .*node-1\.log, last lines:\n    ", 30)  # a crash is reported...
  l.wait_for(r"restarting node-1 \(1/3\)", 10)  # ...and restarted with the same environment
  assert dict(l.info(1).env)["EXO_TEST_INHERITED"] == "override"
  assert l.stop(signal.SIGINT) == 0 and l.children() == []
  assert "stopped" in l.output


def test_three_cpu_nodes_form_a_cluster_answer_drain_at_sigterm_and_leave_nothing_behind(launch, full_engine, weights):
  from exo_node.model.loader import open_tokenizer
  l = launch("--cpu-nodes", "3", "--timeout", "300", "--cluster-secret", "s3cret")  # streams carry proofs
  l.wait_for(r"ready: smollm2-135m on 3 nodes", 300)
  assert re.search(r"node-0\s+127\.0\.0\.1:\d+\s+CPU\s+[\d.]+ GiB\s+\[0, 10\)", l.output)
  assert re.search(r"\[node-2\] .*mDNS: peer node-0 joined", l.output)  # the children's lines, prefixed
  want = open_tokenizer(weights).decode(greedy(full_engine, "launch", PROMPT_IDS, 6)[0])
  req = {"model": "smollm2-135m", "prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0}
  def complete() -> str:
    status, reply = http(f"http://127.0.0.1:{l.api + 1}/v1/completions", req)
    assert status == 200, reply
    return reply["choices"][0]["text"]
  assert complete() == want

  # SIGTERM mid-stream: the nodes drain, the stream still completes
  stream = sse(f"http://127.0.0.1:{l.api + 1}", {**req, "max_tokens": 12})
  got = [next(stream)[1], next(stream)[1]]
  l.popen.send_signal(signal.SIGTERM)
  got += [e for _, e in stream]
  assert got[-1]["choices"][0]["finish_reason"] == "length" and not [e for e in got if "error" in e]
  assert "".join(e["choices"][0]["text"] for e in got if e.get("choices")).startswith(want)
  assert l.stop(signal.SIGTERM) == 0
  assert l.children() == [], "orphan processes left behind"
  assert (l.output.index("stopping every node") < l.output.index("stopped"))


def test_nodes_on_other_hosts_start_over_ssh_with_the_filtered_environment(launch, tmp_path):
  calls = tmp_path / "ssh-calls"
  ssh = tmp_path / "fake-ssh"  # a remote login: a fresh environment, then the command line it was given
  ssh.write_text(f'#!/bin/sh\nhost="$1"; shift\necho "$host" >> {calls}\nexec env -i HOME="$HOME" PATH=/usr/bin:/bin sh -c "$*"\n')
  ssh.chmod(0o755)
  port, api = free_port(), free_port()  # "labbox" is this machine too, so its node needs ports of its own
  (tmp_path / "hosts").write_text(f"localhost cpu-nodes=1\nlabbox cpu-nodes=1 base-port={port} api-port={api}\n")
  l = launch("--hosts", str(tmp_path / "hosts"), "--ssh-command", str(ssh), "--timeout", "300",
             env={"EXO_TEST_INHERITED": "yes", "EXO_TEST_TOKEN": "hunter2"})
  l.wait_for(r"ready: smollm2-135m on 2 nodes", 300)
  assert calls.read_text().split() == ["labbox"]
  info = pbg.ExoNodeStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Info(pb.InfoRequest(), timeout=5)
  env = dict(info.env)
  assert info.node_id == "node-1" and (env["RANK"], env["GROUP_RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "0", "2")
  assert env["EXO_TEST_INHERITED"] == "yes" and "EXO_TEST_TOKEN" not in env
  assert l.stop(signal.SIGTERM) == 0 and l.children() == []
