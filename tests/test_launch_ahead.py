"""A lone request runs its decode passes launched ahead of their input (model/gate.py): in a pipeline once its last
pass has ended, on one node behind the pass that runs. The same outputs, and whatever else needs the device lets a
held pass go first, so nothing ever waits behind it."""
import asyncio, ctypes, os, threading, time
import numpy as np
import pytest
from tinygrad import Device
from conftest import PROMPT_IDS
from exo_node.engine import Engine
from exo_node.model import gate
from exo_node.model.loader import load_shard

TOKENS = [7042, 30, 198, 198, 504, 2988]  # fed as the next steps' ids, whatever the shard's outputs


@pytest.fixture(scope="module")
def first(weights): return Engine(lambda: load_shard(weights, 0, 15, max_context=256))


@pytest.fixture(scope="module")
def plain(first) -> list[np.ndarray]:
  """The hidden states of the prompt and of TOKENS through plain passes, with the gate off."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gate, "supported", lambda device: False)
    out = steps(first, "plain", 1, len(TOKENS))
  first.free("plain")
  return out


def steps(e: Engine, rid: str, stages: int, n: int, start: int = 0) -> list[np.ndarray]:
  """The prompt (unless start > 0), then TOKENS[start:n] as single steps. A lone request's pipeline step comes once
  its pass is launched ahead, as the other nodes' passes give it time to (a step that comes sooner finds none:
  Engine._launch_ahead waits first), except the first one here, whose pass no earlier step launched; the others
  after 5 ms."""
  out = [] if start else [e.forward(rid, 0, np.array(PROMPT_IDS), stages=stages).result(timeout=120)]
  for i in range(start, n):
    pos = len(PROMPT_IDS) + i
    if stages > 1 and i > start and list(e.sessions) == [rid]: launched(rid, pos)
    else: time.sleep(0.005)
    out.append(e.forward(rid, pos, np.array(TOKENS[i:i + 1]), stages=stages).result(timeout=120))
  return out


def launched(rid: str, pos: int, timeout: float = 10) -> bool:
  """Whether rid's pass at pos is held, waiting for it to be launched (on a loaded machine the launch takes longer)."""
  deadline = time.monotonic() + timeout
  while not ((h := gate._held) and (h.request_id, h.start_pos) == (rid, pos)) and time.monotonic() < deadline: time.sleep(0.001)
  return time.monotonic() < deadline


def held() -> gate.Held | None:
  """The pass held now, once the engine has launched it (it waits a little first)."""
  deadline = time.monotonic() + 10
  while gate._held is None and time.monotonic() < deadline: time.sleep(0.001)
  return gate._held


def test_every_step_after_the_first_runs_launched_ahead_with_the_same_output(first, plain):
  before = first.steps_ahead
  ahead = steps(first, "ahead", 2, len(TOKENS))
  assert first.steps_ahead - before == len(TOKENS) - 1  # the prompt's pass and the first decode pass launch no step ahead
  for a, b in zip(ahead, plain): np.testing.assert_array_equal(a, b)
  assert held() is not None and held().start_pos == len(PROMPT_IDS) + len(TOKENS)
  first.free("ahead")
  assert gate._held is None


def test_on_an_event_loop_the_loop_itself_takes_each_result_when_its_pass_ends(first, plain):
  """The pass's end wakes the loop through the eventfd behind it: the engine thread neither polls nor hands over."""
  async def run() -> tuple[list[np.ndarray], list[str]]:
    out, threads = [], []
    for i in range(len(TOKENS) + 1):
      # the prompt and the first decode step come first; each later step once its pass is launched ahead
      if i >= 2: await asyncio.to_thread(launched, "loop", len(PROMPT_IDS) + i - 1)
      else: await asyncio.sleep(0.005)
      f = first.forward("loop", 0, np.array(PROMPT_IDS), stages=2) if i == 0 else \
          first.forward("loop", len(PROMPT_IDS) + i - 1, np.array(TOKENS[i - 1:i]), stages=2)
      f.add_done_callback(lambda _: threads.append(threading.current_thread().name))
      out.append(await asyncio.wait_for(asyncio.wrap_future(f), 120))
    return out, threads
  before = first.steps_ahead
  out, threads = asyncio.run(run())
  assert first.steps_ahead - before == len(TOKENS) - 1
  assert threads[2:] == [threading.main_thread().name] * (len(TOKENS) - 1)  # the loop's thread, not the engine's
  for a, b in zip(out, plain): np.testing.assert_array_equal(a, b)
  first.free("loop")


def test_a_job_on_the_device_lets_the_held_pass_go_and_the_request_goes_on(first, plain):
  out = steps(first, "a", 2, 2)
  assert held().request_id == "a"
  # tinygrad work on the engine thread (a new KV cache is written zeros): behind a closed gate it would wait forever
  first.submit(lambda: first.model.new_cache()).result(timeout=60)
  assert gate._held is None
  out += steps(first, "a", 2, 4, start=2)
  for a, b in zip(out, plain): np.testing.assert_array_equal(a, b)
  first.free("a")


def test_another_request_lets_the_held_pass_go_and_both_get_their_outputs(first, plain):
  a = steps(first, "a", 2, 2)
  assert held().request_id == "a"
  b = steps(first, "b", 2, 2)  # its prompt releases a's pass; with two requests here, no step is launched ahead
  a += steps(first, "a", 2, 3, start=2)
  assert gate._held is None
  for x in (a, b):
    for got, want in zip(x, plain): np.testing.assert_array_equal(got, want)
  first.free("a"); first.free("b")


def test_another_engine_of_the_process_runs_while_this_one_holds_a_pass(first, plain, weights):
  h = steps(first, "a", 2, 2)
  assert held().request_id == "a"
  last = Engine(lambda: load_shard(weights, 15, 30, max_context=256))  # its load and its pass release first's
  logits = last.forward("a", 0, h[0]).result(timeout=120)
  assert logits.shape == (weights.config.vocab_size,) and gate._held is None
  first.free("a")


def test_a_bad_step_into_a_held_pass_fails_alone_and_the_request_goes_on(first, plain):
  out = steps(first, "c", 2, 2)
  assert held().request_id == "c"
  with pytest.raises(IndexError):  # an id past the vocabulary (the transport refuses it before the engine)
    first.forward("c", len(PROMPT_IDS) + 2, np.array([10 ** 9]), stages=2).result(timeout=60)
  out += steps(first, "c", 2, 4, start=2)
  for a, b in zip(out, plain): np.testing.assert_array_equal(a, b)
  first.free("c")


def test_one_nodes_lone_request_launches_each_pass_behind_the_running_one_with_the_same_output(first, plain):
  """Each step's result is set with the next pass already launched behind it (Engine._launch_behind), on the decode
  step's two captures in turn; the last step launches none."""
  out = [first.forward("one", 0, np.array(PROMPT_IDS)).result(timeout=120)]
  waiting, before = [], first.steps_ahead
  for i, t in enumerate(TOKENS):
    f = first.forward("one", len(PROMPT_IDS) + i, np.array([t]), last=i == len(TOKENS) - 1)
    f.add_done_callback(lambda _: waiting.append(gate._held and gate._held.start_pos))  # as the result is set
    out.append(f.result(timeout=120))
  after = len(PROMPT_IDS) + len(TOKENS)
  assert waiting == [*range(len(PROMPT_IDS) + 1, after), None]
  assert first.steps_ahead - before == len(TOKENS) - 1  # the first decode step's pass was launched as it came
  assert first._jits[("twin", 1, 1)].captured is not None
  for a, b in zip(out, plain): np.testing.assert_array_equal(a, b)
  first.free("one")


def test_each_pass_end_is_read_as_its_own_so_a_released_pass_counts_for_the_next(first):
  """Read late, the eventfd holds the end of a taken pass and that of a pass released behind it (as free() does while
  a pass runs): the taken pass takes one, the next taken pass skips the other (Held.skip)."""
  first.submit(lambda: Device[first.model.device].synchronize()).result(timeout=60)  # what earlier tests let go has run
  gate.ended(gate.Held(None, "", 0, None, (0, 0), None, [], range(0), skip=1 << 30))  # and its ends are read
  gate._released = 0
  running = gate.Held(None, "a", 0, None, (0, 0), None, [], range(0))
  os.eventfd_write(gate.fd(), 1); os.eventfd_write(gate.fd(), 1)  # its end, then the released pass's
  assert gate.ended(running)
  taken = gate.Held(None, "a", 1, None, (0, 0), None, [], range(0), skip=1)
  assert not gate.ended(taken)
  os.eventfd_write(gate.fd(), 1)
  assert gate.ended(taken)


def test_a_released_pass_runs_none_of_its_kernels_and_the_request_goes_on(first, plain):
  """Let go, a held pass writes nothing, not even the cache entries of its own position (gate.drop); the queue's
  own signals still run, so the device synchronizes, and the request's next step gets its output."""
  first._spare.clear()  # a new cache, zeros where the held pass would write its position's keys and values
  out = steps(first, "n", 2, 2)
  assert held().request_id == "n"
  raw = lambda: [ctypes.string_at(t.uop.buffer._buf.va_addr, t.uop.buffer.nbytes) for t in first.sessions["n"].kv]
  before = raw()
  gate.release()
  first.submit(lambda: Device[first.model.device].synchronize()).result(timeout=60)
  assert raw() == before
  out += steps(first, "n", 2, 4, start=2)
  for a, b in zip(out, plain): np.testing.assert_array_equal(a, b)
  first.free("n")


def test_a_prompt_that_comes_while_a_pass_runs_behind_another_leaves_its_output_alone(first, plain):
  """One node: a step's callback sends a new prompt (9 positions: a chunk of 8 and a lone one-row pass) just before
  the lone request's next step, whose pass was launched behind and is opened now. The prompt's passes run before
  that step is collected, and none of them may replay the capture whose output the step has not read yet: that
  step's pass replays the decode step's own capture (the first lone step takes it, the next the twin, the next it
  again), which the prompt's one-row pass would take too. Twice, the second time on captures already used."""
  prompt = [*PROMPT_IDS, 11, 12, 13, 14]
  want = first.forward("ref", 0, np.array(prompt)).result(timeout=120)
  first.free("ref")
  for r in range(2):
    out, done = [first.forward("one", 0, np.array(PROMPT_IDS)).result(timeout=120)], threading.Event()
    def step(i: int) -> None:
      def next_step(f) -> None:
        out.append(f.result())
        if i + 1 == len(TOKENS): return done.set()
        if i == 1: prompts.append(first.forward("p", 0, np.array(prompt)))  # queued before the next step's collect
        step(i + 1)
      first.forward("one", len(PROMPT_IDS) + i, np.array(TOKENS[i:i + 1])).add_done_callback(next_step)
    prompts: list = []
    step(0)
    assert done.wait(120)
    for a, b in zip(out, plain): np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(prompts[0].result(timeout=120), want)
    first.free("one"); first.free("p")
