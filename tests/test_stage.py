"""A stage hands a pass's result on from the pass's own completion: inline when it completes on the event loop's
thread, through the loop when it completes elsewhere, and never for a step whose caller has given up on it."""
import asyncio, threading
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
