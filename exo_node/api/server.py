"""The OpenAI-compatible HTTP API, the web page and the node's health and metrics, on aiohttp. Any node
serves it: a request that enters here makes this node its coordinator."""
from __future__ import annotations
import hmac, json, logging
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator
from aiohttp import web
from exo_node.api.metrics import Metrics
from exo_node.api.openai import APIError, CompletionRequest, chunk, full, parse, usage
from exo_node.errors import ExoError
from exo_node.orchestrator import GenerationError, Stats
from exo_node.prompt import PromptError, chat_ids, check_prompt, generate, prompt_ids
from exo_node.topology import PartitionError

if TYPE_CHECKING: from exo_node.node import Node
log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class API:
  def __init__(self, node: Node):
    self.node, self.metrics = node, Metrics()
    self.app = web.Application(middlewares=[self._errors, self._auth], client_max_size=8 * 1024 * 1024)
    self.app.add_routes([web.get("/", self.index), web.get("/healthz", self.healthz), web.get("/metrics", self.prometheus),
                         web.get("/v1/models", self.models), web.get("/v1/cluster", self.cluster),
                         web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.complete),
                         web.static("/static", STATIC)])
    self.runner: web.AppRunner | None = None

  async def start(self, host: str, port: int) -> None:
    self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)  # a client that leaves cancels its request
    await self.runner.setup()
    try: await web.TCPSite(self.runner, host, port).start()
    except OSError as e: raise ExoError(f"cannot serve the API on {host}:{port}: {e.strerror}") from None
    log.info("API on http://%s:%d/", "127.0.0.1" if host in ("0.0.0.0", "") else host, port)

  async def stop(self) -> None:
    if self.runner: await self.runner.cleanup()

  @web.middleware
  async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
    try: resp = await handler(request)
    except APIError as e: resp = web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
      resp = web.json_response(APIError(e.status, e.reason).body(), status=e.status)
    except Exception as e:
      log.exception("API error on %s", request.path)
      resp = web.json_response(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(), status=500)
    self.metrics.requests[(request.path if request.path.startswith("/v1/") else "other", resp.status)] += 1
    return resp

  @web.middleware
  async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
    """With --api-key, the API and metrics need `Authorization: Bearer KEY`; the page and /healthz stay open."""
    key = self.node.cfg.api_key
    if key and (request.path.startswith("/v1/") or request.path == "/metrics"):
      scheme, _, given = request.headers.get("Authorization", "").partition(" ")
      if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    return await handler(request)

  async def index(self, request: web.Request) -> web.FileResponse: return web.FileResponse(STATIC / "index.html")

  async def healthz(self, request: web.Request) -> web.Response:
    m = self.node.engine.model
    return web.json_response({"status": "ok" if m else "loading", "node_id": self.node.cfg.node_id,
                              "layers": [m.start, m.end] if m else None}, status=200 if m else 503)

  async def prometheus(self, request: web.Request) -> web.Response:
    return web.Response(text=self.metrics.render(self.node.engine.n_sessions, self.node.discovery.rtt, self.node.engine.decode_steps,
                                                   self.node.engine.steps_ahead),
                        content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})

  async def models(self, request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": self.node.model_id, "object": "model", "created": 0,
                                                          "owned_by": "exo-node", "n_layers": self.node.n_layers}]})

  async def cluster(self, request: web.Request) -> web.Response:
    n = self.node
    try: plan = n.plan().shards
    except PartitionError: plan = ()
    ranges = {s.node_id: [s.start, s.end] for s in plan}
    nodes = [{"id": p.node_id, "address": p.address, "api_port": p.api_port, "device": p.device, "memory_bytes": p.memory_bytes,
              "healthy": True, "self": p.node_id == n.cfg.node_id, "layers": ranges.get(p.node_id)} for p in [n.me(), *n.discovery.peers()]]
    return web.json_response({"model": n.model_id, "n_layers": n.n_layers, "nodes": nodes,
                              "plan": [{"node_id": s.node_id, "address": s.address, "start": s.start, "end": s.end} for s in plan]})

  async def chat(self, request: web.Request) -> web.StreamResponse: return await self._completion(request, chat=True)
  async def complete(self, request: web.Request) -> web.StreamResponse: return await self._completion(request, chat=False)

  async def _completion(self, request: web.Request, chat: bool) -> web.StreamResponse:
    if self.node.draining: raise APIError(503, f"node {self.node.cfg.node_id} is shutting down", "server_error")
    try: body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError): raise APIError(400, "the request body is not valid JSON") from None
    r = parse(body, chat, self.node.cfg.max_context)
    if r.model != self.node.model_id: raise APIError(404, f"model {r.model!r} not found; this cluster serves {self.node.model_id!r}", param="model")
    try:
      ids = chat_ids(self.node, r.messages) if chat else \
        check_prompt(self.node, r.prompt) if isinstance(r.prompt, list) else prompt_ids(self.node, r.prompt, raw=True)
      self.node.plan()
    except PromptError as e: raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    except PartitionError as e: raise APIError(503, f"no node can serve this request: {e}", "server_error") from None
    except ExoError as e: raise APIError(400, str(e)) from None
    stats, self.metrics.inflight = Stats(), self.metrics.inflight + 1
    try:
      async with aclosing(generate(self.node, ids, r.params, r.stops, stats)) as pieces:
        return await (self._stream(request, r, pieces, stats) if r.stream else self._whole(r, pieces, stats))
    finally:
      self.metrics.inflight -= 1
      self._account(r, stats)

  async def _whole(self, r: CompletionRequest, pieces: AsyncIterator[tuple[int | None, str]], stats: Stats) -> web.Response:
    try: text = "".join([t async for _, t in pieces])
    except GenerationError as e: raise APIError(503, str(e), "server_error") from None
    return web.json_response(full(r, text, stats.finish, stats.prompt_tokens, stats.completion_tokens))

  async def _stream(self, request: web.Request, r: CompletionRequest, pieces: AsyncIterator[tuple[int | None, str]],
                    stats: Stats) -> web.StreamResponse:
    try: first = await anext(pieces, None)  # before the headers: a pipeline that fails now is still a clean 503
    except GenerationError as e: raise APIError(503, str(e), "server_error") from None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    send = lambda obj: resp.write(f"data: {json.dumps(obj)}\n\n".encode())
    await send(chunk(r, None, None, role=True))
    try:
      if first is not None and first[1]: await send(chunk(r, first[1], None))
      async for _, text in pieces:
        if text: await send(chunk(r, text, None))
      await send(chunk(r, None, stats.finish))
      if r.include_usage: await send({"id": r.id, "object": chunk(r, None, None)["object"], "created": r.created, "model": r.model,
                                      "choices": [], "usage": usage(stats.prompt_tokens, stats.completion_tokens)})
    except GenerationError as e: await send(APIError(503, str(e), "server_error").body())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp

  def _account(self, r: CompletionRequest, stats: Stats) -> None:
    m, dt = self.metrics, stats.elapsed_s
    m.tokens_generated += stats.completion_tokens
    if stats.completion_tokens:
      m.observe_ttft(stats.ttft_s)
      if stats.completion_tokens > 1 and dt > stats.ttft_s: m.last_tokens_per_second = (stats.completion_tokens - 1) / (dt - stats.ttft_s)
    log.info("request %s: %d prompt + %d completion tokens, ttft %.0f ms, %.2f s, finish %s", r.id, stats.prompt_tokens,
             stats.completion_tokens, 1000 * stats.ttft_s, dt, stats.finish)
