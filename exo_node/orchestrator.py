"""The coordinator's side of a request: pin a plan, feed the prompt into the first shard, collect each sampled
token from the last shard, decide when to stop, and free the request on every node when it ends."""
from __future__ import annotations
import asyncio, logging, time, uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable
import numpy as np
from exo_node.errors import ExoError
from exo_node.model.sampling import SamplingParams
from exo_node.stage import Stage
from exo_node.topology import Plan
from exo_node.transport.link import Link
from exo_node.transport.pb import exo_node_pb2 as pb

log = logging.getLogger(__name__)
STEP_TIMEOUT = 600.0  # a cold CPU node compiles (and with --beam searches) kernels during the first steps


class GenerationError(ExoError):
  """The pipeline failed mid-request (a peer died or refused a frame)."""


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
  def __init__(self, node_id: str, address: str, model_id: str, stage: Stage, plan: Callable[[], Plan]):
    self.node_id, self.address, self.model_id, self.stage, self.plan = node_id, address, model_id, stage, plan

  async def generate(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int] = frozenset(),
                     request_id: str | None = None, stats: Stats | None = None) -> AsyncIterator[int]:
    """Yields sampled token ids; stops on a stop id (not yielded) or after params.max_tokens."""
    rid, stats = request_id or uuid.uuid4().hex, stats or Stats()
    plan = self.plan()  # pinned for the whole request
    s = params
    sampling = pb.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_tokens=s.max_tokens,
                           **({"seed": s.seed} if s.seed is not None else {}))
    header = pb.Header(request_id=rid, model_id=self.model_id, plan=plan.to_proto(), sampling=sampling,
                       coordinator_id=self.node_id, coordinator_address=self.address)
    tokens: asyncio.Queue = asyncio.Queue()
    self.stage.deliver[rid] = lambda step, tok: tokens.put_nowait((step, tok))
    local = plan.first.node_id == self.node_id
    link: Link | None = None
    try:
      if local: await self.stage.open(header)
      else: link = Link(self.stage.channels, plan.first.address, header, lambda err: self.stage.fail(rid, err))

      async def feed(step: int, pos: int, ids: list[int]) -> None:
        if link is None: await self.stage.step(rid, step, pos, np.asarray(ids, dtype=np.int64))
        else: link.send(pb.Frame(step=pb.Step(step=step, position=pos, tokens=pb.TokenIds(ids=ids))))

      stats.prompt_tokens, pos = len(prompt), 0
      await feed(0, 0, prompt)
      for step in range(s.max_tokens):
        try: got_step, tok = await asyncio.wait_for(tokens.get(), STEP_TIMEOUT)
        except asyncio.TimeoutError: raise GenerationError(f"request {rid}: no token from the pipeline in {STEP_TIMEOUT:.0f}s") from None
        if isinstance(tok, Exception): raise GenerationError(f"request {rid} failed: {tok}")
        if step == 0: stats.ttft_s = time.monotonic() - stats.started
        if tok in stop_ids: stats.finish = "stop"; return
        stats.completion_tokens += 1
        yield tok
        if step + 1 == s.max_tokens: return
        pos += len(prompt) if step == 0 else 1
        await feed(step + 1, pos, [tok])
    finally:
      self.stage.deliver.pop(rid, None)
      if link is not None: link.close("done")
      else: self.stage.close(rid, "done")
