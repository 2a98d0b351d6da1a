"""Cluster secret: every gRPC call carries `x-exo-proof: <unix ms>.<nonce>.<hmac>`, an HMAC-SHA256 keyed by the
secret over the time, the nonce and the method. The server refuses a missing or wrong proof, one outside the time
window, and a nonce it has already seen (replay). The secret itself never leaves the process."""
from __future__ import annotations
import hashlib, hmac, logging, secrets, time
import grpc

log = logging.getLogger(__name__)
HEADER = "x-exo-proof"
WINDOW_S = 30.0  # allowed clock skew between nodes; nonces are remembered this long


def proof(secret: str, method: str, now: float | None = None, nonce: str | None = None) -> str:
  ms, nonce = int((time.time() if now is None else now) * 1000), nonce or secrets.token_hex(12)
  return f"{ms}.{nonce}.{_mac(secret, ms, nonce, method)}"


def _mac(secret: str, ms: int, nonce: str, method: str) -> str:
  return hmac.new(secret.encode(), f"{ms}.{nonce}.{method}".encode(), hashlib.sha256).hexdigest()


class Verifier:
  def __init__(self, secret: str):
    self.secret, self.seen = secret, {}  # nonce -> expiry

  def check(self, value: str | None, method: str) -> str | None:
    """None when the proof is good; otherwise why not."""
    if not value: return "no cluster proof (is --cluster-secret set on the caller?)"
    try: ms_text, nonce, mac = value.split(".")
    except ValueError: return "malformed cluster proof"
    if not ms_text.isdigit() or not hmac.compare_digest(mac, _mac(self.secret, int(ms_text), nonce, method)):
      return "wrong cluster proof (different --cluster-secret?)"
    now = time.time()
    if abs(now - int(ms_text) / 1000) > WINDOW_S: return "stale cluster proof (clocks more than 30 s apart?)"
    self.seen = {n: t for n, t in self.seen.items() if t > now}
    if nonce in self.seen: return "replayed cluster proof"
    self.seen[nonce] = now + 2 * WINDOW_S
    return None


class ServerAuth(grpc.aio.ServerInterceptor):
  """Refuses unproven calls with UNAUTHENTICATED before any handler runs."""
  def __init__(self, secret: str): self.verifier = Verifier(secret)

  async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
    why = self.verifier.check(dict(details.invocation_metadata or ()).get(HEADER), details.method)
    handler = await continuation(details)
    if why is None or handler is None: return handler
    log.warning("refused a call to %s: %s", details.method, why)
    async def deny(request, context: grpc.aio.ServicerContext) -> None: await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[(handler.request_streaming, handler.response_streaming)](
      deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class _Prove:
  def __init__(self, secret: str): self.secret = secret

  def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    method = d.method.decode() if isinstance(d.method, bytes) else d.method
    return d._replace(metadata=grpc.aio.Metadata(*(d.metadata or ()), (HEADER, proof(self.secret, method))))


class _UnaryUnary(_Prove, grpc.aio.UnaryUnaryClientInterceptor):
  async def intercept_unary_unary(self, continuation, d, request): return await continuation(self._details(d), request)


class _UnaryStream(_Prove, grpc.aio.UnaryStreamClientInterceptor):
  async def intercept_unary_stream(self, continuation, d, request): return await continuation(self._details(d), request)


class _StreamStream(_Prove, grpc.aio.StreamStreamClientInterceptor):
  async def intercept_stream_stream(self, continuation, d, request_iterator): return await continuation(self._details(d), request_iterator)


def client_interceptors(secret: str | None) -> list:
  return [cls(secret) for cls in (_UnaryUnary, _UnaryStream, _StreamStream)] if secret else []
