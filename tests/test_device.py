"""Device binding: one process per GPU via CUDA_VISIBLE_DEVICES, set before tinygrad loads, and read back."""
import os, signal, socket
import pytest
from conftest import exo_node, spawn, wait_until
from exo_node.local_cluster import Proc


def info_when_up(p: Proc):
  def up():
    assert p.popen.poll() is None, p.log.read_text()[-2000:]
    return p.info()
  return wait_until(up, 120, f"the node on port {p.port}")


@pytest.fixture
def node(tmp_path):
  procs = []
  def start(*args, env=None):
    procs.append(p := spawn(tmp_path, "--api-port", "0", "--discovery", "none", "--max-context", "64", *args, env=env))
    return info_when_up(p), p
  yield start
  for p in procs:
    os.killpg(p.popen.pid, signal.SIGTERM); p.popen.wait(15)


def test_gpu_flag_sets_cuda_visible_devices_before_the_engine_starts(node):
  info, _ = node("--gpu", "3", "--device", "CPU")
  assert info.env["CUDA_VISIBLE_DEVICES"] == "3"


def test_cuda_visible_devices_from_the_environment_is_honoured_as_is(node):
  info, _ = node("--device", "CPU", env={"CUDA_VISIBLE_DEVICES": "1"})
  assert info.env["CUDA_VISIBLE_DEVICES"] == "1"


def test_cpu_node_reports_its_ram_and_a_stable_default_id(node):
  info, p = node()
  with open("/proc/meminfo") as f: total = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemTotal"))
  assert info.memory_bytes == total and info.device.startswith("CPU")
  assert info.node_id == f"{socket.gethostname()}-{p.port}"


def test_memory_flag_overrides_the_detected_value(node):
  info, _ = node("--memory", "123456789")
  assert info.memory_bytes == 123456789


def test_gpu_flag_without_a_gpu_fails_clearly():
  r = exo_node("--gpu", "0", "--discovery", "none", "--node-port", "0", "--prompt", "hi", timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "CUDA" in r.stderr.strip().splitlines()[-1]


def test_cpu_waits_poll_with_sleeps_instead_of_spinning_with_the_gil(full_engine):
  """tinygrad's own wait for its CPU worker spins in Python with the GIL held, which stalled a node's gRPC threads;
  ours is in place once the device is open, and returns only when the worker's counter reaches the value."""
  import array, threading
  from tinygrad import Device
  from exo_node import device
  dev = full_engine.submit(lambda: (device.capabilities(), Device["CPU"])[1]).result()
  assert type(dev)._wait_signal.__module__ == "exo_node.device"
  counter = array.array("Q", [0])
  threading.Timer(0.05, counter.__setitem__, (0, 3)).start()
  dev._wait_signal(memoryview(counter), 3)
  assert counter[0] == 3


def test_a_cpu_wait_told_when_the_work_should_end_still_returns_only_once_it_has(full_engine):
  """expect_done lets the wait sleep to a step's usual end instead of polling: a hint too early is no harm, and it
  holds for one wait only."""
  import array, threading, time
  from tinygrad import Device
  from exo_node import device
  dev = full_engine.submit(lambda: (device.capabilities(), Device["CPU"])[1]).result()
  for hint in (0.01, 0.0):
    counter = array.array("Q", [0])
    threading.Timer(0.05, counter.__setitem__, (0, 1)).start()
    device.expect_done(time.monotonic() + hint)
    dev._wait_signal(memoryview(counter), 1)
    assert counter[0] == 1 and device._done_by == 0.0
