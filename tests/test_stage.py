"""A stage hands a pass's result on from the pass's own completion: inline when it completes on the event loop's
thread, through the loop when it completes elsewhere, and never for a step whose caller has given up on it. A
request of one node alone chains its steps on the engine thread and hands its tokens to the loop."""
import asyncio, queue, threading
from concurrent.futures import Future
from types import SimpleNamespace
import numpy as np
from exo_node.stage import Stage
from exo_node.topology import Plan, Shard
from exo_node.transport.pb import exo_node_pb2 as pb

PLAN = Plan((Shard("a", "127.0.0.1:1", 0, 15), Shard("b", "127.0.0.1:2", 15, 30)))
HIDDEN = np.arange(576, dtype=np.float32)[None]


class Sent:
  """Stands in for the link to the next shard: records what the stage sends there."""
  def __init__(self): self.frames: list[pb.Frame] = []
  def send(self, frame: pb.Frame) -> None: self.frames.append(frame)


async def first_shard(forward: Future) -> tuple[Stage, Sent]:
  engine = SimpleNamespace(model=SimpleNamespace(start=0, end=15), forward=lambda *a: forward, free=lambda rid: None)
  stage, sent = Stage("a", engine, channels=None, n_layers=30), Sent()
  stage._link = lambda req, address: sent if address == "127.0.0.1:2" else None
  await stage.open(pb.Header(request_id="r", plan=PLAN.to_proto()))
  return stage, sent


def test_a_pass_that_ends_on_the_loops_thread_is_handed_on_before_anything_else_runs_there():
  async def run() -> None:
    forward = Future()
    stage, sent = await first_shard(forward)
    done = stage.step("r", 0, 4, np.zeros((1, 576), np.float32))
    forward.set_result(HIDDEN)  # as the loop's eventfd reader settles a pass launched ahead
    assert len(sent.frames) == 1 and done.done()  # no turn of the loop in between
    s = sent.frames[0].step
    assert (s.step, s.position, list(s.hidden.shape)) == (0, 4, [1, 576])
    assert np.frombuffer(s.hidden.data, np.float32).tolist() == HIDDEN[0].tolist()
  asyncio.run(run())


def test_a_pass_that_ends_on_another_thread_is_handed_on_by_the_loop():
  async def run() -> None:
    forward = Future()
    stage, sent = await first_shard(forward)
    done = stage.step("r", 0, 4, np.zeros((1, 576), np.float32))
    threading.Thread(target=forward.set_result, args=(HIDDEN,)).start()
    await asyncio.wait_for(done, 5)
    assert len(sent.frames) == 1
  asyncio.run(run())


def test_a_step_given_up_on_hands_nothing_on_and_a_failed_pass_fails_its_step():
  async def run() -> None:
    forward = Future()
    stage, sent = await first_shard(forward)
    stage.step("r", 0, 4, np.zeros((1, 576), np.float32)).cancel()  # its stream's handler was cancelled
    forward.set_result(HIDDEN)
    await asyncio.sleep(0)
    assert sent.frames == []
    failing = Future()
    stage.engine.forward = lambda *a: failing
    done = stage.step("r", 1, 5, np.zeros((1, 576), np.float32))
    failing.set_exception(ValueError("a bad step"))
    assert isinstance(done.exception(), ValueError) and sent.frames == []
  asyncio.run(run())


def test_a_prompt_in_parts_keeps_its_step_number_and_passes_partial_on_until_its_last_part():
  async def run() -> None:
    forward = Future(); forward.set_result(HIDDEN)
    stage, sent = await first_shard(forward)
    for pos, partial in ((0, True), (64, True), (128, False)): await stage.step("r", 0, pos, np.zeros((64, 576), np.float32), partial)
    await stage.step("r", 1, 192, np.zeros((1, 576), np.float32))
    assert [(f.step.step, f.step.position, f.step.partial) for f in sent.frames] == [(0, 0, True), (0, 64, True), (0, 128, False), (1, 192, False)]
  asyncio.run(run())


def test_the_last_shard_samples_nothing_until_the_prompts_last_part():
  async def run() -> None:
    logits = np.zeros(50, np.float32); logits[7] = 1
    forward = Future(); forward.set_result(logits)
    engine = SimpleNamespace(model=SimpleNamespace(start=15, end=30), forward=lambda *a: forward, free=lambda rid: None)
    stage, got = Stage("b", engine, channels=None, n_layers=30), []
    await stage.open(pb.Header(request_id="r", plan=PLAN.to_proto(), coordinator_id="b", sampling=pb.Sampling(temperature=0)))
    stage.deliver["r"] = lambda step, tok: got.append((step, tok))
    await stage.step("r", 0, 0, HIDDEN, partial=True)
    assert got == []
    await stage.step("r", 0, 64, HIDDEN)
    assert got == [(0, 7)]
  asyncio.run(run())


class ChainEngine:
  """Completes each step on a thread of its own, as the engine thread does, with logits whose greedy token is 7; and
  runs deferred work at once, as Engine.defer does while a pass is opened."""
  def __init__(self):
    self.model, self.calls, self.steps = SimpleNamespace(start=0, end=30), [], queue.Queue()
    self.logits = np.zeros(50, np.float32); self.logits[7] = 1
    threading.Thread(target=self._run, daemon=True).start()  # daemon: a deadlocked step must not keep the tests alive
  def _run(self) -> None:
    while True: self.steps.get().set_result(self.logits)
  def forward(self, rid: str, pos: int, data: np.ndarray, last: bool = False) -> Future:
    self.calls.append((pos, last))
    self.steps.put(f := Future())
    return f
  def defer(self, fn) -> None: fn()
  def free(self, rid: str) -> None: pass


def test_a_chain_hands_its_tokens_on_while_the_engine_runs_deferred_work_at_once_and_marks_the_last_step():
  async def run() -> None:
    engine = ChainEngine()
    stage = Stage("a", engine, channels=None, n_layers=30)
    alone = Plan((Shard("a", "127.0.0.1:1", 0, 30),)).to_proto()
    await stage.open(pb.Header(request_id="r", plan=alone, sampling=pb.Sampling(temperature=0)))
    got, all_in = [], asyncio.Event()
    def deliver(step: int, tok: int) -> None:
      got.append((step, tok))
      if len(got) == 4: all_in.set()
    stage.deliver["r"] = deliver
    stage.chain("r", np.array([1, 2, 3]), lambda step, tok: step + 1 < 4, 4)
    await asyncio.wait_for(all_in.wait(), 5)
    assert got == [(s, 7) for s in range(4)]
    assert engine.calls == [(0, False), (3, False), (4, False), (5, True)]  # no pass goes in behind the last step
  asyncio.run(run())
