"""The pool element daemon: registration at a registrar, PU sessions, load updates."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, task
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web import server

from .. import eager_write, tls
from ..discovery import FailoverEndpoint, Registrars
from ..interfaces import state_name
from ..logs import hex_id, pool_name
from ..protocol import framing
from ..protocol import messages as M
from ..protocol import params as P
from ..protocol import session as S
from ..protocol.errors import ProtocolError
from ..status import StatusResource
from .core import PoolElementCore

log = Logger()


class RegistrationProtocol(Protocol):
    """The PE's ASAP association with its home registrar."""

    transport: ITCPTransport  # set before any callback (Protocol.makeConnection)

    def __init__(self, pe: PoolElementService) -> None:
        self.pe = pe
        self.stream = framing.RSerPoolStream(M.ASAP_PPID)

    def connectionMade(self) -> None:
        log.info("connected to registrar {peer}", peer=str(self.transport.getPeer()))
        self.pe.registrar_channel = self
        self.pe.register()

    def send(self, message: M.Message) -> None:
        self.transport.write(M.encode(message))

    def dataReceived(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
            while (message := self.stream.next_message()) is not None:
                self.pe.from_registrar(message, self)
        except ProtocolError as err:
            log.warn("bad ASAP input from the registrar: {err}", err=str(err))
            if err.fatal:
                self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self.pe.registrar_channel is self:
            self.pe.registrar_channel = None
            self.pe.registered = False
        for watcher in self.pe.registration_watchers:
            watcher.lost(self)
        log.info("registrar connection lost; trying the registrars again")


class SessionProtocol(Protocol):
    """One PU's session: shim frames carrying ASAP and application messages (over SCTP,
    xenpool.sctp carries each frame's payload with its PPID instead)."""

    transport: ITCPTransport  # set before any callback (Protocol.makeConnection)

    sctp_framing = "shim"

    def __init__(self, core: PoolElementCore, factory: SessionFactory) -> None:
        self.core = core
        self.factory = factory
        self.stream = framing.ShimStream()
        self.last_heard = 0.0
        self.pending = (
            0  # requests being handled: such a session is waiting, not silent
        )
        self._sent: tuple[object, bytes] = (None, b"")  # the last message and its frame
        # A PU repeats the same heartbeat frame: (its bytes, ServerID, state, answer frame)
        # of the last one, answered again while the core says the state still holds.
        self._repeat: tuple[bytes, str, int, bytes] | None = None

    def connectionMade(self) -> None:
        self.last_heard = self.factory.clock.seconds()
        self.factory.sessions.add(self)

    @property
    def tls_name(self) -> str | None:
        """The CN of the PU's verified TLS client certificate (xenpool/pe/access.py)."""
        from ..tls import peer_name

        return peer_name(self.transport)

    def send(self, message: object) -> None:
        # A heartbeat's answer is the same as the last one: encode it once.
        last, data = self._sent
        if message != last:
            data = framing.frame_message(message)
            self._sent = (message, data)
        # at once when nothing is queued: one reactor turn per heartbeat, not two
        eager_write.write(self.transport, data)

    def close(self) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.last_heard = self.factory.clock.seconds()
        repeat = self._repeat
        if (
            repeat is not None
            and data == repeat[0]
            and not self.pending
            and not self.stream.buffered
        ):
            if self.core.repeatable_heartbeat_state(self, repeat[1]) == repeat[2]:
                eager_write.write(self.transport, repeat[3])
                return
        whole = not self.stream.buffered  # data starts a frame
        try:
            self.stream.feed(data)
            while (item := self.stream.next_message()) is not None:
                message = item[1]
                handled = self.core.handle(message, self).addErrback(self._failed)
                if not handled.called:
                    self.pending += 1
                    handled.addBoth(self._done)
                elif (
                    whole
                    and isinstance(message, S.CheckRunning)
                    and not self.stream.buffered
                ):
                    self._remember_heartbeat(data, message)  # data is this one frame
                whole = False
        except ProtocolError as err:
            log.info(
                "bad request from {peer}: {err}",
                peer=str(self.transport.getPeer()),
                err=str(err),
            )
            self.core.refuse(err, self)

    def _remember_heartbeat(self, data: bytes, message: S.CheckRunning) -> None:
        state = self.core.repeatable_heartbeat_state(self, message.server_id)
        sent, frame = self._sent
        if state is not None and sent == S.CheckRunningResponse(
            message.server_id, state
        ):
            self._repeat = (bytes(data), message.server_id, state, frame)

    def _failed(self, failure) -> None:
        log.failure("handling a PU request failed", failure)
        self.close()

    def _done(self, result):
        self.pending -= 1
        self.last_heard = (
            self.factory.clock.seconds()
        )  # its idle time starts with the answer
        return result

    def connectionLost(self, reason=None) -> None:
        self.factory.sessions.discard(self)
        self.core.session_lost(self).addErrback(
            lambda f: log.failure("stopping a VM failed", f)
        )


class SessionFactory(Factory):
    """PU sessions. A PU heartbeats its VM, so silence beyond ``idle_timeout`` means it
    is gone: one sweep finds such sessions (cheaper than a timer reset per message). A
    session whose request is still being handled (a slow start, a move) is waiting for
    the PE, not silent."""

    def __init__(self, core: PoolElementCore, idle_timeout: float, clock) -> None:
        self.core, self.idle_timeout, self.clock = core, idle_timeout, clock
        self.sessions: set[SessionProtocol] = set()
        self._sweep = task.LoopingCall(self._drop_silent)
        self._sweep.clock = clock

    def startFactory(self) -> None:
        self._sweep.start(max(self.idle_timeout / 4, 0.05), now=False)

    def stopFactory(self) -> None:
        if self._sweep.running:
            self._sweep.stop()

    def _drop_silent(self) -> None:
        now = self.clock.seconds()
        for session in [
            s
            for s in self.sessions
            if not s.pending and now - s.last_heard > self.idle_timeout
        ]:
            session.transport.abortConnection()

    def buildProtocol(self, addr) -> SessionProtocol:
        return SessionProtocol(self.core, self)


class PoolElementService(service.MultiService):
    """Wires the core to the registrar, the PU endpoint, timers and the status page."""

    def __init__(
        self,
        core: PoolElementCore,
        policy,
        policy_arguments: list[str],
        reactor,
        *,
        registrars: Registrars,
        user_endpoint: str,
        user_address: str,
        user_port: int,
        load_interval_s: float,
        registration_life_ms: int,
        idle_timeout: float,
        status: str | None,
        rebalancer=None,
        rebalance_interval_s: float = 120.0,
        pool_access=None,
    ) -> None:
        super().__init__()
        self.core = core
        self.policy = policy
        self.policy_arguments = policy_arguments
        self.clock = reactor
        self.user_address = user_address
        self.user_port = user_port
        self.user_sctp = user_endpoint.startswith("sctp:")  # PUs reach it over SCTP
        self.load_interval_s = load_interval_s
        self.registration_life_ms = registration_life_ms
        self.registrar_channel: RegistrationProtocol | None = None
        self.registered = False
        self.registrations = 0
        # told of every registration sent, its answer and the channel's loss (a watchdog feeder)
        self.registration_watchers: list = []
        self.refresh_interval_s: float | None = (
            None  # re-register at least this often, load or not
        )
        self._refresh_loop = task.LoopingCall(self.register)
        self._refresh_loop.clock = reactor
        self._early_update = None
        core.load_changed = self.load_changed
        tls.service(
            user_endpoint, SessionFactory(core, idle_timeout, reactor), reactor
        ).setServiceParent(self)
        factory = Factory.forProtocol(lambda: RegistrationProtocol(self))
        ClientService(
            FailoverEndpoint(registrars),
            factory,
            retryPolicy=backoffPolicy(0.2, maxDelay=2.0),
        ).setServiceParent(self)
        if status:
            tls.service(
                status, server.Site(status_resource(self)), reactor
            ).setServiceParent(self)
        self._load_loop = task.LoopingCall(self._regular_update)
        self._load_loop.clock = reactor
        self.rebalancer, self.pool_access = rebalancer, pool_access
        if rebalancer is not None and pool_access is not None and core.peers is None:
            # a planning leader reaches the other PEs at their session ports; a move's
            # answer comes once the VM is shut down, so it may take the shutdown timeout
            core.peers = TcpPeerAsker(
                reactor,
                pool_access,
                core.settings.pe_identifier,
                move_timeout_s=core.settings.shutdown_timeout_s + 10,
            )
        self._rebalance_loop = task.LoopingCall(self._rebalance)
        self._rebalance_loop.clock = reactor
        self.rebalance_interval_s = rebalance_interval_s

    def startService(self) -> None:
        super().startService()
        self.core.leases.start()
        self._load_loop.start(self.load_interval_s, now=False)
        if (
            self.refresh_interval_s is not None
            and self.refresh_interval_s < self.load_interval_s
        ):
            self._refresh_loop.start(self.refresh_interval_s, now=False)
        if self.rebalancer is not None:
            self._rebalance_loop.start(self.rebalance_interval_s, now=False)
        defer.maybeDeferred(self.core.hypervisor.domains).addCallbacks(
            self.core.found_running,
            lambda f: log.failure("cannot list the running domains", f),
        )
        defer.maybeDeferred(
            self.core.hypervisor.watch, self.core.domain_event
        ).addCallbacks(
            self._events,
            lambda f: log.failure(
                "no lifecycle events; heartbeats ask the hypervisor", f
            ),
        )
        log.info(
            "pool element {pe} started for pool {pool}",
            pe=hex_id(self.core.settings.pe_identifier),
            pool=pool_name(self.core.settings.pool_handle),
        )

    def stopService(self):
        self.core.leases.stop()
        for loop in (self._load_loop, self._rebalance_loop, self._refresh_loop):
            if loop.running:
                loop.stop()
        if self._early_update is not None and self._early_update.active():
            self._early_update.cancel()
        return super().stopService()

    def _events(self, live) -> None:
        self.core.events_live = bool(live)
        log.info(
            "lifecycle events {how}",
            how="on: crashes are seen at once" if live else "off: heartbeats poll",
        )

    # -------------------------------------------------------------- registration

    def registration(self) -> M.Registration:
        kind = P.SctpTransport if self.user_sctp else P.TcpTransport
        transport = kind(
            self.user_port,
            (self._advertised_address(),),
            P.TransportUse.DATA_PLUS_CONTROL,
        )
        return self.core.registration(
            self.policy, self.policy_arguments, transport, self.registration_life_ms
        )

    def _advertised_address(self) -> str:
        """--address, or when it is unspecified (empty, 0.0.0.0) the address this host
        reaches its registrar from: a real one, which peers such as rsplib accept."""
        address = self.user_address
        if address and address not in ("0.0.0.0", "::"):
            return address
        channel = self.registrar_channel
        local = (
            channel.transport.getHost().host
            if channel is not None and channel.transport is not None
            else ""
        )
        return local or "127.0.0.1"

    def register(self) -> None:
        if self.registrar_channel is not None:
            self.registrar_channel.send(self.registration())
            self.registrations += 1
            for watcher in self.registration_watchers:
                watcher.sent(self.registrar_channel)

    def from_registrar(self, message: M.Message, channel: RegistrationProtocol) -> None:
        settings = self.core.settings
        if isinstance(message, M.RegistrationResponse):
            for watcher in self.registration_watchers:
                watcher.answered(channel, not message.reject)
            if message.reject:
                causes = (
                    ", ".join(
                        f"cause {c.code}: {c.info.decode(errors='replace')}"
                        for c in (message.error.causes if message.error else ())
                    )
                    or "no cause given"
                )
                log.error(
                    "REGISTRATION REFUSED by the registrar: {causes}", causes=causes
                )
            elif not self.registered:
                self.registered = True
                log.info(
                    "registered in pool {pool}", pool=pool_name(settings.pool_handle)
                )
        elif isinstance(message, M.EndpointKeepAlive):
            channel.send(
                M.EndpointKeepAliveAck(settings.pool_handle, settings.pe_identifier)
            )
        elif isinstance(message, M.AsapError):
            log.warn("registrar reports an error: {error}", error=repr(message.error))

    # -------------------------------------------------------------- load updates

    @defer.inlineCallbacks
    def _regular_update(self):
        yield self.core.sample_load()
        self.core.accounting.load_updated()
        self.register()

    @defer.inlineCallbacks
    def _rebalance(self):
        """Every rebalance interval: the pool's loads from a registrar, then the decision."""
        try:
            elements = yield self.pool_access.resolve(
                self.core.settings.pool_handle, M.MAX_RESOLUTION_ITEMS
            )
        except Exception as err:
            log.info("no rebalancing now: {err}", err=str(err))
            return
        yield self.core.rebalance(self.rebalancer, elements)

    def load_changed(self) -> None:
        """A VM started or stopped, or a refusal raised the load: update the registrar
        at once (coalescing changes that happen together)."""
        if self._early_update is None or not self._early_update.active():
            self._early_update = self.clock.callLater(0, self.register)


class HypervisorService(service.Service):
    """Starts and stops the hypervisor plugin's worker threads with the daemon."""

    def __init__(self, hypervisor) -> None:
        self.hypervisor = hypervisor

    def startService(self) -> None:
        super().startService()
        self.hypervisor.open()

    def stopService(self):
        self.hypervisor.close()
        return super().stopService()


def status_resource(pe: PoolElementService) -> StatusResource:
    """The PE's status site: ``/status`` (JSON: what the PE accounts for and what the
    hypervisor reports) and ``/metrics``."""
    from ..console.admin import AdminResource, HostCommands

    registry = CollectorRegistry()
    registry.register(_PeCollector(pe))
    site = StatusResource({b"status": lambda: _status(pe)}, registry)
    site.putChild(
        b"admin",
        AdminResource(
            HostCommands(
                pe.core.settings.secret,
                pe.core.settings.host,
                pe.clock,
                lambda action: _host_command(pe, action),
            )
        ),
    )
    return site


def _host_command(pe: PoolElementService, action: str) -> dict:
    core = pe.core
    if action == "drain":
        core.set_maintenance("drained by the operator")
    else:
        core.set_maintenance(None)
    vms = sorted(vm.request.server_id for vm in core.sessions.values())
    log.warn(
        "host command {action}: {host} is now {state}",
        action=action,
        host=core.settings.host,
        state=core.host_state(),
    )
    return {
        "message": f"{core.settings.host} is {core.host_state()}",
        "state": core.host_state(),
        "vms": vms,
    }


def _status(pe: PoolElementService) -> defer.Deferred:
    status = {**pe.core.describe(), "registered": pe.registered}

    def domains(found) -> dict:
        # what the hypervisor itself reports, next to what the PE accounts for
        status["domains"] = {
            name: {"state": state, "state_name": state_name(state), "ram_kb": ram_kb}
            for name, (state, ram_kb) in found.items()
        }
        return status

    def failed(failure) -> dict:
        status["domains_error"] = failure.getErrorMessage()
        return status

    return pe.core.hypervisor.domains().addCallbacks(domains, failed)


class _PeCollector:
    """The PE's Prometheus metrics, collected when scraped."""

    def __init__(self, pe: PoolElementService) -> None:
        self.pe = pe

    def collect(self):
        status = self.pe.core.describe()
        sample = self.pe.core.accounting.sample()
        yield GaugeMetricFamily(
            "xenpool_pe_load", "Load reported to the registrar", value=status["load"]
        )
        components = GaugeMetricFamily(
            "xenpool_pe_load_component",
            "Measured load components",
            labels=["component"],
        )
        components.add_metric(["cpu"], sample.cpu)
        components.add_metric(["ram"], sample.ram)
        yield components
        yield GaugeMetricFamily(
            "xenpool_pe_free_ram_bytes",
            "RAM free for new VMs",
            value=status["free_ram_kb"] * 1024,
        )
        yield GaugeMetricFamily(
            "xenpool_pe_sessions", "PU sessions", value=status["sessions"]
        )
        vms = GaugeMetricFamily(
            "xenpool_pe_vm_ram_bytes", "RAM of each VM", labels=["server_id", "running"]
        )
        for vm in status["vms"]:
            vms.add_metric(
                [vm["server_id"], str(vm["running"]).lower()], vm["ram_mb"] * 2**20
            )
        yield vms
        core = self.pe.core
        yield CounterMetricFamily(
            "xenpool_pe_fence_attempts",
            "Fences of another host asked of the stonith provider before a failover",
            value=core.fence_attempts,
        )
        yield CounterMetricFamily(
            "xenpool_pe_fence_failures",
            "Fences that failed (the VM was not started)",
            value=core.fence_failures,
        )
        refusals = CounterMetricFamily(
            "xenpool_pe_refusals",
            "Starts (create requests and failovers) refused, by code",
            labels=["code"],
        )
        for code, count in status["refusals"].items():
            refusals.add_metric([code], count)
        yield refusals


class TcpClaimAsker:
    """Asks every other PE of the pool, over their session port, whether it runs or is
    starting a ServerID, disk or IP (pool-wide uniqueness), and PEs the pool no longer
    lists at the address it last gave for them (a host cut off from the registrars, or
    reported unreachable by a PU, may still be alive). A PE that does not answer within
    ``timeout_s`` (connecting included) is left out: it is dead, stopped, or about to be fenced."""

    def __init__(
        self,
        reactor,
        access,
        pool_handle: bytes,
        pe_identifier: int,
        timeout_s: float = 0.5,
    ) -> None:
        self.reactor = reactor
        self.access = (
            access  # a xenpool.asap_client.TcpPoolAccess: resolution and sessions
        )
        self.pool_handle = pool_handle
        self.pe_identifier = pe_identifier
        self.timeout_s = timeout_s
        self.known: dict[
            int, P.PoolElement
        ] = {}  # every PE seen in an answer, by identifier

    def ask(self, query, also: frozenset[int] = frozenset()) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._ask(query, also))

    async def _ask(self, query, also: frozenset[int]) -> list:
        elements = await self.access.resolve(self.pool_handle, M.MAX_RESOLUTION_ITEMS)
        self.known.update((e.identifier, e) for e in elements)
        listed = {e.identifier for e in elements}
        others = [e for e in elements if e.identifier != self.pe_identifier]
        others += [
            self.known[i]
            for i in sorted(also)
            if i in self.known and i not in listed and i != self.pe_identifier
        ]
        asks = [defer.Deferred.fromCoroutine(self._ask_one(e, query)) for e in others]
        results = await defer.DeferredList(asks, consumeErrors=True)
        return [answer for ok, answer in results if ok and answer is not None]

    async def _ask_one(self, element, query):
        from ..protocol.session import ClaimAnswer

        return await ask_pe(
            self.reactor,
            self.access,
            element,
            query,
            ClaimAnswer,
            self.timeout_s,
            "claim query",
        )


async def ask_pe(
    reactor, access, element, request, answer_type: type, timeout_s: float, what: str
):
    """One PE-to-PE question over the other PE's session port: its first
    ``answer_type`` message, or None when it cannot be reached or does not answer within
    ``timeout_s`` (from the start of the connection attempt: a host whose packets are
    dropped costs ``timeout_s``, not the TCP connect timeout)."""
    answer: defer.Deferred = defer.Deferred()

    def deliver(message) -> None:
        if isinstance(message, answer_type) and not answer.called:
            answer.callback(message)

    connecting = access.connect(element, deliver)

    def give_up() -> None:
        connecting.cancel()
        if not answer.called:
            answer.callback(None)

    timer = reactor.callLater(timeout_s, give_up)
    try:
        channel = await connecting
    except Exception as err:
        if timer.active():
            timer.cancel()
        log.info(
            "PE {pe} did not take the {what}: {err}",
            pe=hex_id(element.identifier),
            what=what,
            err=str(err) or type(err).__name__,
        )
        return None
    channel.send(request)
    result = await answer
    if timer.active():
        timer.cancel()
    channel.close()
    if result is None:
        log.warn(
            "PE {pe} did not answer the {what} in time",
            pe=hex_id(element.identifier),
            what=what,
        )
    return result


class _VoterSession(Protocol):
    """Lease requests to one voter, answered in order on one connection."""

    transport: ITCPTransport  # set before any callback (Protocol.makeConnection)

    sctp_framing = "shim"

    def __init__(self, requests: list, answers: defer.Deferred) -> None:
        self.requests, self.answers = requests, answers
        self.stream = framing.ShimStream()
        self.received: list = []

    def connectionMade(self) -> None:
        self.transport.write(b"".join(framing.frame_message(r) for r in self.requests))

    def dataReceived(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
            while (item := self.stream.next_message()) is not None:
                self.received.append(item[1])
        except ProtocolError as err:
            log.warn("bad lease answer from a voter: {err}", err=str(err))
            self.transport.loseConnection()
            return
        if len(self.received) >= len(self.requests):
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if not self.answers.called:
            self.answers.callback(
                self.received + [None] * (len(self.requests) - len(self.received))
            )


class TcpVoter:
    """A registrar voting on VM leases, at its ASAP endpoint (the shim's first byte tells
    it a connection carries lease requests). An answer not there within ``timeout_s``
    (connecting included) counts as none."""

    def __init__(self, reactor, endpoint, timeout_s: float = 1.0) -> None:
        self.reactor, self.endpoint, self.timeout_s = reactor, endpoint, timeout_s

    def ask(self, requests: list) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._ask(requests))

    async def _ask(self, requests: list) -> list:
        answers: defer.Deferred = defer.Deferred()
        connecting = self.endpoint.connect(
            Factory.forProtocol(lambda: _VoterSession(requests, answers))
        )
        timer = self.reactor.callLater(self.timeout_s, connecting.cancel)
        try:
            session = await connecting
        except Exception as err:
            log.info(
                "voter {voter} unreachable: {err}",
                voter=str(self.endpoint),
                err=str(err) or type(err).__name__,
            )
            return [None] * len(requests)
        finally:
            if timer.active():
                timer.cancel()
        timer = self.reactor.callLater(
            self.timeout_s, session.transport.abortConnection
        )
        try:
            return await answers
        finally:
            if timer.active():
                timer.cancel()


class TcpPeerAsker:
    """The rebalancing leader's PeerAsker: VmQuery and MoveRequest to another PE's
    session port, like the claim query."""

    def __init__(
        self,
        reactor,
        access,
        pe_identifier: int,
        timeout_s: float = 2.0,
        move_timeout_s: float = 40.0,
    ) -> None:
        self.reactor, self.access, self.pe_identifier = reactor, access, pe_identifier
        self.timeout_s, self.move_timeout_s = timeout_s, move_timeout_s

    def report(self, element) -> defer.Deferred:
        from ..protocol.session import VmQuery, VmReport

        query = VmQuery(self.pe_identifier)
        return defer.Deferred.fromCoroutine(
            ask_pe(
                self.reactor,
                self.access,
                element,
                query,
                VmReport,
                self.timeout_s,
                "VM query",
            )
        )

    def move(self, element, request) -> defer.Deferred:
        from ..protocol.session import MoveAnswer

        asked = ask_pe(
            self.reactor,
            self.access,
            element,
            request,
            MoveAnswer,
            self.move_timeout_s,
            "move request",
        )
        return defer.Deferred.fromCoroutine(asked)
