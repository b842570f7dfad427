"""The pool element's behaviour: VM sessions with PUs, leases, accounting, load reports.

Rebalancing, planned moves and live migration are ``xenpool/pe/moves.py`` (``Rebalancing``,
a mixin of ``PoolElementCore``).

No sockets here: a *session* is anything with ``send(message)`` and ``close()`` (a TCP
connection in the daemon, a list in tests); the hypervisor is an IHypervisor; time
comes from an injected IReactorTime, so tests drive every timer with a Clock.
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, cast

from twisted.internet import defer
from twisted.logger import Logger

from ..console.events import EventLog
from ..interfaces import (
    NORMAL_STATES,
    NOSTATE,
    RUNNING,
    SHUTOFF,
    DiskSpecError,
    DomainSpec,
)
from ..logs import hex_id
from ..protocol import cookie as C
from ..protocol import messages as M
from ..protocol import params as P
from ..protocol import session as S
from ..protocol.errors import ProtocolError
from .accounting import HostAccounting, HostCpu
from .leases import LeaseOutcome, LeaseSettings, VmLeases
from .moves import Rebalancing
from .sessions import Session, VmSession

if TYPE_CHECKING:
    from .access import PuAccess

log = Logger()
#: Why a PE without a stonith provider refuses failovers (in its warning and answer).
NO_STONITH = "this PE has no --stonith to fence the old host with (give it --stonith and --stonith-option)"


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


class Refusal(NamedTuple):
    """Why a start is refused; ``holder``: the host that runs (or holds the lease on) the VM."""

    code: int
    reason: str
    holder: S.Holder | None = None


class Fencer(Protocol):
    def fence(self, host: str, pe_identifier: int = 0) -> defer.Deferred: ...


class ClaimAsker(Protocol):
    def ask(
        self, query: S.ClaimQuery, also: frozenset[int] = frozenset()
    ) -> defer.Deferred:
        """The ClaimAnswers of every other PE of the pool that answered in time, and of
        the PEs ``also`` names that the pool no longer lists but whose address is known;
        PEs that cannot be reached (dead, or being fenced) are left out."""


def _path_cut(refusal: tuple, lost: S.Holder | None) -> tuple:
    """A refusal because the host the PU lost runs the VM and answered this PE: the PU's
    own path to that host is cut, not the host dead; say so."""
    refusal = Refusal(*refusal)
    if (
        lost is not None
        and refusal.holder is not None
        and refusal.holder.host == lost.host
    ):
        return refusal._replace(
            reason=f"{refusal.reason}; it answers this PE, so only the PU's path to it is cut"
        )
    return refusal


def _same_vm(held: VmSession, asked: S.CreateServer) -> bool:
    """A request for the very VM this PE started (not a domain merely found running:
    that one only a cookie takes back)."""
    request = held.request
    return not held.discovered and (request.server_id, request.disk, request.ips) == (
        asked.server_id,
        asked.disk,
        asked.ips,
    )


class PoolElementCore(Rebalancing):
    def __init__(
        self,
        settings: PeSettings,
        hypervisor,
        accounting: HostAccounting,
        metric,
        clock,
        disk_xml: Callable[[str], defer.Deferred] | None = None,
        load_changed: Callable[[], None] = lambda: None,
        fencer: Fencer | None = None,
        claims: ClaimAsker | None = None,
        disk_release: Callable[[str], defer.Deferred] | None = None,
        leases: VmLeases | None = None,
    ) -> None:
        self.settings = settings
        # Who may start a VM: a lease from a majority of the voters (none: every lease
        # is granted, and only the claim query stands between two starts).
        self.leases = leases or VmLeases(
            [],
            LeaseSettings(settings.pool_handle, settings.pe_identifier, settings.host),
            clock,
        )
        self.hypervisor = hypervisor
        self.accounting = accounting
        self.metric = metric
        self.clock = clock
        # disk spec -> Deferred[disk XML], checking reachability (storage plugins)
        self.disk_xml = disk_xml or (lambda spec: defer.succeed(""))
        self.disk_release = disk_release or (
            lambda spec: defer.succeed(None)
        )  # after the VM stopped
        self.host_cpu: HostCpu | None = (
            None  # an accounting.HostCpu where the hypervisor runs on this machine
        )
        self.load_changed = load_changed
        self.fencer = fencer
        # VMs whose failover was refused for want of --stonith: warned once each
        self.unfenced_warned: set[str] = set()
        self.fence_attempts = 0  # fences asked of the stonith provider
        self.fence_failures = 0  # ... and those that failed (nothing was started)
        self.claims = claims
        self._init_rebalancing()
        self.starting: dict[str, S.CreateServer] = {}  # claimed, start in progress
        # Domain states as the hypervisor's lifecycle events report them; while events
        # flow (``events_live``), heartbeats are answered from here, without a libvirt call.
        self.domain_states: dict[str, int] = {}
        self.events_live = False
        self.sessions: dict[Session, VmSession] = {}
        self.gone: weakref.WeakSet = (
            weakref.WeakSet()
        )  # sessions lost while they held no VM
        self.orphans: dict[
            str, VmSession
        ] = {}  # VMs whose PU is gone, within their lease
        self.refusals: dict[int, int] = {}
        # What happened here (fences, refused starts), for the status page and alerts.
        self.events = EventLog(
            clock, f"PE {hex_id(settings.pe_identifier)} ({settings.host})"
        )
        # Set by the operator (``xenpool host drain``): the reason no VM starts here and
        # the PE reports itself full; None in normal operation.
        self.maintenance: str | None = None
        # Who may ask (--pu-access, xenpool/pe/access.py): None lets anyone who reaches
        # the session port create, adopt and stop VMs, as before.
        self.access: PuAccess | None = None
        self.proofs: dict[Session, S.PuProof] = {}  # a PU's proof for its next request
        self.pu_names: dict[Session, str] = {}  # the PU each session's request proved

    # ------------------------------------------------------------ messages

    def handle(self, message: object, session: Session) -> defer.Deferred:
        """One message from a PU; answers go to ``session``."""
        if isinstance(message, S.PuProof):
            self.proofs[session] = message  # for the request that follows
            return defer.succeed(None)
        if self.access is not None and isinstance(
            message, (S.CreateServer, M.CookieEcho, S.StopServer)
        ):
            if not self._proven(message, session):
                return defer.succeed(None)
        if isinstance(message, S.CreateServer):
            return defer.Deferred.fromCoroutine(self._create(message, session))
        if isinstance(message, S.CheckRunning):
            if self.events_live:
                self._answer_heartbeat(
                    message, session, self.domain_states.get(message.server_id, SHUTOFF)
                )
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
        self._answer_failure(
            session,
            "",
            S.ResultCode.INVALID_REQUEST,
            f"{type(message).__name__} is not a request a PE takes",
        )
        return defer.succeed(None)

    def _proven(self, message: object, session: Session) -> bool:
        """With --pu-access: does a PU this PE knows ask, and may it manage that VM (the
        cookie's VM is checked once unsealed)? Refused with NOT_AUTHORIZED otherwise."""
        access = self.access
        assert access is not None  # handle() asks only with access control on
        encoded = (
            M.encode(message)
            if isinstance(message, M.CookieEcho)
            else S.encode(cast(S.SessionMessage, message))
        )
        name, why = access.prove(
            self.proofs.pop(session, None), encoded, getattr(session, "tls_name", None)
        )
        server_id = getattr(message, "server_id", "")
        if name is not None and server_id and not access.allows(name, server_id):
            name, why = None, f"PU {name!r} may not manage {server_id}"
        if name is None:
            log.warn("refused an unproven request: {why}", why=why)
            if isinstance(message, S.StopServer):
                self.refusals[S.ResultCode.NOT_AUTHORIZED] = (
                    self.refusals.get(S.ResultCode.NOT_AUTHORIZED, 0) + 1
                )
                session.send(S.StopResult(server_id, S.ResultCode.NOT_AUTHORIZED, why))
            else:
                self._answer_failure(
                    session, server_id, S.ResultCode.NOT_AUTHORIZED, why
                )
            return False
        self.pu_names[session] = name
        return True

    def refuse(self, err: ProtocolError, session: Session) -> None:
        """A malformed request: answer create_failed naming the field, end the session."""
        self._answer_failure(session, "", S.ResultCode.INVALID_REQUEST, str(err))

    def _cookie(
        self,
        vm: VmSession,
        cpu_cores: float = 0.0,
        runs_on: tuple[int, str] | None = None,
    ) -> M.Cookie:
        """``runs_on``: (PE identifier, host) of the PE that now runs it, after a live
        migration; the PU takes the cookie there to re-adopt it."""
        r = vm.request
        pe_identifier, host = runs_on or (
            self.settings.pe_identifier,
            self.settings.host,
        )
        state = C.SessionState(
            self.settings.pool_handle,
            r.server_id,
            r.disk,
            r.ips,
            r.ram_mb,
            r.vcpus,
            vm.running,
            host,
            pe_identifier,
            self.clock.seconds(),
            cpu_cores,
        )
        return M.Cookie(C.seal(state, self.settings.secret))

    def _refuse_start(
        self, session: Session, request: S.CreateServer, refusal: tuple
    ) -> None:
        """A refused start; where another host runs the VM (or holds its lease), the PU
        first gets a cookie naming that host, so it goes there next: a keeper whose own
        cookie was lost (a corrupt state file) finds its VM again instead of giving up."""
        refusal = Refusal(*refusal)
        if refusal.holder is not None and refusal.holder.host != self.settings.host:
            state = C.SessionState(
                self.settings.pool_handle,
                request.server_id,
                request.disk,
                request.ips,
                request.ram_mb,
                request.vcpus,
                True,
                refusal.holder.host,
                refusal.holder.pe_identifier,
                self.clock.seconds(),
                0.0,
            )
            session.send(M.Cookie(C.seal(state, self.settings.secret)))
        self._answer_failure(session, request.server_id, refusal.code, refusal.reason)

    def _answer_failure(
        self, session: Session, server_id: str, code: int, reason: str
    ) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1
        if server_id:
            self.events.record(
                "start_refused", server_id=server_id, code=int(code), reason=reason
            )
        # a failover refused for want of --stonith was warned about once for this VM
        quiet = code == S.ResultCode.FENCE_FAILED and NO_STONITH in reason
        (log.debug if quiet else log.info)(
            "refused {server}: {code} {reason}",
            server=server_id,
            code=int(code),
            reason=reason,
        )
        session.send(S.CreateResult(server_id, code, self.accounting.free_kb, reason))
        session.close()

    # ------------------------------------------------------------ uniqueness

    def _held(self):
        """Every request this PE runs or is starting: (request, only starting?)."""
        for vm in (*self.sessions.values(), *self.orphans.values()):
            yield vm.request, False
        for request in self.starting.values():
            yield request, True

    def conflict_with(
        self, server_id: str, disk: str, ips: tuple[str, ...]
    ) -> tuple[str, bool] | None:
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
        return S.ClaimAnswer(
            self.settings.pe_identifier, self.settings.host, conflict, starting
        )

    async def _claim(
        self, request: S.CreateServer, may_run_on: S.Holder | None = None
    ) -> tuple[int, str] | Refusal | None:
        """Make sure this PE alone may start ``request``, whatever the PU claims: the
        voters' lease (exactly one of two concurrent starters gets it), then every host
        that may still run it (the lease's previous holders, ``may_run_on`` from the
        cookie) asked directly and, where it does not answer, fenced, then the lease
        confirmed again just before the start. Returns why not, or None with the claim
        held here (in ``starting``, and the lease renewed) until the start ends."""
        local = self.conflict_with(request.server_id, request.disk, request.ips)
        if local is not None:
            return (
                S.ResultCode.ALREADY_RUNNING,
                f"{local[0]} on this PE ({self.settings.host})",
            )
        self.starting[request.server_id] = request
        try:
            refusal = await self._claim_lease(request, may_run_on)
        except Exception as err:
            log.failure("claiming {server}", server=request.server_id)
            refusal = (
                S.ResultCode.UNSPECIFIED,
                f"claiming {request.server_id} failed: {err}",
            )
        if refusal is not None:
            if self.starting.get(request.server_id) is request:
                del self.starting[request.server_id]
            self._release_lease_unless_here(request)
        return refusal

    def _release_lease_unless_here(self, request: S.CreateServer) -> None:
        """A start that did not happen gives its lease back (unless the VM runs here)."""
        name = request.server_id
        if self._session_of(name) is None and name not in self.orphans:
            self.leases.release(request).addErrback(
                lambda f: log.failure("releasing the lease of {server}", f, server=name)
            )

    async def _claim_lease(
        self, request: S.CreateServer, may_run_on: S.Holder | None
    ) -> tuple[int, str] | Refusal | None:
        me = self.settings.host
        fenced: set[str] = set()
        cleared: set[S.Holder] = set()  # took over its live lease: asked again below
        outcome = await self.leases.acquire(request)
        if not outcome.granted:
            blocker = outcome.blocker
            if blocker is None:
                return (
                    S.ResultCode.UNSPECIFIED,
                    f"no lease on {request.server_id}: {outcome.reason}",
                )
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
                return Refusal(
                    S.ResultCode.ALREADY_RUNNING,
                    f"no lease on {request.server_id}: {outcome.reason}, "
                    f"and {blocker.host} does not answer",
                    blocker,
                )
            outcome = await self.leases.acquire(request, cleared=blocker.host)
            if not outcome.granted:
                return (
                    S.ResultCode.ALREADY_RUNNING,
                    f"no lease on {request.server_id} after clearing {blocker.host}: {outcome.reason}",
                )
        suspects = {
            h
            for h in outcome.previous | cleared
            if h.host != me and h.host not in fenced
        }
        if (
            may_run_on is not None
            and may_run_on.host != me
            and may_run_on.host not in fenced
        ):
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
                return (
                    S.ResultCode.ALREADY_RUNNING,
                    f"lost the lease on {request.server_id} while fencing: {confirmed.reason}",
                )
        self.leases.hold(request)
        return None

    async def _ask_pool(
        self, request: S.CreateServer, suspects: set[S.Holder]
    ) -> set[str] | tuple[int, str] | Refusal:
        """Ask every PE of the pool, and the suspects directly, whether it runs or starts
        ``request``: a refusal when one does, else the hosts that answered (proof that
        they do not run it)."""
        if self.claims is None:
            return set()
        query = S.ClaimQuery(
            self.settings.pe_identifier, request.server_id, request.disk, request.ips
        )
        try:
            answers = await self.claims.ask(
                query, also=frozenset(h.pe_identifier for h in suspects)
            )
        except Exception as err:
            return (
                S.ResultCode.UNSPECIFIED,
                f"cannot ask the pool whether it runs already: {err}",
            )
        for answer in answers:
            if answer.conflict:
                # Also a PE only starting it: exactly one of two holds the lease, and the
                # other gives way (never "the lower identifier wins" on answers a slow
                # fence can outdate).
                state = "is starting it" if answer.pending else "holds it"
                holder = (
                    None
                    if answer.pending
                    else S.Holder(answer.pe_identifier, answer.host)
                )
                return Refusal(
                    S.ResultCode.ALREADY_RUNNING,
                    f"{answer.conflict} on {answer.host} (PE {hex_id(answer.pe_identifier)}, which {state})",
                    holder,
                )
        return {answer.host for answer in answers}

    async def _fence(self, target: S.Holder, server_id: str) -> tuple[int, str] | None:
        host = target.host
        if self.fencer is None:
            if server_id not in self.unfenced_warned:
                self.unfenced_warned.add(server_id)
                log.warn(
                    "{server} may still run on {host}: failover refused, {why}",
                    server=server_id,
                    host=host,
                    why=NO_STONITH,
                )
            return (
                S.ResultCode.FENCE_FAILED,
                f"{server_id} may still run on {host}; {NO_STONITH}",
            )
        self.fence_attempts += 1
        self.events.record("fence_attempt", host=host, server_id=server_id)
        try:
            await self.fencer.fence(host, target.pe_identifier)
        except Exception as err:
            self.fence_failures += 1
            self.events.record(
                "fence_failure", host=host, server_id=server_id, reason=str(err)
            )
            log.critical(
                "FENCING {host} FAILED, {server} NOT STARTED: {err}",
                host=host,
                server=server_id,
                err=str(err),
            )
            return S.ResultCode.FENCE_FAILED, f"fencing {host} failed: {err}"
        self.events.record("fence_success", host=host, server_id=server_id)
        log.warn("fenced {host} before starting {server}", host=host, server=server_id)
        return None

    # ------------------------------------------------------------ starting

    async def _create(
        self,
        request: S.CreateServer,
        session: Session,
        claimed: bool = False,
        cpu_cores: float = 0.0,
    ) -> None:
        if session in self.sessions:
            return self._answer_failure(
                session,
                request.server_id,
                S.ResultCode.INVALID_REQUEST,
                "this session already has a VM",
            )
        orphan = self.orphans.get(request.server_id)
        if not claimed and orphan is not None and _same_vm(orphan, request):
            # Its keeper is back without a cookie (it lost its state): the VM kept
            # running here for its lease, so it is taken back, not started twice.
            return self._adopt(orphan, session)
        if not claimed:
            refusal = await self._claim(request)
            if refusal is not None:
                return self._refuse_start(session, request, refusal)
        if session in self.gone:
            # The PU went away while the claim ran (a fence can take seconds): a VM started
            # now would belong to a dead session, neither kept for a keeper nor re-adoptable.
            log.info(
                "{server} not started: its PU went away meanwhile",
                server=request.server_id,
            )
            self.starting.pop(request.server_id, None)
            self._release_lease_unless_here(request)
            return None
        try:
            await self._start(request, session, cpu_cores)
        finally:
            self.starting.pop(request.server_id, None)
            self._release_lease_unless_here(request)

    async def _start(
        self, request: S.CreateServer, session: Session, cpu_cores: float = 0.0
    ) -> None:
        if self.maintenance is not None:
            return self._answer_failure(
                session,
                request.server_id,
                S.ResultCode.NO_RAM,
                f"{self.settings.host} is in maintenance: {self.maintenance}",
            )
        vm = VmSession(request)
        self.sessions[session] = vm
        session.send(self._cookie(vm))  # running=false: a failover now fences no one
        if not self.accounting.fits(request.ram_mb):
            del self.sessions[session]
            self.accounting.refused_for_ram()
            self.load_changed()
            return self._answer_failure(
                session,
                request.server_id,
                S.ResultCode.NO_RAM,
                f"needs {request.ram_mb * 1024} KB, {self.accounting.free_kb} KB free",
            )
        self.accounting.reserve(
            request.server_id, request.ram_mb, cpu_cores / self.accounting.node.cpus
        )
        try:
            disk_xml = await self.disk_xml(request.disk)
        except Exception as err:
            self._forget(session)
            # a spec no storage plugin takes is an invalid request, not an unreachable disk
            code = (
                S.ResultCode.INVALID_REQUEST
                if isinstance(err, DiskSpecError)
                else S.ResultCode.DISK_UNREACHABLE
            )
            return self._answer_failure(session, request.server_id, code, str(err))
        if self.sessions.get(session) is not vm:
            # Its PU went away while the disk was checked: the session ended with nothing
            # started (its RAM and lease are given back), so nothing may start now, or the
            # VM would run here untracked, held by no session and no lease.
            log.info(
                "{server} not started: its PU went away meanwhile",
                server=request.server_id,
            )
            return None
        vm.running = True
        session.send(self._cookie(vm))
        try:
            await self.hypervisor.start(
                DomainSpec(
                    request.server_id,
                    request.ram_mb,
                    request.vcpus,
                    disk_xml,
                    request.ips,
                )
            )
        except Exception as err:
            vm.running = False
            if self.orphans.get(request.server_id) is vm:  # its PU went away meanwhile
                del self.orphans[request.server_id]
                if vm.lease_end is not None and vm.lease_end.active():
                    vm.lease_end.cancel()
                self._release(vm)
            self._forget(session)
            return self._answer_failure(
                session,
                request.server_id,
                S.ResultCode.UNSPECIFIED,
                f"start failed: {err}",
            )
        log.info(
            "started {server} ({ram} MB) for a PU",
            server=request.server_id,
            ram=request.ram_mb,
        )
        self.domain_states[request.server_id] = RUNNING
        self.load_changed()
        session.send(
            S.CreateResult(
                request.server_id,
                S.ResultCode.STARTED,
                self.accounting.free_kb,
                f"started on {self.settings.host}",
            )
        )

    async def _cookie_echo(self, echo: M.CookieEcho, session: Session) -> None:
        try:
            state = C.unseal(
                echo.cookie,
                self.settings.secret,
                pool_handle=self.settings.pool_handle,
                now=self.clock.seconds(),
                max_age_s=self.settings.cookie_max_age_s,
            )
        except C.CookieError as err:
            return self._answer_failure(
                session, "", S.ResultCode.COOKIE_REJECTED, err.reason
            )
        if self.access is not None and not self.access.allows(
            self.pu_names.get(session, ""), state.server_id
        ):
            return self._answer_failure(
                session,
                state.server_id,
                S.ResultCode.NOT_AUTHORIZED,
                f"PU {self.pu_names.get(session, '')!r} may not manage {state.server_id}",
            )
        orphan = self.orphans.get(state.server_id)
        request = S.CreateServer(
            state.server_id, state.disk, state.ips, state.ram_mb, state.vcpus
        )
        mine = state.pe_identifier == self.settings.pe_identifier
        if (
            orphan is None
            and mine
            and state.running
            and self.conflict_with(state.server_id, "", ()) is None
        ):
            orphan = await self._take_if_running(state.server_id)
        if orphan is not None and mine:
            orphan.request, orphan.discovered = (
                request,
                False,
            )  # the cookie knows its disk and IPs
            return self._adopt(orphan, session)
        # The lease first, then the pool: a PE that answers holding the VM (the cookie's
        # own host included) is alive and runs it, so this is a stale or replayed cookie,
        # and no one is fenced. Only a host that cannot answer is fenced.
        old_host = (
            S.Holder(state.pe_identifier, state.host)
            if state.running and not mine
            else None
        )
        refusal = await self._claim(request, may_run_on=old_host)
        if refusal is not None:
            return self._refuse_start(session, request, refusal)
        try:
            await self._create(
                request, session, claimed=True, cpu_cores=state.cpu_cores
            )
        finally:
            self.starting.pop(request.server_id, None)

    async def _take_if_running(self, name: str) -> VmSession | None:
        """A cookie says ``name`` runs on this PE, which holds no such VM: one live-migrated
        here whose arrival was not seen yet (no lifecycle event, or it is still on its
        way). Held as an orphan when the hypervisor runs it; None when it does not."""
        try:
            domains = await self.hypervisor.domains()
        except Exception as err:
            log.warn(
                "cannot list the domains to look for {server}: {err}",
                server=name,
                err=str(err),
            )
            return None
        if name in domains:
            self.found_running({name: domains[name]})
        return self.orphans.get(name)

    def _adopt(self, vm: VmSession, session: Session) -> None:
        """A restarted keeper takes back a VM that kept running within its lease."""
        if session in self.gone:
            return  # that keeper went away meanwhile: the VM stays kept for its lease
        del self.orphans[vm.request.server_id]
        if vm.lease_end is not None and vm.lease_end.active():
            vm.lease_end.cancel()
        vm.lease_end = None
        self.sessions[session] = vm
        self.leases.hold(vm.request)
        self.domain_states.setdefault(vm.request.server_id, RUNNING)
        log.info("{server} re-adopted by its keeper", server=vm.request.server_id)
        session.send(self._cookie(vm))
        session.send(
            S.CreateResult(
                vm.request.server_id,
                S.ResultCode.STARTED,
                self.accounting.free_kb,
                "re-adopted, kept running",
            )
        )

    async def _check_running(self, message: S.CheckRunning, session: Session) -> None:
        vm = self.sessions.get(session)
        if vm is None or vm.request.server_id != message.server_id:
            session.send(S.CheckRunningResponse(message.server_id, NOSTATE))
            return
        try:
            state = await self.hypervisor.state(message.server_id)
        except Exception:
            state = SHUTOFF
        self._answer_heartbeat(message, session, state)

    def repeatable_heartbeat_state(
        self, session: Session, server_id: str
    ) -> int | None:
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

    def _answer_heartbeat(
        self, message: S.CheckRunning, session: Session, state: int
    ) -> None:
        vm = self.sessions.get(session)
        if vm is None or vm.request.server_id != message.server_id:
            session.send(S.CheckRunningResponse(message.server_id, NOSTATE))
            return
        if vm.migrating:
            state = (
                RUNNING  # a live migration keeps it running; here it ends "shut off"
            )
        session.send(S.CheckRunningResponse(message.server_id, state))
        if state not in NORMAL_STATES:
            self._lost_domain(session, vm, state)

    def _lost_domain(self, session: Session | None, vm: VmSession, state: int) -> None:
        """The VM stopped or crashed by itself: its session ends (the PU decides what next)."""
        log.warn(
            "{server} is in state {state}: ending its session",
            server=vm.request.server_id,
            state=state,
        )
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
            if (
                state == RUNNING
                and self._session_of(name) is None
                and name not in self.orphans
            ):
                self._arrived(name)
            return
        for session, vm in list(self.sessions.items()):
            if (
                vm.request.server_id == name
                and vm.running
                and not (vm.stopping or vm.migrating)
            ):
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

        self.hypervisor.domains().addCallbacks(
            found,
            lambda f: log.failure(
                "listing domains after {server} arrived", f, server=name
            ),
        )

    async def _stop(self, message: S.StopServer, session: Session) -> None:
        vm = self.sessions.get(session)
        if vm is None or vm.request.server_id != message.server_id:
            session.send(
                S.StopResult(
                    message.server_id,
                    S.ResultCode.INVALID_REQUEST,
                    "no such VM in this session",
                )
            )
            return
        await self._shut_down(session, vm)
        session.send(
            S.StopResult(message.server_id, S.ResultCode.NORMAL_END, "shut down")
        )
        session.close()

    # ------------------------------------------------------------ session end

    def session_lost(self, session: Session) -> defer.Deferred:
        """The PU is gone: its VM keeps running for the lease, waiting to be re-adopted,
        then is shut down gracefully and destroyed if it does not stop in time."""
        self.proofs.pop(session, None)
        self.pu_names.pop(session, None)
        vm = self.sessions.get(session)
        if vm is None:
            self.gone.add(
                session
            )  # a start or re-adoption still on its way must not use it
            return defer.succeed(None)
        if not vm.running or self.settings.lease_s <= 0:
            return defer.Deferred.fromCoroutine(self._shut_down(session, vm))
        del self.sessions[session]
        self.orphans[vm.request.server_id] = vm
        vm.lease_end = self.clock.callLater(self.settings.lease_s, self._lease_over, vm)
        log.info(
            "{server}: its PU is gone; kept for {lease} s",
            server=vm.request.server_id,
            lease=self.settings.lease_s,
        )
        return defer.succeed(None)

    def found_running(self, domains: dict[str, tuple[int, int]]) -> None:
        """At start-up: domains already running on this host (the PE was restarted, its
        VMs were not) are kept like VMs whose PU is gone: their RAM counts, their names
        are taken, and a keeper echoing their cookie re-adopts them within the lease."""
        for name, (state, ram_kb) in domains.items():
            if (
                name in self.orphans
                or self._session_of(name) is not None
                or state not in NORMAL_STATES
            ):
                continue
            vm = VmSession(
                S.CreateServer(name, "", (), max(1, ram_kb // 1024)),
                running=True,
                discovered=True,
            )
            self.accounting.reserve(name, vm.request.ram_mb)
            self.orphans[name] = vm
            self.leases.hold(vm.request)
            self.domain_states[name] = state
            vm.lease_end = self.clock.callLater(
                max(self.settings.lease_s, 0), self._lease_over, vm
            )
            log.info(
                "{server} was running here already; kept for its keeper for {lease} s",
                server=name,
                lease=self.settings.lease_s,
            )
        if domains:
            self.load_changed()

    def _lease_over(self, vm: VmSession) -> None:
        if self.orphans.pop(vm.request.server_id, None) is None:
            return
        vm.lease_end = None
        log.info(
            "{server}: lease over, no keeper came back", server=vm.request.server_id
        )
        defer.Deferred.fromCoroutine(self._shut_down(None, vm)).addErrback(
            lambda f: log.failure("ending a lease", f)
        )

    async def _shut_down(self, session: Session | None, vm: VmSession) -> None:
        name = vm.request.server_id
        vm.stopping = True
        if vm.running:
            try:
                await self.hypervisor.shutdown(name, self.settings.shutdown_timeout_s)
            except Exception as err:
                log.warn(
                    "shutting down {server} failed: {err}; destroying it",
                    server=name,
                    err=str(err),
                )
                try:
                    await self.hypervisor.destroy(name)
                except Exception as err2:
                    log.error(
                        "destroying {server} failed: {err}", server=name, err=str(err2)
                    )
            vm.running = False
        if session is not None:
            self.sessions.pop(session, None)
        self._release(vm)
        try:
            await self.disk_release(vm.request.disk)
        except Exception as err:
            log.warn(
                "releasing the disk of {server} failed: {err}",
                server=name,
                err=str(err),
            )
        log.info(
            "{server} stopped, {ram} MB returned", server=name, ram=vm.request.ram_mb
        )

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
        # Only some hypervisors report how long a VM waited for a core (the others: None).
        waits = self.accounting.settings.count_cpu_wait
        if self.hypervisor.measures_cpu:
            for vm in [*self.sessions.values(), *self.orphans.values()]:
                if vm.running:
                    name = vm.request.server_id
                    try:
                        cpu_ns = await self.hypervisor.cpu_time_ns(name)
                        wait_ns = (
                            await self.hypervisor.cpu_wait_ns(name) if waits else None
                        )
                        self.accounting.sample_vm(name, cpu_ns, now, wait_ns)
                    except Exception:
                        pass
        if self.host_cpu is not None:
            share = self.host_cpu.share(
                sum(vm.cpu_share for vm in self.accounting.vms.values())
            )
            if share is not None:
                self.accounting.sample_host(share)

    def load(self) -> float:
        if self.maintenance is not None:
            return 1.0  # full: the pool policy places nothing here
        return self.accounting.load(self.metric)

    def set_maintenance(self, reason: str | None) -> None:
        """Drain (a reason) or resume (None): while set, this PE starts no VM and
        reports itself full, but stays registered, so that other PEs' claim queries
        still reach it and a watchdog keeps being fed."""
        if reason == self.maintenance:
            return
        self.maintenance = reason
        self.events.record(
            "maintenance",
            host=self.settings.host,
            state="draining" if reason is not None else "up",
            reason=reason or "resumed",
        )
        self.load_changed()

    def host_state(self) -> str:
        """up, draining (maintenance, VMs still here) or maintenance (empty)."""
        if self.maintenance is None:
            return "up"
        return "draining" if self.sessions or self.orphans else "maintenance"

    def _session_of(self, server_id: str) -> Session | None:
        return next(
            (
                session
                for session, vm in self.sessions.items()
                if vm.request.server_id == server_id
            ),
            None,
        )

    def registration(
        self, policy, policy_arguments: list[str], transport, life_ms: int
    ) -> M.Registration:
        """The REGISTRATION carrying this PE's current load (and its proof of the pool secret)."""
        if getattr(policy, "wants_free_ram", False):
            parameter = policy.make_parameter(
                self.load(),
                policy_arguments,
                free_ram_mb=0
                if self.maintenance is not None
                else self.accounting.free_kb // 1024,
            )
        else:
            parameter = policy.make_parameter(self.load(), policy_arguments)
        element = P.PoolElement(
            self.settings.pe_identifier, 0, life_ms, transport, parameter
        )
        secret = self.settings.secret
        mac = (
            P.registration_mac(secret, self.settings.pool_handle, element)
            if secret
            else None
        )
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
                {
                    "server_id": vm.request.server_id,
                    "ram_mb": vm.request.ram_mb,
                    "running": vm.running,
                    "cpu_share": round(sample.vm_cpu.get(vm.request.server_id, 0.0), 4),
                }
                for vm in (*self.sessions.values(), *self.orphans.values())
            ],
            "orphans": sorted(self.orphans),
            "sessions": len(self.sessions),
            "refusals": {
                S.ResultCode(code).name.lower(): n for code, n in self.refusals.items()
            },
            "state": self.host_state(),
            "maintenance": self.maintenance,
            "cpus": self.accounting.node.cpus,
            "ram_kb": self.accounting.node.ram_kb,
            "events": self.events.describe(),
        }
