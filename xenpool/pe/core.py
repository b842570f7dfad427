"""The pool element's behaviour: VM sessions with PUs, accounting, load reports.

No sockets here: a *session* is anything with ``send(message)`` and ``close()`` (a TCP
connection in the daemon, a list in tests); the hypervisor is an IHypervisor; time
comes from an injected IReactorTime, so tests drive every timer with a Clock.
"""

from __future__ import annotations

import hmac
import socket
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from ..interfaces import DomainSpec, ILiveMigration, IPoolPlanner, Move, PlannedPe, PlannedVm, PoolMember
from ..logs import hex_id
from ..protocol import cookie as C
from ..protocol import messages as M
from ..protocol import params as P
from ..protocol import session as S
from ..protocol.errors import ProtocolError
from .accounting import HostAccounting
from .leases import LeaseOutcome, LeaseSettings, VmLeases

log = Logger()

# libvirt domain states (virDomainState)
NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN, SHUTOFF, CRASHED, PMSUSPENDED = range(8)
NORMAL_STATES = {NOSTATE, RUNNING, BLOCKED, PAUSED}


@dataclass(frozen=True)
class PeSettings:
    pool_handle: bytes = b"Xen"
    pe_identifier: int = 1
    host: str = field(default_factory=socket.gethostname)  # fencing identity in cookies
    secret: bytes = b""
    cookie_max_age_s: float = 24 * 3600.0
    shutdown_timeout_s: float = 30.0
    # How long a VM outlives its PU's session, waiting to be re-adopted (cookie echo)
    # by a restarted keeper; 0: shut down as soon as the PU is gone (the prototype).
    lease_s: float = 60.0
    # The libvirt URI other PEs' hypervisors live-migrate VMs to this one at
    # (qemu+tcp://host1/system, ...); '' takes moves by stop-and-restart only.
    migration_uri: str = ""


class Session(Protocol):
    def send(self, message: object) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class VmSession:
    """One VM kept for one PU connection."""

    request: S.CreateServer
    running: bool = False  # may be running (a start was attempted)
    lease_end: object = None  # the pending shutdown while no PU holds it
    stopping: bool = False  # this PE is stopping it: its lifecycle events are expected
    migrating: bool = False  # being live-migrated away: it runs, here or there
    discovered: bool = False  # found running (start-up, live migration): its disk and IPs unknown


class Refusal(NamedTuple):
    """Why a start is refused; ``holder``: the host that runs (or holds the lease on) the VM."""

    code: int
    reason: str
    holder: S.Holder | None = None


class Fencer(Protocol):
    def fence(self, host: str, pe_identifier: int = 0) -> defer.Deferred: ...


class ClaimAsker(Protocol):
    def ask(self, query: S.ClaimQuery, also: frozenset[int] = frozenset()) -> defer.Deferred:
        """The ClaimAnswers of every other PE of the pool that answered in time, and of
        the PEs ``also`` names that the pool no longer lists but whose address is known;
        PEs that cannot be reached (dead, or being fenced) are left out."""


class PeerAsker(Protocol):
    """How the rebalancing leader reaches another PE of the pool (its session port in
    the daemon, memory in the simulator). Both fire None when the PE does not answer."""

    def report(self, element: P.PoolElement) -> defer.Deferred:
        """Its VmReport."""

    def move(self, element: P.PoolElement, request: S.MoveRequest) -> defer.Deferred:
        """Its MoveAnswer, once it stopped the VM (or why not)."""


def _path_cut(refusal: tuple, lost: S.Holder | None) -> tuple:
    """A refusal because the host the PU lost runs the VM and answered this PE: the PU's
    own path to that host is cut, not the host dead; say so."""
    refusal = Refusal(*refusal)
    if lost is not None and refusal.holder is not None and refusal.holder.host == lost.host:
        return refusal._replace(reason=f"{refusal.reason}; it answers this PE, so only the PU's path to it is cut")
    return refusal


def _same_vm(held: "VmSession", asked: S.CreateServer) -> bool:
    """A request for the very VM this PE started (not a domain merely found running:
    that one only a cookie takes back)."""
    request = held.request
    return not held.discovered and (request.server_id, request.disk, request.ips) == (asked.server_id, asked.disk, asked.ips)


class PoolElementCore:
    # The leader's pace through a plan: the next move once the last one runs again on
    # its target (checked every MOVE_POLL_S), or once MOVE_TIMEOUT_S passed without.
    MOVE_POLL_S = 1.0
    MOVE_TIMEOUT_S = 120.0
    # A MoveRequest is taken only this close to its issue time, and only once.
    MOVE_REQUEST_MAX_AGE_S = 60.0

    def __init__(self, settings: PeSettings, hypervisor, accounting: HostAccounting, metric, clock,
                 disk_xml: Callable[[str], object] | None = None,
                 load_changed: Callable[[], None] = lambda: None, fencer: Fencer | None = None,
                 claims: "ClaimAsker | None" = None,
                 disk_release: Callable[[str], object] | None = None, leases: VmLeases | None = None) -> None:  # fmt: skip
        self.settings = settings
        # Who may start a VM: a lease from a majority of the voters (none: every lease
        # is granted, and only the claim query stands between two starts).
        self.leases = leases or VmLeases([], LeaseSettings(settings.pool_handle, settings.pe_identifier, settings.host), clock)
        self.hypervisor = hypervisor
        self.accounting = accounting
        self.metric = metric
        self.clock = clock
        # disk spec -> Deferred[disk XML], checking reachability (storage plugins)
        self.disk_xml = disk_xml or (lambda spec: defer.succeed(""))
        self.disk_release = disk_release or (lambda spec: defer.succeed(None))  # after the VM stopped
        self.host_cpu = None  # an accounting.HostCpu where the hypervisor runs on this machine
        self.moving = False  # a rebalancing move is under way
        self.next_move_at = 0.0
        self.last_pool_total = None  # the pool's summed load at the last rebalancing decision
        self.moves = 0
        self.load_changed = load_changed
        self.fencer = fencer
        self.claims = claims
        self.peers: PeerAsker | None = None  # for a planning rebalancer (IPoolPlanner)
        self.planning = False  # this PE leads a rebalancing round now
        self.planned_vm_set = None  # the pool's VMs at the last round: a change means starts
        self.quiet_rounds = 0  # rounds since the pool's VMs last changed
        self.moved_at: dict[str, float] = {}  # when this leader last moved each VM
        self.move_requests_seen: dict[bytes, float] = {}  # MAC -> when it may be forgotten
        self.starting: dict[str, S.CreateServer] = {}  # claimed, start in progress
        # Domain states as the hypervisor's lifecycle events report them; while events
        # flow (``events_live``), heartbeats are answered from here, without a libvirt call.
        self.domain_states: dict[str, int] = {}
        self.events_live = False
        self.sessions: dict[Session, VmSession] = {}
        self.orphans: dict[str, VmSession] = {}  # VMs whose PU is gone, within their lease
        self.refusals: dict[int, int] = {}

    # ------------------------------------------------------------ messages

    def handle(self, message: object, session: Session) -> defer.Deferred:
        """One message from a PU; answers go to ``session``."""
        if isinstance(message, S.CreateServer):
            return defer.Deferred.fromCoroutine(self._create(message, session))
        if isinstance(message, S.CheckRunning):
            if self.events_live:
                self._answer_heartbeat(message, session, self.domain_states.get(message.server_id, SHUTOFF))
                return defer.succeed(None)
            return defer.Deferred.fromCoroutine(self._check_running(message, session))
        if isinstance(message, S.StopServer):
            return defer.Deferred.fromCoroutine(self._stop(message, session))
        if isinstance(message, M.CookieEcho):
            return defer.Deferred.fromCoroutine(self._cookie_echo(message, session))
        if isinstance(message, S.ClaimQuery):
            session.send(self.answer_claim(message))
            session.close()
            return defer.succeed(None)
        if isinstance(message, S.VmQuery):
            session.send(self.vm_report())
            self._close_unless_vm(session)
            return defer.succeed(None)
        if isinstance(message, S.MoveRequest):
            return defer.Deferred.fromCoroutine(self._answer_move(message, session))
        self._answer_failure(session, "", S.ResultCode.INVALID_REQUEST, f"{type(message).__name__} is not a request a PE takes")
        return defer.succeed(None)

    def refuse(self, err: ProtocolError, session: Session) -> None:
        """A malformed request: answer create_failed naming the field, end the session."""
        self._answer_failure(session, "", S.ResultCode.INVALID_REQUEST, str(err))

    def _cookie(self, vm: VmSession, cpu_cores: float = 0.0, runs_on: tuple[int, str] | None = None) -> M.Cookie:
        """``runs_on``: (PE identifier, host) of the PE that now runs it, after a live
        migration; the PU takes the cookie there to re-adopt it."""
        r = vm.request
        pe_identifier, host = runs_on or (self.settings.pe_identifier, self.settings.host)
        state = C.SessionState(
            self.settings.pool_handle, r.server_id, r.disk, r.ips, r.ram_mb, r.vcpus, vm.running,
            host, pe_identifier, self.clock.seconds(), cpu_cores,
        )  # fmt: skip
        return M.Cookie(C.seal(state, self.settings.secret))

    def _refuse_start(self, session: Session, request: S.CreateServer, refusal: tuple) -> None:
        """A refused start; where another host runs the VM (or holds its lease), the PU
        first gets a cookie naming that host, so it goes there next: a keeper whose own
        cookie was lost (a corrupt state file) finds its VM again instead of giving up."""
        refusal = Refusal(*refusal)
        if refusal.holder is not None and refusal.holder.host != self.settings.host:
            state = C.SessionState(
                self.settings.pool_handle, request.server_id, request.disk, request.ips, request.ram_mb, request.vcpus,
                True, refusal.holder.host, refusal.holder.pe_identifier, self.clock.seconds(), 0.0,
            )  # fmt: skip
            session.send(M.Cookie(C.seal(state, self.settings.secret)))
        self._answer_failure(session, request.server_id, refusal.code, refusal.reason)

    def _answer_failure(self, session: Session, server_id: str, code: int, reason: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1
        log.info("refused {server}: {code} {reason}", server=server_id, code=int(code), reason=reason)
        session.send(S.CreateResult(server_id, code, self.accounting.free_kb, reason))
        session.close()

    # ------------------------------------------------------------ uniqueness

    def _held(self):
        """Every request this PE runs or is starting: (request, only starting?)."""
        for vm in (*self.sessions.values(), *self.orphans.values()):
            yield vm.request, False
        for request in self.starting.values():
            yield request, True

    def conflict_with(self, server_id: str, disk: str, ips: tuple[str, ...]) -> tuple[str, bool] | None:
        """What this PE holds of a ServerID, disk or IP: (description, only starting?)."""
        for held, starting in self._held():
            if held.server_id == server_id:
                return f"{server_id} runs", starting
            if disk and held.disk == disk:
                return f"disk {disk} is used by {held.server_id}", starting
            shared = set(ips) & set(held.ips)
            if shared:
                return f"IP {sorted(shared)[0]} is used by {held.server_id}", starting
        return None

    def answer_claim(self, query: S.ClaimQuery) -> S.ClaimAnswer:
        found = self.conflict_with(query.server_id, query.disk, query.ips)
        conflict, starting = found if found else ("", False)
        return S.ClaimAnswer(self.settings.pe_identifier, self.settings.host, conflict, starting)

    async def _claim(self, request: S.CreateServer, may_run_on: S.Holder | None = None) -> tuple[int, str] | None:
        """Make sure this PE alone may start ``request``, whatever the PU claims: the
        voters' lease (exactly one of two concurrent starters gets it), then every host
        that may still run it (the lease's previous holders, ``may_run_on`` from the
        cookie) asked directly and, where it does not answer, fenced, then the lease
        confirmed again just before the start. Returns why not, or None with the claim
        held here (in ``starting``, and the lease renewed) until the start ends."""
        local = self.conflict_with(request.server_id, request.disk, request.ips)
        if local is not None:
            return S.ResultCode.ALREADY_RUNNING, f"{local[0]} on this PE ({self.settings.host})"
        self.starting[request.server_id] = request
        try:
            refusal = await self._claim_lease(request, may_run_on)
        except Exception as err:  # noqa: BLE001 - a claim that broke is no claim
            log.failure("claiming {server}", server=request.server_id)
            refusal = S.ResultCode.UNSPECIFIED, f"claiming {request.server_id} failed: {err}"
        if refusal is not None:
            if self.starting.get(request.server_id) is request:
                del self.starting[request.server_id]
            self._release_lease_unless_here(request)
        return refusal

    def _release_lease_unless_here(self, request: S.CreateServer) -> None:
        """A start that did not happen gives its lease back (unless the VM runs here)."""
        name = request.server_id
        if self._session_of(name) is None and name not in self.orphans:
            self.leases.release(request).addErrback(lambda f: log.failure("releasing the lease of {server}", f, server=name))

    async def _claim_lease(self, request: S.CreateServer, may_run_on: S.Holder | None) -> tuple[int, str] | None:
        me = self.settings.host
        fenced: set[str] = set()
        cleared: set[S.Holder] = set()  # took over its live lease: asked again below
        outcome = await self.leases.acquire(request)
        if not outcome.granted:
            blocker = outcome.blocker
            if blocker is None:
                return S.ResultCode.UNSPECIFIED, f"no lease on {request.server_id}: {outcome.reason}"
            # Ask the holder itself: one that runs or starts it wins; one that answers
            # without it holds a stale lease (it restarted, or its release was lost).
            found = await self._ask_pool(request, {blocker})
            if isinstance(found, tuple):
                return _path_cut(found, may_run_on)
            if blocker.host in found:
                cleared.add(blocker)
            elif may_run_on is not None and blocker.host == may_run_on.host:
                # The host the PU lost holds the lease and does not answer: fenced.
                refusal = await self._fence(blocker, request.server_id)
                if refusal is not None:
                    return refusal
                fenced.add(blocker.host)
            else:
                return Refusal(S.ResultCode.ALREADY_RUNNING, f"no lease on {request.server_id}: {outcome.reason}, "
                                                             f"and {blocker.host} does not answer", blocker)  # fmt: skip
            outcome = await self.leases.acquire(request, cleared=blocker.host)
            if not outcome.granted:
                return S.ResultCode.ALREADY_RUNNING, f"no lease on {request.server_id} after clearing {blocker.host}: {outcome.reason}"
        suspects = {h for h in outcome.previous | cleared if h.host != me and h.host not in fenced}
        if may_run_on is not None and may_run_on.host != me and may_run_on.host not in fenced:
            suspects.add(may_run_on)
        found = await self._ask_pool(request, suspects)
        if isinstance(found, tuple):
            return _path_cut(found, may_run_on)
        for suspect in sorted(suspects, key=lambda h: h.host):
            if suspect.host in found or suspect.host in fenced:
                continue  # it answered: it does not run it (and holds no lease to start it now)
            refusal = await self._fence(suspect, request.server_id)
            if refusal is not None:
                return refusal
            fenced.add(suspect.host)
        if self.leases.enabled:
            confirmed: LeaseOutcome = await self.leases.confirm(request)
            if not confirmed.granted:
                return S.ResultCode.ALREADY_RUNNING, f"lost the lease on {request.server_id} while fencing: {confirmed.reason}"
        self.leases.hold(request)
        return None

    async def _ask_pool(self, request: S.CreateServer, suspects: set[S.Holder]) -> set[str] | tuple[int, str]:
        """Ask every PE of the pool, and the suspects directly, whether it runs or starts
        ``request``: a refusal when one does, else the hosts that answered (proof that
        they do not run it)."""
        if self.claims is None:
            return set()
        query = S.ClaimQuery(self.settings.pe_identifier, request.server_id, request.disk, request.ips)
        try:
            answers = await self.claims.ask(query, also=frozenset(h.pe_identifier for h in suspects))
        except Exception as err:  # noqa: BLE001 - without the pool's answer, no start
            return S.ResultCode.UNSPECIFIED, f"cannot ask the pool whether it runs already: {err}"
        for answer in answers:
            if answer.conflict:
                # Also a PE only starting it: exactly one of two holds the lease, and the
                # other gives way (never "the lower identifier wins" on answers a slow
                # fence can outdate).
                state = "is starting it" if answer.pending else "holds it"
                holder = None if answer.pending else S.Holder(answer.pe_identifier, answer.host)
                return Refusal(S.ResultCode.ALREADY_RUNNING,
                               f"{answer.conflict} on {answer.host} (PE {hex_id(answer.pe_identifier)}, which {state})", holder)
        return {answer.host for answer in answers}

    async def _fence(self, target: S.Holder, server_id: str) -> tuple[int, str] | None:
        host = target.host
        if self.fencer is None:
            return S.ResultCode.FENCE_FAILED, f"{server_id} may still run on {host} and no fencing is configured"
        try:
            await self.fencer.fence(host, target.pe_identifier)
        except Exception as err:  # noqa: BLE001 - no start after a failed fence, ever
            log.critical("FENCING {host} FAILED, {server} NOT STARTED: {err}", host=host, server=server_id, err=str(err))
            return S.ResultCode.FENCE_FAILED, f"fencing {host} failed: {err}"
        log.warn("fenced {host} before starting {server}", host=host, server=server_id)
        return None

    # ------------------------------------------------------------ starting

    async def _create(self, request: S.CreateServer, session: Session, claimed: bool = False,
                      cpu_cores: float = 0.0) -> None:  # fmt: skip
        if session in self.sessions:
            return self._answer_failure(session, request.server_id, S.ResultCode.INVALID_REQUEST, "this session already has a VM")
        orphan = self.orphans.get(request.server_id)
        if not claimed and orphan is not None and _same_vm(orphan, request):
            # Its keeper is back without a cookie (it lost its state): the VM kept
            # running here for its lease, so it is taken back, not started twice.
            return self._adopt(orphan, session)
        if not claimed:
            refusal = await self._claim(request)
            if refusal is not None:
                return self._refuse_start(session, request, refusal)
        try:
            await self._start(request, session, cpu_cores)
        finally:
            self.starting.pop(request.server_id, None)
            self._release_lease_unless_here(request)

    async def _start(self, request: S.CreateServer, session: Session, cpu_cores: float = 0.0) -> None:
        vm = VmSession(request)
        self.sessions[session] = vm
        session.send(self._cookie(vm))  # running=false: a failover now fences no one
        if not self.accounting.fits(request.ram_mb):
            del self.sessions[session]
            self.accounting.refused_for_ram()
            self.load_changed()
            return self._answer_failure(
                session, request.server_id, S.ResultCode.NO_RAM,
                f"needs {request.ram_mb * 1024} KB, {self.accounting.free_kb} KB free",
            )  # fmt: skip
        self.accounting.reserve(request.server_id, request.ram_mb, cpu_cores / self.accounting.node.cpus)
        try:
            disk_xml = await self.disk_xml(request.disk)
        except Exception as err:  # noqa: BLE001 - any storage failure is the disk's
            self._forget(session)
            return self._answer_failure(session, request.server_id, S.ResultCode.DISK_UNREACHABLE, str(err))
        vm.running = True
        session.send(self._cookie(vm))
        try:
            await self.hypervisor.start(DomainSpec(request.server_id, request.ram_mb, request.vcpus, disk_xml, request.ips))
        except Exception as err:  # noqa: BLE001 - report the hypervisor's reason
            vm.running = False
            self._forget(session)
            return self._answer_failure(session, request.server_id, S.ResultCode.UNSPECIFIED, f"start failed: {err}")
        log.info("started {server} ({ram} MB) for a PU", server=request.server_id, ram=request.ram_mb)
        self.domain_states[request.server_id] = RUNNING
        self.load_changed()
        session.send(S.CreateResult(request.server_id, S.ResultCode.STARTED, self.accounting.free_kb, f"started on {self.settings.host}"))

    async def _cookie_echo(self, echo: M.CookieEcho, session: Session) -> None:
        try:
            state = C.unseal(
                echo.cookie, self.settings.secret, pool_handle=self.settings.pool_handle,
                now=self.clock.seconds(), max_age_s=self.settings.cookie_max_age_s,
            )  # fmt: skip
        except C.CookieError as err:
            return self._answer_failure(session, "", S.ResultCode.COOKIE_REJECTED, err.reason)
        orphan = self.orphans.get(state.server_id)
        request = S.CreateServer(state.server_id, state.disk, state.ips, state.ram_mb, state.vcpus)
        mine = state.pe_identifier == self.settings.pe_identifier
        if orphan is None and mine and state.running and self.conflict_with(state.server_id, "", ()) is None:
            orphan = await self._take_if_running(state.server_id)
        if orphan is not None and mine:
            orphan.request, orphan.discovered = request, False  # the cookie knows its disk and IPs
            return self._adopt(orphan, session)
        # The lease first, then the pool: a PE that answers holding the VM (the cookie's
        # own host included) is alive and runs it, so this is a stale or replayed cookie,
        # and no one is fenced. Only a host that cannot answer is fenced.
        old_host = S.Holder(state.pe_identifier, state.host) if state.running and not mine else None
        refusal = await self._claim(request, may_run_on=old_host)
        if refusal is not None:
            return self._refuse_start(session, request, refusal)
        try:
            await self._create(request, session, claimed=True, cpu_cores=state.cpu_cores)
        finally:
            self.starting.pop(request.server_id, None)

    async def _take_if_running(self, name: str) -> VmSession | None:
        """A cookie says ``name`` runs on this PE, which holds no such VM: one live-migrated
        here whose arrival was not seen yet (no lifecycle event, or it is still on its
        way). Held as an orphan when the hypervisor runs it; None when it does not."""
        try:
            domains = await self.hypervisor.domains()
        except Exception as err:  # noqa: BLE001 - then it is started here as any other
            log.warn("cannot list the domains to look for {server}: {err}", server=name, err=str(err))
            return None
        if name in domains:
            self.found_running({name: domains[name]})
        return self.orphans.get(name)

    def _adopt(self, vm: VmSession, session: Session) -> None:
        """A restarted keeper takes back a VM that kept running within its lease."""
        del self.orphans[vm.request.server_id]
        if vm.lease_end is not None and vm.lease_end.active():
            vm.lease_end.cancel()
        vm.lease_end = None
        self.sessions[session] = vm
        self.leases.hold(vm.request)
        self.domain_states.setdefault(vm.request.server_id, RUNNING)
        log.info("{server} re-adopted by its keeper", server=vm.request.server_id)
        session.send(self._cookie(vm))
        session.send(S.CreateResult(vm.request.server_id, S.ResultCode.STARTED, self.accounting.free_kb, "re-adopted, kept running"))

    async def _check_running(self, message: S.CheckRunning, session: Session) -> None:
        vm = self.sessions.get(session)
        if vm is None or vm.request.server_id != message.server_id:
            session.send(S.CheckRunningResponse(message.server_id, NOSTATE))
            return
        try:
            state = await self.hypervisor.state(message.server_id)
        except Exception:  # noqa: BLE001 - gone from the hypervisor
            state = SHUTOFF
        self._answer_heartbeat(message, session, state)

    def repeatable_heartbeat_state(self, session: Session, server_id: str) -> int | None:
        """The state a heartbeat for ``server_id`` in ``session`` is answered with when that
        answer changes nothing here (events flow, it is the session's VM, in a normal state,
        not migrating); None otherwise."""
        if not self.events_live:
            return None
        vm = self.sessions.get(session)
        if vm is None or vm.migrating or vm.request.server_id != server_id:
            return None
        state = self.domain_states.get(server_id, SHUTOFF)
        return state if state in NORMAL_STATES else None

    def _answer_heartbeat(self, message: S.CheckRunning, session: Session, state: int) -> None:
        vm = self.sessions.get(session)
        if vm is None or vm.request.server_id != message.server_id:
            session.send(S.CheckRunningResponse(message.server_id, NOSTATE))
            return
        if vm.migrating:
            state = RUNNING  # a live migration keeps it running; here it ends "shut off"
        session.send(S.CheckRunningResponse(message.server_id, state))
        if state not in NORMAL_STATES:
            self._lost_domain(session, vm, state)

    def _lost_domain(self, session: Session | None, vm: VmSession, state: int) -> None:
        """The VM stopped or crashed by itself: its session ends (the PU decides what next)."""
        log.warn("{server} is in state {state}: ending its session", server=vm.request.server_id, state=state)
        vm.running = False
        if session is None:
            self.orphans.pop(vm.request.server_id, None)
            if vm.lease_end is not None and vm.lease_end.active():
                vm.lease_end.cancel()
            self._release(vm)
        else:
            self._forget(session)
            session.close()

    def domain_event(self, name: str, state: int) -> None:
        """A lifecycle event from the hypervisor: a crash is seen at once, not at the
        next heartbeat, and the PU hears of it straight away."""
        self.domain_states[name] = state
        if state in NORMAL_STATES:
            if state == RUNNING and self._session_of(name) is None and name not in self.orphans:
                self._arrived(name)
            return
        for session, vm in list(self.sessions.items()):
            if vm.request.server_id == name and vm.running and not (vm.stopping or vm.migrating):
                session.send(S.CheckRunningResponse(name, state))
                self._lost_domain(session, vm, state)
        orphan = self.orphans.get(name)
        if orphan is not None and orphan.running and not orphan.stopping:
            self._lost_domain(None, orphan, state)

    def _arrived(self, name: str) -> None:
        """A domain this PE did not start runs now: live-migrated here by another PE.
        It is held like one found at start-up, until its PU comes with the cookie."""
        if name in self.starting:
            return

        def found(domains: dict) -> None:
            if name in domains:
                log.info("{server} arrived here (live migration)", server=name)
                self.found_running({name: domains[name]})

        self.hypervisor.domains().addCallbacks(found, lambda f: log.failure("listing domains after {server} arrived", f, server=name))

    async def _stop(self, message: S.StopServer, session: Session) -> None:
        vm = self.sessions.get(session)
        if vm is None or vm.request.server_id != message.server_id:
            session.send(S.StopResult(message.server_id, S.ResultCode.INVALID_REQUEST, "no such VM in this session"))
            return
        await self._shut_down(session, vm)
        session.send(S.StopResult(message.server_id, S.ResultCode.NORMAL_END, "shut down"))
        session.close()

    # ------------------------------------------------------------ session end

    def session_lost(self, session: Session) -> defer.Deferred:
        """The PU is gone: its VM keeps running for the lease, waiting to be re-adopted,
        then is shut down gracefully and destroyed if it does not stop in time."""
        vm = self.sessions.get(session)
        if vm is None:
            return defer.succeed(None)
        if not vm.running or self.settings.lease_s <= 0:
            return defer.Deferred.fromCoroutine(self._shut_down(session, vm))
        del self.sessions[session]
        self.orphans[vm.request.server_id] = vm
        vm.lease_end = self.clock.callLater(self.settings.lease_s, self._lease_over, vm)
        log.info("{server}: its PU is gone; kept for {lease} s", server=vm.request.server_id, lease=self.settings.lease_s)
        return defer.succeed(None)

    def found_running(self, domains: dict[str, tuple[int, int]]) -> None:
        """At start-up: domains already running on this host (the PE was restarted, its
        VMs were not) are kept like VMs whose PU is gone: their RAM counts, their names
        are taken, and a keeper echoing their cookie re-adopts them within the lease."""
        for name, (state, ram_kb) in domains.items():
            if name in self.orphans or self._session_of(name) is not None or state not in NORMAL_STATES:
                continue
            vm = VmSession(S.CreateServer(name, "", (), max(1, ram_kb // 1024)), running=True, discovered=True)
            self.accounting.reserve(name, vm.request.ram_mb)
            self.orphans[name] = vm
            self.leases.hold(vm.request)
            self.domain_states[name] = state
            vm.lease_end = self.clock.callLater(max(self.settings.lease_s, 0), self._lease_over, vm)
            log.info("{server} was running here already; kept for its keeper for {lease} s", server=name,
                     lease=self.settings.lease_s)  # fmt: skip
        if domains:
            self.load_changed()

    def _lease_over(self, vm: VmSession) -> None:
        if self.orphans.pop(vm.request.server_id, None) is None:
            return
        vm.lease_end = None
        log.info("{server}: lease over, no keeper came back", server=vm.request.server_id)
        defer.Deferred.fromCoroutine(self._shut_down(None, vm)).addErrback(lambda f: log.failure("ending a lease", f))

    async def _shut_down(self, session: Session | None, vm: VmSession) -> None:
        name = vm.request.server_id
        vm.stopping = True
        if vm.running:
            try:
                await self.hypervisor.shutdown(name, self.settings.shutdown_timeout_s)
            except Exception as err:  # noqa: BLE001
                log.warn("shutting down {server} failed: {err}; destroying it", server=name, err=str(err))
                try:
                    await self.hypervisor.destroy(name)
                except Exception as err2:  # noqa: BLE001
                    log.error("destroying {server} failed: {err}", server=name, err=str(err2))
            vm.running = False
        if session is not None:
            self.sessions.pop(session, None)
        self._release(vm)
        try:
            await self.disk_release(vm.request.disk)
        except Exception as err:  # noqa: BLE001 - the VM is stopped; the disk stays attached
            log.warn("releasing the disk of {server} failed: {err}", server=name, err=str(err))
        log.info("{server} stopped, {ram} MB returned", server=name, ram=vm.request.ram_mb)

    def _forget(self, session: Session) -> None:
        vm = self.sessions.pop(session, None)
        if vm is not None:
            self._release(vm)

    def _release(self, vm: VmSession) -> None:
        """The VM does not run here any more: its RAM and its lease go."""
        self._release_lease_unless_here(vm.request)
        self.accounting.release(vm.request.server_id)
        self.domain_states.pop(vm.request.server_id, None)
        self.load_changed()

    # ------------------------------------------------------------ load

    def sample_load(self) -> defer.Deferred:
        """Measure every VM's CPU time (the periodic load update)."""
        return defer.Deferred.fromCoroutine(self._sample_load())

    async def _sample_load(self) -> None:
        now = self.clock.seconds()
        # Only some hypervisors report how long a VM waited for a core (optional method).
        waits = self.accounting.settings.count_cpu_wait and hasattr(self.hypervisor, "cpu_wait_ns")
        if getattr(self.hypervisor, "measures_cpu", True):
            for vm in [*self.sessions.values(), *self.orphans.values()]:
                if vm.running:
                    name = vm.request.server_id
                    try:
                        cpu_ns = await self.hypervisor.cpu_time_ns(name)
                        wait_ns = await self.hypervisor.cpu_wait_ns(name) if waits else None
                        self.accounting.sample_vm(name, cpu_ns, now, wait_ns)
                    except Exception:  # noqa: BLE001 - it may have just stopped
                        pass
        if self.host_cpu is not None:
            share = self.host_cpu.share(sum(vm.cpu_share for vm in self.accounting.vms.values()))
            if share is not None:
                self.accounting.sample_host(share)

    def load(self) -> float:
        return self.accounting.load(self.metric)

    # ------------------------------------------------------------ rebalancing

    def rebalance(self, rebalancer, pool: list) -> defer.Deferred:
        """Ask the rebalancer whether a VM should leave this PE, and move it if so; a
        planning rebalancer (IPoolPlanner) instead runs a leader's round (``_lead``).
        ``pool``: the PoolElements of a registrar's resolution answer.
        Only VMs measured ``rebalancer.min_samples`` times take part: a VM just started
        (or just moved here) is still an estimate. Fires with the server ID moved, or None."""
        if IPoolPlanner.providedBy(rebalancer):
            return defer.Deferred.fromCoroutine(self._lead(rebalancer, pool))
        if self.moving or self.clock.seconds() < self.next_move_at:
            return defer.succeed(None)
        sample = self.accounting.sample()
        measuring = self._measuring()
        measured = {}
        for name in sample.vm_cpu:
            if self._session_of(name) is None:
                continue
            if not measuring or self.accounting.vms[name].samples >= rebalancer.min_samples:
                measured[name] = self._demand_share(name)
        candidates = type(sample)(sample.cpu, sample.ram, measured)
        vm_ram = {n: vm.ram_kb for n, vm in self.accounting.vms.items()}
        members = self._pool_members(pool)
        # While VMs are still being started the pool's total load keeps changing and the
        # pool policy is filling the gaps itself: moving now would undo its work.
        total, last_total = sum(m.load for m in members), self.last_pool_total
        self.last_pool_total = total
        tolerance = getattr(rebalancer, "settle_tolerance", None)
        if tolerance is not None and (last_total is None or abs(total - last_total) > tolerance):
            return defer.succeed(None)
        name = rebalancer.choose(candidates, vm_ram, members, self.metric, self.accounting.node.ram_kb)
        if name is None:
            return defer.succeed(None)
        self.next_move_at = self.clock.seconds() + rebalancer.cooldown_s  # let the pool see the effect first
        moved = defer.Deferred.fromCoroutine(self._move_out(name, self._carried_cores(name)))
        return moved.addCallback(lambda how: None if how is None else name)

    def _measuring(self) -> bool:
        # Where the hypervisor cannot measure CPU (libvirt's test driver) the estimate is
        # all there will ever be, so every VM counts as measured.
        return getattr(self.hypervisor, "measures_cpu", True)

    def _demand_share(self, name: str) -> float:
        """A VM's CPU demand as a share of the host: over the recent window, unsmoothed,
        once measured (free of the start estimate), else the booked estimate."""
        window = self.accounting.window_share(name) if self._measuring() else None
        return self.accounting.vms[name].cpu_share if window is None else window

    def _carried_cores(self, name: str) -> float:
        """What a moving VM's cookie tells the next PE it uses: its measured demand in
        cores (0 where nothing is measured: the next PE estimates it from its RAM)."""
        return self._demand_share(name) * self.accounting.node.cpus if self._measuring() else 0.0

    def _pool_members(self, pool: list) -> list[PoolMember]:
        """The pool as the rebalancer sees it; this PE's entry carries the load it would
        report now, not the one the registrar last heard (and is added if the registrar
        does not list this PE yet)."""
        members, own_seen = [], False
        for element in pool:
            policy = element.policy
            free_mb = policy.free_ram_mb if "free_ram_mb" in P.POLICY_FIELDS.get(policy.policy_type, ()) else None
            own = element.identifier == self.settings.pe_identifier
            own_seen |= own
            load = self.load() if own else P.load_from_wire(policy.load)
            members.append(PoolMember(load, None if free_mb is None else free_mb * 1024, own))
        if not own_seen:
            members.append(PoolMember(self.load(), self.accounting.free_kb, own=True))
        return members

    def _session_of(self, server_id: str):
        return next((session for session, vm in self.sessions.items() if vm.request.server_id == server_id), None)

    async def _move_out(self, name: str, cpu_cores: float = 0.0, target_pe: int = 0,
                        migration: S.MigrationTarget | None = None) -> str | None:  # fmt: skip
        """A planned failover: stop the VM here, tell its PU it is not running any more
        (so the next PE fences no one), and let the PU take it to another PE: to
        ``target_pe`` when the leader planned one, else where the pool policy says.
        With the target's ``migration`` target and a hypervisor that can, the VM is
        live-migrated instead, and its PU re-adopts it there with a cookie naming that PE.
        Fires with how it moved (the reason its PU is told), None for a VM without a PU."""
        session = self._session_of(name)
        if session is None:
            return None
        vm = self.sessions[session]
        self.moving = True
        try:
            if migration is not None and self.can_migrate() and await self._migrate(vm, migration):
                self.sessions.pop(session, None)
                self._release(vm)  # its RAM; not its disk, which it keeps using there
                session.send(self._cookie(vm, cpu_cores, runs_on=(target_pe, migration.host)))
                how = f"live-migrated from {self.settings.host} to {migration.host}"
            else:
                log.info("moving {server} away to even out the pool", server=name)
                await self._shut_down(None, vm)
                self.sessions.pop(session, None)
                self._release_lease_unless_here(vm.request)
                session.send(self._cookie(vm, cpu_cores))  # the next PE counts it at what it used here
                how = f"stopped on {self.settings.host}"
            session.send(S.StopResult(name, S.ResultCode.MOVED, f"{how} to even out the pool", target_pe))
            session.close()
            self.moves += 1
            return how
        finally:
            self.moving = False

    def can_migrate(self) -> bool:
        return ILiveMigration.providedBy(self.hypervisor) and bool(self.hypervisor.live_migration)

    async def _migrate(self, vm: VmSession, migration: S.MigrationTarget) -> bool:
        """Live-migrate ``vm`` to ``migration``. True once it runs there and not here.
        False when it still runs here (the caller stops and restarts it instead): never
        two copies, never none."""
        name = vm.request.server_id
        log.info("live-migrating {server} to {host} ({uri})", server=name, host=migration.host, uri=migration.uri)
        vm.migrating = True
        try:
            await self.hypervisor.migrate(name, migration.uri)
        except Exception as err:  # noqa: BLE001 - where the VM is now decides what next
            try:
                runs_here = await self.hypervisor.state(name) in NORMAL_STATES
            except Exception:  # noqa: BLE001 - gone from this hypervisor
                runs_here = False
            if runs_here:
                log.warn("live migration of {server} failed ({err}); stopping and restarting it instead",
                         server=name, err=str(err))  # fmt: skip
                return False
            # Gone from here: on the target, or nowhere. The PU goes there with a cookie
            # naming that PE, which re-adopts it if it runs there and starts it if not.
            log.warn("live migration of {server} failed ({err}) but it left this host; its PU goes to {host}",
                     server=name, err=str(err), host=migration.host)  # fmt: skip
        finally:
            vm.migrating = False
        log.info("{server} live-migrated to {host}", server=name, host=migration.host)
        return True

    # ------------------------------------------------------------ planned rebalancing

    def vm_report(self) -> S.VmReport:
        """This PE's VMs with their CPU demand and RAM, for the rebalancing leader."""
        node, me = self.accounting.node, self.settings.pe_identifier
        samples_if_unmeasured = 0xFFFF  # the estimate is final: as measured as it gets
        entries, unlisted = [], round(self.accounting.host_cpu_share * node.cpus * 1000)
        for name, usage in self.accounting.vms.items():
            millicores = round(self._demand_share(name) * node.cpus * 1000)
            if not S.SERVER_ID_PATTERN.fullmatch(name) or len(name) > S.MAX_SERVER_ID:
                unlisted += millicores  # a domain found at start-up with a name no PU uses
                continue
            movable = self._session_of(name) is not None and self.domain_states.get(name) == RUNNING
            samples = min(usage.samples, 0xFFFF) if self._measuring() else samples_if_unmeasured
            entries.append(S.VmEntry(name, usage.ram_kb, millicores, samples, movable))
        entries.sort(key=lambda e: (-e.cpu_millicores, e.server_id))
        unlisted += sum(e.cpu_millicores for e in entries[S.MAX_REPORT_VMS :])
        free_kb = min(self.accounting.free_kb, node.ram_kb)
        return S.VmReport(me, node.cpus, node.ram_kb, free_kb, unlisted, tuple(entries[: S.MAX_REPORT_VMS]), self.migration_target())

    def migration_target(self) -> S.MigrationTarget | None:
        """Where other PEs live-migrate VMs to this one; None where it takes none."""
        if not self.settings.migration_uri or not self.can_migrate():
            return None
        return S.MigrationTarget(self.settings.host, self.settings.migration_uri)

    def _close_unless_vm(self, session: Session) -> None:
        """A PE-to-PE question gets its answer and the connection ends, unless it came
        on a PU's session that holds a VM (closing that would orphan the VM)."""
        if session not in self.sessions:
            session.close()

    def _move_mac(self, pe_identifier: int, server_id: str, target_pe: int,
                  migration: S.MigrationTarget | None = None, issued_s: int = 0) -> bytes:  # fmt: skip
        secret = self.settings.secret
        return S.move_request_mac(secret, pe_identifier, server_id, target_pe, migration, issued_s) if secret else b""

    def _replayed(self, request: S.MoveRequest) -> str | None:
        """Why a signed MoveRequest is not taken (too old, from the future, or seen
        before), or None. Without a pool secret nothing is signed, so nothing to check."""
        if not self.settings.secret:
            return None
        now = self.clock.seconds()
        self.move_requests_seen = {mac: until for mac, until in self.move_requests_seen.items() if until > now}
        if abs(now - request.issued_s) > self.MOVE_REQUEST_MAX_AGE_S:
            return f"issued {now - request.issued_s:.0f} s from now, more than {self.MOVE_REQUEST_MAX_AGE_S:.0f} s"
        if request.mac in self.move_requests_seen:
            return "a replay of a request already taken"
        self.move_requests_seen[request.mac] = now + 2 * self.MOVE_REQUEST_MAX_AGE_S
        return None

    async def _answer_move(self, request: S.MoveRequest, session: Session) -> None:
        session.send(await self.move_on_request(request))
        self._close_unless_vm(session)

    async def move_on_request(self, request: S.MoveRequest) -> S.MoveAnswer:
        """The leader asks this PE to move a VM to another PE: stop it as a planned move
        and send its PU to that PE. Refused for a VM without a PU here, a target that
        is this PE, another move under way, or (with a pool secret) a wrong MAC."""
        me, name = self.settings.pe_identifier, request.server_id

        def refused(code: int, reason: str) -> S.MoveAnswer:
            log.info("move of {server} refused: {reason}", server=name, reason=reason)
            return S.MoveAnswer(me, name, code, reason)

        expected = self._move_mac(request.pe_identifier, name, request.target_pe, request.migration, request.issued_s)
        if not hmac.compare_digest(request.mac, expected):
            return refused(S.ResultCode.INVALID_REQUEST, "not signed with the pool secret")
        if (stale := self._replayed(request)) is not None:
            return refused(S.ResultCode.INVALID_REQUEST, stale)
        if request.target_pe == me:
            return refused(S.ResultCode.INVALID_REQUEST, "the target is this PE")
        if self._session_of(name) is None:
            return refused(S.ResultCode.INVALID_REQUEST, f"{name} has no PU session here")
        if self.moving:
            return refused(S.ResultCode.UNSPECIFIED, "another move is under way")
        how = await self._move_out(name, self._carried_cores(name), request.target_pe, request.migration)
        if how is None:
            return refused(S.ResultCode.UNSPECIFIED, f"{name} ended meanwhile")
        return S.MoveAnswer(me, name, S.ResultCode.MOVED, f"{how}, its PU sent to PE {hex_id(request.target_pe)}")

    async def _lead(self, planner, pool: list) -> list[str]:
        """One rebalancing round, on the leader only: the PE with the lowest identifier
        in the registrar's answer (when it dies, the next lowest leads). It gathers every
        PE's VmReport, plans once the pool's set of VMs stayed the same for
        ``planner.quiet_rounds`` rounds (no start or stop meanwhile: while VMs keep
        coming the pool policy places them, and moves would be undone), and makes the
        moves one after another. Fires with the server IDs moved."""
        elements = {e.identifier: e for e in pool if isinstance(e, P.PoolElement)}
        me = self.settings.pe_identifier
        if self.planning or self.peers is None or me not in elements or min(elements) != me:
            return []
        self.planning = True
        try:
            others = {i: e for i, e in elements.items() if i != me}
            reports = await self._gather(others)
            if reports is None:
                return []
            vm_set = frozenset(vm.server_id for report in reports for vm in report.vms)
            self.quiet_rounds = self.quiet_rounds + 1 if vm_set == self.planned_vm_set else 0
            self.planned_vm_set = vm_set
            if self.quiet_rounds < planner.quiet_rounds:
                return []
            moves = planner.plan([self._planned_pe(report, planner) for report in reports])
            migration_targets = {report.pe_identifier: report.migration for report in reports}
            done = []
            for move in moves:
                if not await self._make_move(move, others, migration_targets.get(move.target)):
                    break  # the rest was planned on a pool that is not there: plan again next round
                done.append(move.server_id)
            return done
        finally:
            self.planning = False

    async def _gather(self, others: dict) -> list[S.VmReport] | None:
        """Every PE's VmReport, this one's first; None when one did not answer (its VMs
        and RAM unknown, no plan is safe)."""
        asked = await defer.DeferredList([self.peers.report(e) for e in others.values()], consumeErrors=True)
        reports = [self.vm_report()]
        for identifier, (ok, report) in zip(others, asked):
            if not ok or not isinstance(report, S.VmReport) or report.pe_identifier != identifier:
                log.info("no rebalancing plan now: PE {pe} did not report its VMs", pe=hex_id(identifier))
                return None
            reports.append(report)
        return reports

    def _planned_pe(self, report: S.VmReport, planner) -> PlannedPe:
        now = self.clock.seconds()

        def movable(vm: S.VmEntry) -> bool:
            recently = now - self.moved_at.get(vm.server_id, float("-inf")) < planner.cooldown_s
            return vm.movable and vm.samples >= planner.min_samples and not recently

        vms = tuple(PlannedVm(vm.server_id, vm.cpu_millicores / 1000, vm.ram_kb, movable(vm)) for vm in report.vms)
        return PlannedPe(report.pe_identifier, report.cpus, report.free_ram_kb, vms, report.host_millicores / 1000)

    async def _make_move(self, move: Move, others: dict, migration: S.MigrationTarget | None = None) -> bool:
        """Ask the VM's PE to move it (live, to ``migration``, where the target takes
        live migrations), then wait until it runs on the target. False when the move
        was refused or did not arrive in time."""
        me = self.settings.pe_identifier
        issued = int(self.clock.seconds())
        mac = self._move_mac(me, move.server_id, move.target, migration, issued)
        request = S.MoveRequest(me, move.server_id, move.target, mac, migration, issued)
        if move.source == me:
            answer = await self.move_on_request(request)
        else:
            answer = await self.peers.move(others[move.source], request)
        if not isinstance(answer, S.MoveAnswer) or not answer.moved:
            why = answer.reason if isinstance(answer, S.MoveAnswer) else "no answer"
            log.info("planned move of {server} not made: {why}", server=move.server_id, why=why)
            return False
        self.moved_at[move.server_id] = self.clock.seconds()
        log.info("moving {server} from PE {source} to PE {target} (planned)", server=move.server_id,
                 source=hex_id(move.source), target=hex_id(move.target))  # fmt: skip
        deadline = self.clock.seconds() + self.MOVE_TIMEOUT_S
        while self.clock.seconds() < deadline:
            # Wait first: the PEs' load updates must reach the registrar before the next
            # move, or its answer to that VM's PU lacks the RAM this move just freed.
            await task.deferLater(self.clock, self.MOVE_POLL_S, lambda: None)
            report = self.vm_report() if move.target == me else await self.peers.report(others[move.target])
            if isinstance(report, S.VmReport) and any(vm.server_id == move.server_id and vm.movable for vm in report.vms):
                return True
        log.warn("{server} does not run on PE {target} after {s} s", server=move.server_id,
                 target=hex_id(move.target), s=self.MOVE_TIMEOUT_S)  # fmt: skip
        return False

    def registration(self, policy, policy_arguments: list[str], transport, life_ms: int) -> M.Registration:
        """The REGISTRATION carrying this PE's current load (and its proof of the pool secret)."""
        if getattr(policy, "wants_free_ram", False):
            parameter = policy.make_parameter(self.load(), policy_arguments, free_ram_mb=self.accounting.free_kb // 1024)
        else:
            parameter = policy.make_parameter(self.load(), policy_arguments)
        element = P.PoolElement(self.settings.pe_identifier, 0, life_ms, transport, parameter)
        secret = self.settings.secret
        mac = P.registration_mac(secret, self.settings.pool_handle, element) if secret else None
        return M.Registration(self.settings.pool_handle, element, mac)

    def describe(self) -> dict:
        sample = self.accounting.sample()
        return {
            "pe_identifier": hex_id(self.settings.pe_identifier),
            "host": self.settings.host,
            "load": round(self.load(), 4),
            "load_raised": self.accounting.raised,
            "cpu": round(sample.cpu, 4),
            "ram": round(sample.ram, 4),
            "free_ram_kb": self.accounting.free_kb,
            "vms": [
                {"server_id": vm.request.server_id, "ram_mb": vm.request.ram_mb, "running": vm.running,
                 "cpu_share": round(sample.vm_cpu.get(vm.request.server_id, 0.0), 4)}
                for vm in (*self.sessions.values(), *self.orphans.values())
            ],  # fmt: skip
            "orphans": sorted(self.orphans),
            "sessions": len(self.sessions),
            "refusals": {S.ResultCode(code).name.lower(): n for code, n in self.refusals.items()},
        }
