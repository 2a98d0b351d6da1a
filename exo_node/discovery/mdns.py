"""mDNS discovery with zeroconf: advertise `_exo-node._tcp.local.` with this node's capabilities in TXT records,
browse for the same cluster, and admit a peer only after its health check and node-info call succeed and its
protocol and model match. A peer that says goodbye or fails its health checks is dropped within ~2 s."""
from __future__ import annotations
import asyncio, logging, socket, time
from typing import Callable
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from zeroconf import DNSQuestionType, InterfaceChoice, IPVersion, NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from exo_node.discovery import Discovery, peer_from_info, probe
from exo_node.errors import ExoError
from exo_node.topology import PeerInfo
from exo_node.transport.link import Channels
from exo_node.transport.pb import exo_node_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = "_exo-node._tcp.local."
CHECK_INTERVAL, CHECK_TIMEOUT = 0.5, 1.0  # a dead peer misses its check within ~1.5 s
NAME_CHECK_MS = 1000  # how long a starting node listens for a live holder of its own name


class DuplicateNodeError(ExoError):
  """Another live node of this cluster already uses this node id."""


def service_name(node_id: str, cluster: str) -> str: return f"{node_id}@{cluster}.{SERVICE}"


def local_ipv4() -> str:
  """The first non-loopback IPv4 address, for nodes that advertise themselves on a LAN."""
  import ifaddr
  for adapter in ifaddr.get_adapters():
    for ip in adapter.ips:
      if isinstance(ip.ip, str) and not ip.ip.startswith("127."): return ip.ip
  return "127.0.0.1"


class MDNSDiscovery(Discovery):
  peers_at_start = False  # it browses only once its name is registered

  def __init__(self, node_id: str, cluster: str, port: int, channels: Channels, info: Callable[[], pb.NodeInfo],
               protocol_version: int, interface: str | None, advertise_ip: str):
    super().__init__()
    self.node_id, self.cluster, self.port, self.channels, self.info = node_id, cluster, port, channels, info
    self.protocol_version, self.interface, self.advertise_ip = protocol_version, interface, advertise_ip
    self._peers: dict[str, PeerInfo] = {}  # service name -> peer
    self._tasks: set[asyncio.Task] = set()
    self._azc: AsyncZeroconf | None = None
    self._service: AsyncServiceInfo | None = None

  def peers(self) -> list[PeerInfo]: return list(self._peers.values())

  def _txt(self) -> dict[str, str]:
    i = self.info()
    return {"node_id": i.node_id, "grpc_port": str(self.port), "api_port": str(i.api_port), "cluster": self.cluster,
            "model": i.model_id, "n_layers": str(i.n_layers), "layers": f"{i.start_layer}-{i.end_layer}", "device": i.device,
            "memory": str(i.memory_bytes), "protocol": str(self.protocol_version)}

  def _make_service(self) -> AsyncServiceInfo:
    return AsyncServiceInfo(SERVICE, service_name(self.node_id, self.cluster), port=self.port, properties=self._txt(),
                            addresses=[socket.inet_aton(self.advertise_ip)], server=f"exo-{self.node_id}.local.")

  async def start(self) -> None:
    self._azc = AsyncZeroconf(interfaces=[self.interface] if self.interface else InterfaceChoice.All, ip_version=IPVersion.V4Only)
    self._service = self._make_service()
    try:
      if await self._name_taken(): raise NonUniqueNameException
      await self._azc.async_register_service(self._service, allow_name_change=False)
    except NonUniqueNameException:
      await self._azc.async_close()
      self._azc = None
      raise DuplicateNodeError(f"node id {self.node_id!r} is already taken in cluster {self.cluster!r}; choose another --node-id") from None
    self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE, handlers=[self._on_change])
    self._spawn(self._health_loop())
    log.info("mDNS: advertising %s on %s", service_name(self.node_id, self.cluster), self.interface or "all interfaces")

  async def _name_taken(self) -> bool:
    """zeroconf's probe asks for unicast answers (QU). Where several responders share port 5353 on one host, the
    kernel hands a unicast answer to any one of their sockets, so with three nodes up a fourth with a taken id went
    unnoticed. This asks for the name's own records with multicast answers (QM), which every socket receives: any
    live holder answers, a dead one cannot."""
    return await AsyncServiceInfo(SERVICE, self._service.name).async_request(self._azc.zeroconf, NAME_CHECK_MS,
                                                                             question_type=DNSQuestionType.QM)

  async def changed(self) -> None:
    """Re-advertise after a state change (layers loaded, memory)."""
    if self._azc and self._service:
      self._service = self._make_service()
      await self._azc.async_update_service(self._service)

  async def stop(self) -> None:
    for t in self._tasks: t.cancel()
    if self._azc is None: return
    await self._browser.async_cancel()
    if self._service: await self._azc.async_unregister_service(self._service)
    await self._azc.async_close()
    self._azc = None

  def _spawn(self, coro) -> None:
    t = asyncio.ensure_future(coro); self._tasks.add(t); t.add_done_callback(self._tasks.discard)

  def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
    if name == service_name(self.node_id, self.cluster): return
    if state_change is ServiceStateChange.Removed:
      if (p := self._peers.pop(name, None)): log.info("mDNS: peer %s left", p.node_id)
    else: self._spawn(self._admit(name))

  async def _admit(self, name: str) -> None:
    si = AsyncServiceInfo(SERVICE, name)
    if not await si.async_request(self._azc.zeroconf, 3000): return
    txt = {k.decode(): (v or b"").decode() for k, v in si.properties.items()}
    if txt.get("cluster") != self.cluster: return  # another cluster on the same LAN
    addrs = si.parsed_addresses(IPVersion.V4Only)
    if not addrs: return
    address = f"{addrs[0]}:{si.port}"
    if txt.get("node_id") == self.node_id:
      log.warning("mDNS: %s at %s claims this node's id %r: ignored", name, address, self.node_id); return
    try:
      await self._check(address)
      info = await probe(self.channels, address)
    except grpc.aio.AioRpcError as e:
      log.warning("mDNS: peer %s at %s not admitted: %s: %s", name, address, e.code().name, e.details()); return
    if info.protocol_version != self.protocol_version:
      log.warning("mDNS: peer %s speaks protocol %d, not %d: ignored", info.node_id, info.protocol_version, self.protocol_version); return
    if info.model_id != self.info().model_id:
      log.warning("mDNS: peer %s serves %s, not %s: ignored", info.node_id, info.model_id, self.info().model_id); return
    if name not in self._peers: log.info("mDNS: peer %s joined at %s", info.node_id, address)
    self._peers[name] = peer_from_info(info, address)

  async def _check(self, address: str) -> None:
    resp = await health_pb2_grpc.HealthStub(self.channels.channel(address)).Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT)
    if resp.status != health_pb2.HealthCheckResponse.SERVING: raise ExoError(f"{address} is not serving")

  async def _health_loop(self) -> None:
    while True:
      await asyncio.sleep(CHECK_INTERVAL)
      for name, p in list(self._peers.items()):
        t0 = time.monotonic()
        try: await self._check(p.address); self.rtt[p.node_id] = time.monotonic() - t0
        except (grpc.aio.AioRpcError, ExoError):
          if self._peers.pop(name, None): log.warning("mDNS: peer %s at %s failed its health check: dropped", p.node_id, p.address)
