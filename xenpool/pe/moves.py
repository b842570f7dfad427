"""The pool element's part in rebalancing: the leader's rounds, planned moves and live migration.

``Rebalancing`` is a mixin of ``PoolElementCore`` (``xenpool/pe/core.py``), which keeps the
sessions, leases and load. Two ways to even out the pool:

* a *rebalancer* (``IRebalancer``) on every PE chooses a VM that should leave this PE
  (``rebalance``), which is stopped here and started where the pool policy says
  (``_move_out``);
* a *planner* (``IPoolPlanner``) runs on the leader only, the PE with the lowest
  identifier: it gathers every PE's ``VmReport`` (``vm_report``), plans once the pool's
  VMs stayed the same for a few rounds, and asks each VM's PE to move it to its planned
  target (``MoveRequest``, signed with the pool secret; ``move_on_request``), live where
  the target takes live migrations (``migration_target``, ``_migrate``).

What it uses of the core: ``settings``, ``clock``, ``hypervisor``, ``accounting``,
``metric``, ``sessions``, ``domain_states``, ``load()``, ``_session_of``, ``_cookie``,
``_shut_down``, ``_release`` and ``_release_lease_unless_here``.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Protocol, cast

from twisted.internet import defer, task
from twisted.logger import Logger

from ..freshness import FreshOnce
from ..interfaces import (
    NORMAL_STATES,
    RUNNING,
    ILiveMigration,
    IPoolPlanner,
    Move,
    PlannedPe,
    PlannedVm,
    PoolMember,
)
from ..logs import hex_id
from ..protocol import params as P
from ..protocol import session as S
from .sessions import Session, VmSession

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from ..interfaces import IHypervisor, ILoadMetric
    from ..protocol import messages as M
    from .access import PuAccess
    from .accounting import HostAccounting
    from .core import PeSettings

log = Logger()


class PeerAsker(Protocol):
    """How the rebalancing leader reaches another PE of the pool (its session port in
    the daemon, memory in the simulator). Both fire None when the PE does not answer."""

    def report(self, element: P.PoolElement) -> defer.Deferred:
        """Its VmReport."""

    def move(self, element: P.PoolElement, request: S.MoveRequest) -> defer.Deferred:
        """Its MoveAnswer, once it stopped the VM (or why not)."""


class Rebalancing:
    """Rebalancing, planned moves and live migration of a ``PoolElementCore``."""

    # The leader's pace through a plan: the next move once the last one runs again on
    # its target (checked every MOVE_POLL_S), or once MOVE_TIMEOUT_S passed without.
    MOVE_POLL_S = 1.0
    MOVE_TIMEOUT_S = 120.0
    # A MoveRequest is taken only this close to its issue time, and only once.
    MOVE_REQUEST_MAX_AGE_S = 60.0

    # What the mixin uses of PoolElementCore, which sets and defines these.
    settings: PeSettings
    clock: IReactorTime
    hypervisor: IHypervisor
    accounting: HostAccounting
    metric: ILoadMetric
    sessions: dict[Session, VmSession]
    domain_states: dict[str, int]
    access: PuAccess | None

    if TYPE_CHECKING:

        def load(self) -> float: ...

        def _session_of(self, server_id: str) -> Session | None: ...

        def _cookie(
            self,
            vm: VmSession,
            cpu_cores: float = 0.0,
            runs_on: tuple[int, str] | None = None,
        ) -> M.Cookie: ...

        async def _shut_down(self, session: Session | None, vm: VmSession) -> None: ...

        def _release(self, vm: VmSession) -> None: ...

        def _release_lease_unless_here(self, request: S.CreateServer) -> None: ...

    def _init_rebalancing(self) -> None:
        self.moving = False  # a rebalancing move is under way
        self.next_move_at = 0.0
        self.last_pool_total: float | None = (
            None  # the pool's summed load at the last rebalancing decision
        )
        self.moves = 0
        self.peers: PeerAsker | None = None  # for a planning rebalancer (IPoolPlanner)
        self.planning = False  # this PE leads a rebalancing round now
        self.planned_vm_set: frozenset[str] | None = (
            None  # the pool's VMs at the last round: a change means starts
        )
        self.quiet_rounds = 0  # rounds since the pool's VMs last changed
        self.moved_at: dict[str, float] = {}  # when this leader last moved each VM
        self.move_requests = FreshOnce(self.MOVE_REQUEST_MAX_AGE_S)

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
            if (
                not measuring
                or self.accounting.vms[name].samples >= rebalancer.min_samples
            ):
                measured[name] = self._demand_share(name)
        candidates = type(sample)(sample.cpu, sample.ram, measured)
        vm_ram = {n: vm.ram_kb for n, vm in self.accounting.vms.items()}
        members = self._pool_members(pool)
        # While VMs are still being started the pool's total load keeps changing and the
        # pool policy is filling the gaps itself: moving now would undo its work.
        total, last_total = sum(m.load for m in members), self.last_pool_total
        self.last_pool_total = total
        tolerance = getattr(rebalancer, "settle_tolerance", None)
        if tolerance is not None and (
            last_total is None or abs(total - last_total) > tolerance
        ):
            return defer.succeed(None)
        name = rebalancer.choose(
            candidates, vm_ram, members, self.metric, self.accounting.node.ram_kb
        )
        if name is None:
            return defer.succeed(None)
        self.next_move_at = (
            self.clock.seconds() + rebalancer.cooldown_s
        )  # let the pool see the effect first
        moved = defer.Deferred.fromCoroutine(
            self._move_out(name, self._carried_cores(name))
        )
        return moved.addCallback(lambda how: None if how is None else name)

    def _measuring(self) -> bool:
        # Where the hypervisor cannot measure CPU (libvirt's test driver) the estimate is
        # all there will ever be, so every VM counts as measured.
        return self.hypervisor.measures_cpu

    def _demand_share(self, name: str) -> float:
        """A VM's CPU demand as a share of the host: over the recent window, unsmoothed,
        once measured (free of the start estimate), else the booked estimate."""
        window = self.accounting.window_share(name) if self._measuring() else None
        return self.accounting.vms[name].cpu_share if window is None else window

    def _carried_cores(self, name: str) -> float:
        """What a moving VM's cookie tells the next PE it uses: its measured demand in
        cores (0 where nothing is measured: the next PE estimates it from its RAM)."""
        return (
            self._demand_share(name) * self.accounting.node.cpus
            if self._measuring()
            else 0.0
        )

    def _pool_members(self, pool: list) -> list[PoolMember]:
        """The pool as the rebalancer sees it; this PE's entry carries the load it would
        report now, not the one the registrar last heard (and is added if the registrar
        does not list this PE yet)."""
        members, own_seen = [], False
        for element in pool:
            policy = element.policy
            free_mb = (
                policy.free_ram_mb
                if "free_ram_mb" in P.POLICY_FIELDS.get(policy.policy_type, ())
                else None
            )
            own = element.identifier == self.settings.pe_identifier
            own_seen |= own
            load = self.load() if own else P.load_from_wire(policy.load)
            members.append(
                PoolMember(load, None if free_mb is None else free_mb * 1024, own)
            )
        if not own_seen:
            members.append(PoolMember(self.load(), self.accounting.free_kb, own=True))
        return members

    async def _move_out(
        self,
        name: str,
        cpu_cores: float = 0.0,
        target_pe: int = 0,
        migration: S.MigrationTarget | None = None,
    ) -> str | None:
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
            if (
                migration is not None
                and self.can_migrate()
                and await self._migrate(vm, migration)
            ):
                self.sessions.pop(session, None)
                self._release(vm)  # its RAM; not its disk, which it keeps using there
                session.send(
                    self._cookie(vm, cpu_cores, runs_on=(target_pe, migration.host))
                )
                how = f"live-migrated from {self.settings.host} to {migration.host}"
            else:
                log.info("moving {server} away to even out the pool", server=name)
                await self._shut_down(None, vm)
                self.sessions.pop(session, None)
                self._release_lease_unless_here(vm.request)
                session.send(
                    self._cookie(vm, cpu_cores)
                )  # the next PE counts it at what it used here
                how = f"stopped on {self.settings.host}"
            session.send(
                S.StopResult(
                    name, S.ResultCode.MOVED, f"{how} to even out the pool", target_pe
                )
            )
            session.close()
            self.moves += 1
            return how
        finally:
            self.moving = False

    def can_migrate(self) -> bool:
        return ILiveMigration.providedBy(self.hypervisor) and bool(
            self.hypervisor.live_migration
        )

    async def _migrate(self, vm: VmSession, migration: S.MigrationTarget) -> bool:
        """Live-migrate ``vm`` to ``migration``. True once it runs there and not here.
        False when it still runs here (the caller stops and restarts it instead): never
        two copies, never none."""
        name = vm.request.server_id
        log.info(
            "live-migrating {server} to {host} ({uri})",
            server=name,
            host=migration.host,
            uri=migration.uri,
        )
        vm.migrating = True
        try:
            await cast(ILiveMigration, self.hypervisor).migrate(name, migration.uri)
        except Exception as err:
            try:
                runs_here = await self.hypervisor.state(name) in NORMAL_STATES
            except Exception:
                runs_here = False
            if runs_here:
                log.warn(
                    "live migration of {server} failed ({err}); stopping and restarting it instead",
                    server=name,
                    err=str(err),
                )
                return False
            # Gone from here: on the target, or nowhere. The PU goes there with a cookie
            # naming that PE, which re-adopts it if it runs there and starts it if not.
            log.warn(
                "live migration of {server} failed ({err}) but it left this host; its PU goes to {host}",
                server=name,
                err=str(err),
                host=migration.host,
            )
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
                unlisted += (
                    millicores  # a domain found at start-up with a name no PU uses
                )
                continue
            movable = (
                self._session_of(name) is not None
                and self.domain_states.get(name) == RUNNING
            )
            samples = (
                min(usage.samples, 0xFFFF)
                if self._measuring()
                else samples_if_unmeasured
            )
            entries.append(S.VmEntry(name, usage.ram_kb, millicores, samples, movable))
        entries.sort(key=lambda e: (-e.cpu_millicores, e.server_id))
        unlisted += sum(e.cpu_millicores for e in entries[S.MAX_REPORT_VMS :])
        free_kb = min(self.accounting.free_kb, node.ram_kb)
        return S.VmReport(
            me,
            node.cpus,
            node.ram_kb,
            free_kb,
            unlisted,
            tuple(entries[: S.MAX_REPORT_VMS]),
            self.migration_target(),
        )

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

    def _move_mac(
        self,
        pe_identifier: int,
        server_id: str,
        target_pe: int,
        migration: S.MigrationTarget | None = None,
        issued_s: int = 0,
    ) -> bytes:
        secret = self.settings.secret
        return (
            S.move_request_mac(
                secret, pe_identifier, server_id, target_pe, migration, issued_s
            )
            if secret
            else b""
        )

    def _replayed(self, request: S.MoveRequest) -> str | None:
        """Why a signed MoveRequest is not taken (too old, from the future, or seen
        before), or None. Without a pool secret nothing is signed, so nothing to check."""
        if not self.settings.secret:
            return None
        now = self.clock.seconds()
        if self.move_requests.too_old(request.issued_s, now):
            return f"issued {now - request.issued_s:.0f} s from now, more than {self.MOVE_REQUEST_MAX_AGE_S:.0f} s"
        if self.move_requests.replayed(request.mac, now):
            return "a replay of a request already taken"
        self.move_requests.take(request.mac, now)
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

        expected = self._move_mac(
            request.pe_identifier,
            name,
            request.target_pe,
            request.migration,
            request.issued_s,
        )
        if not hmac.compare_digest(request.mac, expected):
            return refused(
                S.ResultCode.INVALID_REQUEST, "not signed with the pool secret"
            )
        if self.access is not None and not self.settings.secret:
            # a MAC proves the leader only with a pool secret; without one anyone could
            # stop VMs by "moving" them
            return refused(
                S.ResultCode.NOT_AUTHORIZED,
                "moves need the pool secret while --pu-access is on",
            )
        if (stale := self._replayed(request)) is not None:
            return refused(S.ResultCode.INVALID_REQUEST, stale)
        if request.target_pe == me:
            return refused(S.ResultCode.INVALID_REQUEST, "the target is this PE")
        if self._session_of(name) is None:
            return refused(
                S.ResultCode.INVALID_REQUEST, f"{name} has no PU session here"
            )
        if self.moving:
            return refused(S.ResultCode.UNSPECIFIED, "another move is under way")
        how = await self._move_out(
            name, self._carried_cores(name), request.target_pe, request.migration
        )
        if how is None:
            return refused(S.ResultCode.UNSPECIFIED, f"{name} ended meanwhile")
        return S.MoveAnswer(
            me,
            name,
            S.ResultCode.MOVED,
            f"{how}, its PU sent to PE {hex_id(request.target_pe)}",
        )

    async def _lead(self, planner, pool: list) -> list[str]:
        """One rebalancing round, on the leader only: the PE with the lowest identifier
        in the registrar's answer (when it dies, the next lowest leads). It gathers every
        PE's VmReport, plans once the pool's set of VMs stayed the same for
        ``planner.quiet_rounds`` rounds (no start or stop meanwhile: while VMs keep
        coming the pool policy places them, and moves would be undone), and makes the
        moves one after another. Fires with the server IDs moved."""
        elements = {e.identifier: e for e in pool if isinstance(e, P.PoolElement)}
        me = self.settings.pe_identifier
        if (
            self.planning
            or self.peers is None
            or me not in elements
            or min(elements) != me
        ):
            return []
        self.planning = True
        try:
            others = {i: e for i, e in elements.items() if i != me}
            reports = await self._gather(others)
            if reports is None:
                return []
            vm_set = frozenset(vm.server_id for report in reports for vm in report.vms)
            self.quiet_rounds = (
                self.quiet_rounds + 1 if vm_set == self.planned_vm_set else 0
            )
            self.planned_vm_set = vm_set
            if self.quiet_rounds < planner.quiet_rounds:
                return []
            moves = planner.plan(
                [self._planned_pe(report, planner) for report in reports]
            )
            migration_targets = {
                report.pe_identifier: report.migration for report in reports
            }
            done = []
            for move in moves:
                if not await self._make_move(
                    move, others, migration_targets.get(move.target)
                ):
                    break  # the rest was planned on a pool that is not there: plan again next round
                done.append(move.server_id)
            return done
        finally:
            self.planning = False

    async def _gather(self, others: dict) -> list[S.VmReport] | None:
        """Every PE's VmReport, this one's first; None when one did not answer (its VMs
        and RAM unknown, no plan is safe)."""
        assert self.peers is not None  # _lead checked it
        asked = await defer.DeferredList(
            [self.peers.report(e) for e in others.values()], consumeErrors=True
        )
        reports = [self.vm_report()]
        for identifier, (ok, report) in zip(others, asked):
            if (
                not ok
                or not isinstance(report, S.VmReport)
                or report.pe_identifier != identifier
            ):
                log.info(
                    "no rebalancing plan now: PE {pe} did not report its VMs",
                    pe=hex_id(identifier),
                )
                return None
            reports.append(report)
        return reports

    def _planned_pe(self, report: S.VmReport, planner) -> PlannedPe:
        now = self.clock.seconds()

        def movable(vm: S.VmEntry) -> bool:
            recently = (
                now - self.moved_at.get(vm.server_id, float("-inf"))
                < planner.cooldown_s
            )
            return vm.movable and vm.samples >= planner.min_samples and not recently

        vms = tuple(
            PlannedVm(vm.server_id, vm.cpu_millicores / 1000, vm.ram_kb, movable(vm))
            for vm in report.vms
        )
        return PlannedPe(
            report.pe_identifier,
            report.cpus,
            report.free_ram_kb,
            vms,
            report.host_millicores / 1000,
        )

    async def _make_move(
        self, move: Move, others: dict, migration: S.MigrationTarget | None = None
    ) -> bool:
        """Ask the VM's PE to move it (live, to ``migration``, where the target takes
        live migrations), then wait until it runs on the target. False when the move
        was refused or did not arrive in time."""
        me = self.settings.pe_identifier
        issued = int(self.clock.seconds())
        mac = self._move_mac(me, move.server_id, move.target, migration, issued)
        assert self.peers is not None  # _lead checked it
        request = S.MoveRequest(me, move.server_id, move.target, mac, migration, issued)
        if move.source == me:
            answer = await self.move_on_request(request)
        else:
            answer = await self.peers.move(others[move.source], request)
        if not isinstance(answer, S.MoveAnswer) or not answer.moved:
            why = answer.reason if isinstance(answer, S.MoveAnswer) else "no answer"
            log.info(
                "planned move of {server} not made: {why}",
                server=move.server_id,
                why=why,
            )
            return False
        self.moved_at[move.server_id] = self.clock.seconds()
        log.info(
            "moving {server} from PE {source} to PE {target} (planned)",
            server=move.server_id,
            source=hex_id(move.source),
            target=hex_id(move.target),
        )
        deadline = self.clock.seconds() + self.MOVE_TIMEOUT_S
        while self.clock.seconds() < deadline:
            # Wait first: the PEs' load updates must reach the registrar before the next
            # move, or its answer to that VM's PU lacks the RAM this move just freed.
            await task.deferLater(self.clock, self.MOVE_POLL_S, lambda: None)
            report = (
                self.vm_report()
                if move.target == me
                else await self.peers.report(others[move.target])
            )
            if isinstance(report, S.VmReport) and any(
                vm.server_id == move.server_id and vm.movable for vm in report.vms
            ):
                return True
        log.warn(
            "{server} does not run on PE {target} after {s} s",
            server=move.server_id,
            target=hex_id(move.target),
            s=self.MOVE_TIMEOUT_S,
        )
        return False
