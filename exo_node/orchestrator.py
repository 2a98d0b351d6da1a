"""The coordinator's side of a request: pin a plan, feed the prompt into the first shard, collect each sampled
token from the last shard, decide when to stop, and free the request on every node when it ends."""
from __future__ import annotations
import asyncio, itertools, logging, time, uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable
import numpy as np
from exo_node.engine import SessionLimitError
from exo_node.errors import ExoError
from exo_node.model.sampling import SamplingParams
from exo_node.stage import Stage
from exo_node.topology import Plan
from exo_node.transport.link import Link
from exo_node.transport.pb import exo_node_pb2 as pb

log = logging.getLogger(__name__)
STEP_TIMEOUT = 600.0  # a cold CPU node compiles (and with --beam searches) kernels during the first steps
DETECT_TIMEOUT = 3.0  # how long a failed request waits for discovery to drop the dead node before giving up
MAX_REPLANS = 3
BUSY_WAIT = 120.0  # how long a request waits for a KV session on a full node before it fails
PROMPT_PART = 64  # prompt positions per frame into a pipeline: the next shard runs a part while this one runs the next


class GenerationError(ExoError):
  """The pipeline failed mid-request (a peer died or refused a frame). `busy`: a node had no free KV session."""
  def __init__(self, message: str, busy: bool = False): super().__init__(message); self.busy = busy


@dataclass
class Stats:
  prompt_tokens: int = 0
  completion_tokens: int = 0
  ttft_s: float = 0.0
  finish: str = "length"  # "stop" once a stop token (or stop string) ends the request
  started: float = field(default_factory=time.monotonic)

  @property
  def elapsed_s(self) -> float: return time.monotonic() - self.started


class Orchestrator:
  """Runs a request over a pinned plan. When a node of that plan dies mid-request, it re-plans over the survivors
  and replays the prefix (prompt + tokens so far) under a new request id: the client sees one stream."""
  def __init__(self, node_id: str, address: str, model_id: str, stage: Stage, plan: Callable[[], Plan],
               live: Callable[[], set[str]], max_inflight: int = 16):
    self.node_id, self.address, self.model_id, self.stage, self.plan, self.live = node_id, address, model_id, stage, plan, live
    self.slots = asyncio.Semaphore(max_inflight)  # more requests wait here (backpressure), not in the nodes' KV caches
    self.active = 0  # requests coordinated here, waiting or running

  async def generate(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int] = frozenset(),
                     request_id: str | None = None, stats: Stats | None = None) -> AsyncIterator[int]:
    """Yields sampled token ids; stops on a stop id (not yielded) or after params.max_tokens."""
    self.active += 1
    try:
      async with self.slots, aclosing(self._generate(prompt, params, stop_ids, request_id, stats or Stats())) as tokens:
        async for tok in tokens: yield tok
    finally: self.active -= 1

  async def _generate(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int], request_id: str | None,
                      stats: Stats) -> AsyncIterator[int]:
    rid = request_id or uuid.uuid4().hex
    stats.prompt_tokens, done, plan = len(prompt), [], self.plan()
    attempt, waited = 0, 0.0
    for tries in itertools.count():
      try:
        async for tok in self._run(f"{rid}.{tries}" if tries else rid, plan, prompt, done, params, stop_ids, stats):
          done.append(tok); yield tok
        return
      except GenerationError as e:
        if e.busy and waited < BUSY_WAIT:  # other coordinators hold a node's sessions: wait for one, same plan
          await asyncio.sleep(delay := min(0.1 * 1.5 ** tries, 1.0)); waited += delay; continue
        if e.busy: raise GenerationError(f"the cluster stayed busy for {BUSY_WAIT:.0f}s: {e}") from None
        if attempt == MAX_REPLANS: raise
        attempt += 1
        t0 = time.monotonic()
        plan = await self._replan(plan, e)
        log.warning("request %s: %s; re-planned over %s in %.2fs, replaying %d tokens", rid, e,
                    ", ".join(f"{x.node_id}[{x.start},{x.end})" for x in plan.shards), time.monotonic() - t0, len(prompt) + len(done))

  async def _replan(self, old: Plan, error: GenerationError) -> Plan:
    """Once discovery has dropped the dead node(s) of `old`: a plan over the survivors, or an error naming them."""
    deadline = time.monotonic() + DETECT_TIMEOUT
    while not (gone := [x for x in old.shards if x.node_id not in self.live()]):
      if time.monotonic() > deadline: raise error  # every node of the plan is alive: not a failure re-planning fixes
      await asyncio.sleep(0.05)
    names = ", ".join(f"{x.node_id} ({x.address})" for x in gone)
    try: return self.plan()
    except ExoError as e: raise GenerationError(f"node {names} left the cluster and the remaining nodes cannot serve the model: {e}") from None

  async def _run(self, rid: str, plan: Plan, prompt: list[int], done: list[int], params: SamplingParams,
                 stop_ids: frozenset[int], stats: Stats) -> AsyncIterator[int]:
    """One attempt: the prefix (prompt + tokens already produced) goes in as the prompt, then decode."""
    s = params
    sampling = pb.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_tokens=s.max_tokens,
                           **({"seed": s.seed} if s.seed is not None else {}))
    header = pb.Header(request_id=rid, model_id=self.model_id, plan=plan.to_proto(), sampling=sampling,
                       coordinator_id=self.node_id, coordinator_address=self.address)
    tokens: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    prefix, left = [*prompt, *done], s.max_tokens - len(done)
    local = plan.first.node_id == self.node_id
    alone = local and len(plan.shards) == 1  # the engine thread runs the steps back to back (Stage.chain)
    more = lambda step, tok: tok not in stop_ids and step + 1 < left
    link: Link | None = None
    steps: set[asyncio.Task] = set()  # on a local first shard each step is a task; its error arrives as a token

    def feed(step: int, pos: int, ids: list[int], partial: bool = False) -> None:
      if link is not None: return link.send(pb.Frame(step=pb.Step(step=step, position=pos, tokens=pb.TokenIds(ids=ids), partial=partial)))
      def finished(t: asyncio.Task) -> None:
        steps.discard(t)
        if not t.cancelled() and t.exception() is not None: tokens.put_nowait((step, t.exception()))
      steps.add(task := asyncio.ensure_future(self.stage.step(rid, step, pos, np.asarray(ids, dtype=np.int64), partial)))
      task.add_done_callback(finished)

    def arrive(step: int, tok: int | Exception) -> None:
      """The next step is fed the moment a token arrives, before this loop runs anything else: the tokens of a
      decode batch come back one after another, and the batch runs again only once each of them is fed. Fed to
      this node's engine, the token goes on to the client once that step is under way (Engine.defer): first, the
      client's share of the loop held the GIL while the engine started (2 nodes: ~0.3 ms of every token)."""
      if not alone and not isinstance(tok, Exception) and more(step, tok):
        try:
          feed(step + 1, len(prefix) + step, [tok])
          if local: return self.stage.engine.defer(lambda: loop.call_soon_threadsafe(tokens.put_nowait, (step, tok)))
        except ExoError as e: tok = e
      tokens.put_nowait((step, tok))

    self.stage.deliver[rid] = arrive
    try:
      if local: await self.stage.open(header)
      else: link = Link(self.stage.channels, plan.first.address, header, lambda err: self.stage.fail(rid, err))
      if alone: self.stage.chain(rid, np.asarray(prefix, dtype=np.int64), more, left)
      else:
        for at in range(0, len(prefix), PROMPT_PART): feed(0, at, prefix[at:at + PROMPT_PART], at + PROMPT_PART < len(prefix))
      for step in range(left):
        try: _, tok = await asyncio.wait_for(tokens.get(), STEP_TIMEOUT)
        except asyncio.TimeoutError: raise GenerationError(f"request {rid}: no token from the pipeline in {STEP_TIMEOUT:.0f}s") from None
        if isinstance(tok, Exception):
          if not isinstance(tok, ExoError): raise tok
          raise GenerationError(f"request {rid} failed: {tok}", busy=isinstance(tok, SessionLimitError) or "RESOURCE_EXHAUSTED" in str(tok))
        if not done and step == 0: stats.ttft_s = time.monotonic() - stats.started
        if tok in stop_ids: stats.finish = "stop"; return
        stats.completion_tokens += 1
        yield tok  # the next step is already running (arrive)
    except ExoError as e:
      if isinstance(e, GenerationError): raise
      raise GenerationError(f"request {rid} failed: {e}", busy=isinstance(e, SessionLimitError)) from None
    finally:
      for task in steps: task.cancel()
      self.stage.deliver.pop(rid, None)
      if link is not None: link.close("done")
      else: self.stage.close(rid, "done")
