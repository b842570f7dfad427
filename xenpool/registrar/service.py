"""The registrar daemon: ASAP over stream endpoints, status over HTTP."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application import service
from twisted.application.internet import ClientService, MulticastServer, backoffPolicy
from twisted.internet import endpoints
from twisted.internet.interfaces import IMulticastTransport, IPushProducer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.web import server
from zope.interface import implementer

from .. import addresses, tls
from ..discovery import DEFAULT_ANNOUNCE_INTERVAL_S, Announcer
from ..logs import hex_id
from ..protocol import framing
from ..protocol import messages as M
from ..protocol import params as P
from ..protocol import session as S
from ..protocol.errors import Cause, ProtocolError
from ..status import StatusResource
from . import enrp_auth
from .core import Registrar
from .handlespace import Handlespace, PoolEntry
from .leases import LeaseTable
from .peering import Peering

log = Logger()
_HANDLE_RESOLUTION = M.AsapType.HANDLE_RESOLUTION.value
# A connection whose first byte is the shim's (its PPID, "XPL1") carries the PEs' lease
# requests: over TCP the shim's PPID stands in for SCTP's, as on a PE's session port. No
# ASAP message type starts with it.
_SHIM_FIRST_BYTE = S.XENPOOL_PPID >> 24


class Voting:
    """This registrar's vote on who may run a VM: the lease table, kept in ``path``
    (written whenever a holder changes) so a restart forgets no holder."""

    def __init__(
        self,
        table: LeaseTable,
        clock,
        path: Path | None = None,
        wall_ms=None,
        fresh_wait_s: float = 0.0,
    ) -> None:
        self.table = table
        self.clock = clock
        self.path = path
        self.wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self.fresh_wait_s = fresh_wait_s
        self.granted = self.refused = 0

    def load(self) -> None:
        if self.path is None:
            return
        if self.path.exists():
            self.table.load(self.path.read_text(), self.clock.seconds())
            log.info(
                "{n} VM leases read from {path}",
                n=len(self.table.leases),
                path=str(self.path),
            )
        elif self.fresh_wait_s:
            self.table.quiet_until = self.clock.seconds() + self.fresh_wait_s
            log.info(
                "no lease file {path}: no new VM lease holder for {s} s",
                path=str(self.path),
                s=self.fresh_wait_s,
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def handle(self, request: S.LeaseRequest) -> S.LeaseAnswer:
        answer = self.table.handle(request, self.clock.seconds(), self.wall_ms())
        if answer.granted:
            self.granted += 1
        else:
            self.refused += 1
            log.info(
                "lease on {server} refused to {host}: {why}",
                server=request.server_id,
                host=request.host,
                why=answer.reason,
            )
        if self.table.changed and self.path is not None:
            partial = self.path.with_suffix(".partial")
            with open(partial, "w") as f:
                f.write(self.table.dump())
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, self.path)  # never a torn table after a crash
        return answer


@implementer(IPushProducer)
class AsapProtocol(Protocol, TimeoutMixin):
    """One PE's or PU's ASAP association over a byte stream.

    It is the producer of its own answers: when a client does not read them and the
    transport's buffer fills, the registrar stops reading that client's requests, so a
    slow reader cannot pin memory."""

    transport: Any  # TCP or SCTP: ITCPTransport, IConsumer and IPushProducer (no one interface); set before any callback

    def __init__(
        self,
        registrar: Registrar,
        idle_timeout: float,
        max_message_size: int,
        metrics: Metrics,
        voting: Voting | None = None,
    ) -> None:
        self.registrar = registrar
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.stream = framing.RSerPoolStream(M.ASAP_PPID, max_message_size)
        self.voting = voting
        self.leases: framing.ShimStream | None = (
            None  # a PE's lease requests on this connection
        )
        self._first = True

    def connectionMade(self) -> None:
        self.setTimeout(self.idle_timeout)
        self.transport.registerProducer(self, True)
        self.asap_transport = addresses.peer_transport(
            self.transport
        )  # the PE's, for ENRP

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def send(self, message: M.Message) -> None:
        self.transport.write(M.encode(message))

    def send_encoded(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._first:
            self._first = False
            if self.voting is not None and data[0] == _SHIM_FIRST_BYTE:
                self.leases = framing.ShimStream()
        if self.leases is not None:
            self._lease_requests(data)
            return
        if not self.stream.buffered:
            data = self._answer_resolutions(data)
            if not data:
                return
        try:
            self.stream.feed(data)
        except ProtocolError as err:
            self._refuse(err)
            return
        while True:
            try:
                message = self.stream.next_message()
            except ProtocolError as err:
                self._refuse(err)
                if err.fatal:
                    return
                continue
            if message is None:
                break
            self.registrar.handle(message, self)
        if self.stream.reports:
            self.send(M.AsapError(M.unrecognized_parameters(self.stream.reports)))
            self.stream.reports.clear()

    def _answer_resolutions(self, data: bytes) -> bytes:
        """Answer the HANDLE_RESOLUTIONs at the start of ``data`` one by one, most from
        the registrar's cache of repeatable answers without decoding them; returns what
        is left for the stream (a partial frame, another message, a bad length)."""
        cached = self.registrar.cached_resolution
        write = self.transport.write
        limit = self.stream.max_message_size
        pos, size = 0, len(data)
        while size - pos >= 4 and data[pos] == _HANDLE_RESOLUTION:
            length = (data[pos + 2] << 8) | data[pos + 3]
            end = pos + length
            if length < 4 or length > limit or end > size:
                break
            request = data[pos:end]
            answer = cached(request)
            if answer is not None:
                write(answer)
            elif not self._resolve(request):
                return b""
            pos = end
        return data[pos:] if pos else data

    def _resolve(self, request: bytes) -> bool:
        """One HANDLE_RESOLUTION the cache could not answer; False if the connection closes."""
        reports: list[bytes] = []
        try:
            message = M.decode(request, M.ASAP_PPID, reports)
        except ProtocolError as err:
            self._refuse(err)
            return not err.fatal
        # An answer that had to report unknown parameters is not one to repeat silently.
        # A HANDLE_RESOLUTION by its type byte (dataReceived), so decoded as one.
        resolution = cast(M.HandleResolution, message)
        self.registrar.resolution(resolution, self, None if reports else request)
        if reports:
            self.send(M.AsapError(M.unrecognized_parameters(reports)))
        return True

    def _lease_requests(self, data: bytes) -> None:
        leases, voting = self.leases, self.voting
        assert (
            leases is not None and voting is not None
        )  # only with voting (dataReceived)
        try:
            leases.feed(data)
            while (item := leases.next_message()) is not None:
                request = item[1]
                if not isinstance(request, S.LeaseRequest):
                    raise ProtocolError(
                        f"{type(request).__name__} is not a lease request",
                        field="type",
                        offset=0,
                        fatal=True,
                    )
                self.transport.write(framing.frame_message(voting.handle(request)))
        except ProtocolError as err:
            log.info(
                "bad lease request from {peer}: {err}",
                peer=self.transport.getPeer(),
                err=str(err),
            )
            self.metrics.refused(err.cause)
            answer = S.LeaseAnswer(
                voting.table.voter, "", False, reason=str(err)[: S.MAX_REASON]
            )
            self.transport.write(framing.frame_message(answer))
            if err.fatal:
                self.transport.loseConnection()

    def _refuse(self, err: ProtocolError) -> None:
        log.info(
            "bad ASAP input from {peer}: {err}",
            peer=self.transport.getPeer(),
            err=str(err),
        )
        self.metrics.refused(err.cause)
        if err.report:
            self.send(M.error_for(err))
        if err.fatal:
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        # A PE answers keep-alives, so only a silent client is cut off.
        log.info(
            "closing idle ASAP connection from {peer}", peer=self.transport.getPeer()
        )
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        self.registrar.association_lost(self)


class EnrpProtocol(Protocol, TimeoutMixin):
    """One ENRP connection to a peer registrar (inbound or outbound). With ``secret``,
    every message goes out signed and one that is not (validly) closes the connection."""

    transport: Any  # TCP or SCTP: ITCPTransport, IConsumer and IPushProducer (no one interface); set before any callback

    sctp_ppid = M.ENRP_PPID  # over SCTP (xenpool.sctp), its messages carry ENRP's PPID

    def __init__(
        self,
        peering: Peering,
        outbound: bool,
        idle_timeout: float,
        metrics: Metrics,
        secret: bytes | None = None,
    ) -> None:
        self.peering = peering
        self.outbound = outbound
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.secret = secret
        self.stream = framing.RSerPoolStream(M.ENRP_PPID)

    def connectionMade(self) -> None:
        self.setTimeout(self.idle_timeout)
        if self.outbound:
            self.peering.channel_opened(self)

    def send(self, message: M.Message) -> None:
        frame = M.encode(message)
        self.transport.write(
            enrp_auth.sign(frame, self.secret) if self.secret else frame
        )

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        try:
            self.stream.feed(data)
            while (frame := self.stream.next_frame()) is not None:
                if (
                    self.secret
                    and (frame := enrp_auth.verify(frame, self.secret)) is None
                ):
                    log.warn(
                        "ENRP message from {peer} without valid authentication: closing",
                        peer=self.transport.getPeer(),
                    )
                    self.metrics.refused(Cause.SECURITY_REJECTION)
                    self.transport.loseConnection()
                    return
                self.peering.handle(
                    M.decode(frame, M.ENRP_PPID, self.stream.reports), self
                )
        except ProtocolError as err:
            log.info(
                "bad ENRP input from {peer}: {err}",
                peer=self.transport.getPeer(),
                err=str(err),
            )
            self.metrics.refused(err.cause)
            if err.report:
                self.send(M.error_for(err, M.ENRP_PPID, self.peering.server_id))
            if err.fatal:
                self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        self.peering.channel_closed(self)


class EnrpMulticast(DatagramProtocol):
    """ENRP PRESENCE by UDP multicast (rsplib's default group 239.0.0.51:9901): sent
    every heartbeat interval; a registrar heard there that we should connect to
    (``Peering.discovered``) gets an ENRP connection through ``connect(host, port)``.
    Datagrams that are not a valid PRESENCE are logged and dropped, and at most
    ``MAX_DIALLED`` addresses are dialled, so a flood of forged presences cannot grow
    the daemon without bound."""

    transport: IMulticastTransport  # set before any callback (listenMulticast)

    MAX_DIALLED = 64

    def __init__(
        self,
        peering: Peering,
        clock,
        group: str,
        port: int,
        *,
        interval_s: float,
        interface: str,
        ttl: int,
        connect,
        secret: bytes | None = None,
    ) -> None:
        self.peering = peering
        self.secret = secret
        self.destination = (group, port)
        self.interface = interface
        self.ttl = ttl
        self.connect = connect
        self.dialled: set[tuple[str, int]] = set()
        self._loop = LoopingCall(self.announce)
        self._loop.clock = clock
        self._interval_s = interval_s

    def startProtocol(self) -> None:
        self.transport.joinGroup(self.destination[0], self.interface or "")
        self.transport.setTTL(self.ttl)
        if self.interface:
            self.transport.setOutgoingInterface(self.interface)
        self._loop.start(self._interval_s, now=True)

    def stopProtocol(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def announce(self) -> None:
        presence = self.peering.announcement()
        if presence is not None:
            frame = M.encode(presence)
            self.transport.write(
                enrp_auth.sign(frame, self.secret) if self.secret else frame,
                self.destination,
            )

    def datagramReceived(self, data: bytes, address: tuple[str, int]) -> None:
        if self.secret:
            verified = enrp_auth.verify(data, self.secret)
            if verified is None:
                log.info(
                    "ignoring an ENRP announce from {host} without valid authentication",
                    host=address[0],
                )
                return
            data = verified
        try:
            message = M.decode(data, M.ENRP_PPID)
        except ProtocolError as err:
            log.info(
                "ignoring a bad ENRP announce from {host}: {err}",
                host=address[0],
                err=str(err),
            )
            return
        if not isinstance(message, M.Presence):
            log.info(
                "ignoring {kind} on the ENRP announce group from {host}",
                kind=type(message).__name__,
                host=address[0],
            )
            return
        target = self.peering.discovered(message, address[0])
        if target is None or target in self.dialled:
            return
        if len(self.dialled) >= self.MAX_DIALLED:
            log.warn(
                "not connecting to announced ENRP peer {host}:{port}: {n} peers dialled already",
                host=target[0],
                port=target[1],
                n=len(self.dialled),
            )
            return
        self.dialled.add(target)
        log.info(
            "ENRP peer {peer} announced at {host}:{port}: connecting",
            peer=hex_id(message.sender_id),
            host=target[0],
            port=target[1],
        )
        self.connect(*target)


class EnrpFactory(Factory):
    def __init__(
        self,
        peering: Peering,
        outbound: bool,
        idle_timeout: float,
        metrics: Metrics,
        secret: bytes | None = None,
    ) -> None:
        self.peering, self.outbound, self.idle_timeout, self.metrics = (
            peering,
            outbound,
            idle_timeout,
            metrics,
        )
        self.secret = secret

    def buildProtocol(self, addr) -> EnrpProtocol:
        return EnrpProtocol(
            self.peering, self.outbound, self.idle_timeout, self.metrics, self.secret
        )


class AsapFactory(Factory):
    def __init__(
        self,
        registrar: Registrar,
        idle_timeout: float,
        max_message_size: int,
        metrics: Metrics,
        voting: Voting | None = None,
    ) -> None:
        self.registrar = registrar
        self.idle_timeout = idle_timeout
        self.max_message_size = max_message_size
        self.metrics = metrics
        self.voting = voting

    def buildProtocol(self, addr) -> AsapProtocol:
        return AsapProtocol(
            self.registrar,
            self.idle_timeout,
            self.max_message_size,
            self.metrics,
            self.voting,
        )


class Metrics:
    """Prometheus metrics of one registrar (its own registry, no globals)."""

    def __init__(self, handlespace: Handlespace) -> None:
        self.registry = CollectorRegistry()
        self.handlespace = handlespace
        self.registrations = Counter(
            "xenpool_registrations",
            "Registrations accepted (new and updates)",
            ["kind"],
            registry=self.registry,
        )
        self.removals = Counter(
            "xenpool_pe_removals",
            "PEs removed from the handlespace",
            ["reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "xenpool_errors",
            "Requests refused or malformed, by RFC 5354 cause",
            ["cause"],
            registry=self.registry,
        )
        self.takeovers = Counter(
            "xenpool_takeovers",
            "Takeovers of a dead peer's PEs",
            registry=self.registry,
        )
        self.peers = Gauge(
            "xenpool_peers", "ENRP peers currently alive", registry=self.registry
        )
        self.registry.register(self)

    def collect(self):
        family = GaugeMetricFamily(
            "xenpool_pool_elements", "PEs per pool", labels=["pool"]
        )
        load = GaugeMetricFamily(
            "xenpool_pe_load",
            "Each PE's load as it last registered (0 to 1)",
            labels=["pool", "pe"],
        )
        for handle, pool in self.handlespace.pools.items():
            name = handle.decode("utf-8", "replace")
            family.add_metric([name], len(pool.entries))
            for entry in pool.entries.values():
                load.add_metric(
                    [name, f"{entry.element.identifier:#010x}"],
                    P.load_from_wire(entry.element.policy.load),
                )
        yield family
        yield load
        # Counted by the handlespace: a Counter per answer would cost more than a cached answer.
        yield CounterMetricFamily(
            "xenpool_handle_resolutions",
            "Handle resolutions answered",
            value=self.handlespace.resolutions,
        )

    # Observer interface
    def registered(self, entry: PoolEntry, new: bool) -> None:
        self.registrations.labels("new" if new else "update").inc()

    def removed(self, entry: PoolEntry, why: str) -> None:
        self.removals.labels(why).inc()

    def took_over(self, peer: int, count: int) -> None:
        self.takeovers.inc()

    def peers_changed(self, count: int) -> None:
        self.peers.set(count)

    def refused(self, cause: int) -> None:
        try:
            name = Cause(cause).name.lower()
        except ValueError:
            name = f"0x{cause:x}"
        self.errors.labels(name).inc()


def _transport_json(t: P.Transport) -> dict:
    return {
        "kind": type(t).__name__.removesuffix("Transport").lower(),
        "addresses": list(t.addresses),
        "port": t.port,
    }


def handlespace_json(registrar: Registrar, now: float) -> dict:
    pools = []
    for handle, pool in sorted(registrar.handlespace.pools.items()):
        pes = []
        for entry in sorted(pool.entries.values(), key=lambda e: e.identifier):
            element = entry.element
            pes.append(
                {
                    "identifier": element.identifier,
                    "home_registrar": element.home_registrar,
                    "transport": _transport_json(element.user_transport),
                    "policy": P.PolicyType(element.policy.policy_type).name
                    if element.policy.policy_type in P.PolicyType.__members__.values()
                    else element.policy.policy_type,
                    "load": round(P.load_from_wire(element.policy.load), 4),
                    "registration_life_ms": element.registration_life,
                    "seconds_since_update": round(now - entry.last_update, 3),
                }
            )
        pools.append(
            {"handle": handle.decode("utf-8", "replace"), "pool_elements": pes}
        )
    return {"registrar_id": registrar.registrar_id, "pools": pools}


def status_resource(
    registrar: Registrar, metrics: Metrics, console=None
) -> StatusResource:
    """The registrar's status site: ``/handlespace`` (JSON) and ``/metrics``; with a
    console (``xenpool/console/pool.py``) also ``/pool``, ``/events`` and the page ``/``."""
    site = StatusResource(
        {
            b"handlespace": lambda: handlespace_json(
                registrar, registrar.clock.seconds()
            )
        },
        metrics.registry,
    )
    if console is not None:
        console.attach(site)
    return site


class _Listener(service.Service):
    """Listens on one endpoint and keeps the port, whose address announces carry. Like
    ``strports.service``, a port that cannot be bound stops the daemon at start."""

    def __init__(self, endpoint, factory) -> None:
        self.endpoint, self.factory, self.port = endpoint, factory, None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        if self.port is None:  # started without the privileged step (not by twistd)
            self._listen()
        super().startService()

    def _listen(self) -> None:
        failed: list = []
        self.endpoint.listen(self.factory).addCallbacks(
            lambda port: setattr(self, "port", port), failed.append
        )
        if failed:
            failed[0].raiseException()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class RegistrarService(service.MultiService):
    """Starts the registrar core and ENRP peering, listens on their endpoints, and
    announces the ASAP endpoints by multicast if ``announce`` is given."""

    def __init__(
        self,
        registrar: Registrar,
        peering: Peering,
        metrics: Metrics,
        reactor,
        *,
        asap: list[str],
        enrp: list[str],
        peers: list[str],
        status: str | None,
        idle_timeout: float,
        max_message_size: int,
        announce: tuple[str, int] | None = None,
        announce_interface: str = "",
        announce_interval_s: float = DEFAULT_ANNOUNCE_INTERVAL_S,
        announce_ttl: int = 1,
        enrp_announce: tuple[str, int] | None = None,
        enrp_secret: bytes | None = None,
        voting: Voting | None = None,
        console=None,
    ) -> None:
        super().__init__()
        self.console = console  # the operator's console pages (xenpool/console/pool.py)
        self.reactor = reactor
        self.voting = voting
        self.enrp_secret = enrp_secret
        self.registrar = registrar
        self.peering = peering
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.announce_interface = announce_interface
        factory = AsapFactory(
            registrar, idle_timeout, max_message_size, metrics, voting
        )
        self.asap_listeners = [
            _Listener(tls.server_endpoint(reactor, d), factory) for d in asap
        ]
        enrp_factory = EnrpFactory(peering, False, idle_timeout, metrics, enrp_secret)
        self.enrp_listeners = [
            _Listener(tls.server_endpoint(reactor, d), enrp_factory) for d in enrp
        ]
        for listener in (*self.asap_listeners, *self.enrp_listeners):
            listener.setServiceParent(self)
        if announce is not None:
            Announcer(
                reactor,
                registrar.registrar_id,
                lambda: self._transports(self.asap_listeners),
                *announce,
                interval_s=announce_interval_s,
                interface=announce_interface,
                ttl=announce_ttl,
            ).setServiceParent(self)
        if enrp_announce is not None:
            multicast = EnrpMulticast(
                peering,
                reactor,
                *enrp_announce,
                interval_s=peering.timers.heartbeat_interval,
                interface=announce_interface,
                ttl=announce_ttl,
                connect=self._connect_peer,
                secret=enrp_secret,
            )
            MulticastServer(
                enrp_announce[1], multicast, listenMultiple=True
            ).setServiceParent(self)
        for description in peers:
            self._connect(endpoints.clientFromString(reactor, description))
        if status:
            tls.service(
                status,
                server.Site(status_resource(registrar, metrics, self.console)),
                reactor,
            ).setServiceParent(self)

    def _connect(self, endpoint) -> None:
        ClientService(
            endpoint,
            EnrpFactory(
                self.peering, True, self.idle_timeout, self.metrics, self.enrp_secret
            ),
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=2.0),
        ).setServiceParent(self)

    def _connect_peer(self, host: str, port: int) -> None:
        self._connect(endpoints.TCP4ClientEndpoint(self.reactor, host, port))

    def _transports(self, listeners: list[_Listener]) -> list[P.Transport]:
        """Where our listeners are reached (TCP or SCTP, as they listen). A port bound to
        every interface is announced with the announce interface's address, or this
        host's own addresses (never 0.0.0.0 or loopback while it has a real one)."""
        transports: list[P.Transport] = []
        for listener in listeners:
            if listener.port is not None:
                host = listener.port.getHost()
                advertised = addresses.advertised(host.host, self.announce_interface)
                if not addresses.is_sctp(listener.port):
                    advertised = advertised[:1]  # a TCP transport has one address
                transports.append(
                    addresses.transport_parameter(
                        listener.port, host.host, host.port, advertised
                    )
                )
        return transports

    def startService(self) -> None:
        if self.voting is not None:
            self.voting.load()
        self.registrar.start()
        self.peering.start()
        log.info("registrar {id} started", id=hex_id(self.registrar.registrar_id))
        super().startService()
        enrp = self._transports(self.enrp_listeners)  # bound by now
        if enrp and self.peering.own_information is None:
            self.peering.own_information = P.ServerInformation(
                self.registrar.registrar_id, enrp[0]
            )

    def stopService(self):
        self.peering.stop()
        self.registrar.stop()
        return super().stopService()
