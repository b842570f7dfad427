"""Planned moves by live migration: the leader names the target's migration URI, the
source PE migrates, the target holds the arrived VM, the PU re-adopts it there with its
cookie. On a Clock, with in-memory hypervisors and a real VmKeeper."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from xenpool.interfaces import (
    NORMAL_STATES,
    PAUSED,
    RUNNING,
    SHUTOFF,
    ILiveMigration,
    MigrationUnsupported,
    NodeInfo,
)
from xenpool.pe.accounting import HostAccounting
from xenpool.pe.core import PeSettings, PoolElementCore
from xenpool.protocol import cookie as C
from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.pu.core import LOST, PuSettings, VmKeeper
from xenpool.testing import DomainTable, MemoryHypervisor, element
from xenpool.testing import RecordingFencer as Fencer
from xenpool_plugins.load import CpuLoad
from xenpool_plugins.rebalance import PlannedMoves

from .helpers import Session

MB = 1024
SECRET = b"pool secret"


@implementer(ILiveMigration)
class MigratingHypervisor(MemoryHypervisor):
    """A MemoryHypervisor that live-migrates to another one, found by its URI; it reports
    lifecycle events as libvirt does (the source sees PAUSED then SHUTOFF, the target RUNNING)."""

    def __init__(self, hosts: dict, uri: str, live_migration: bool = True) -> None:
        super().__init__()
        self.hosts, self.uri, self.live_migration = hosts, uri, live_migration
        hosts[uri] = self
        self.starts: list[str] = []
        self.watchers: list = []
        self.events = True  # False: the target sees no arrival event (polling drivers)
        self.outcome: defer.Deferred | None = (
            None  # set to hold a migration until it fires
        )
        self.fail_migration: str | None = None  # fail, the domain staying here
        self.lose_in_migration = False  # fail, the domain gone from here and not there

        self.domains = DomainTable()

    def start(self, spec):
        if spec.name in self.domains:  # as libvirt: never a second copy on one host
            return defer.fail(RuntimeError(f"a domain {spec.name} exists"))
        self.starts.append(spec.name)
        return super().start(spec)

    def watch(self, callback):
        self.watchers.append(callback)

    def _event(self, name, state):
        if self.events:
            for callback in self.watchers:
                callback(name, state)

    def migrate(self, name, destination_uri):
        if not self.live_migration:
            return defer.fail(
                MigrationUnsupported(
                    "this function is not supported by the connection driver"
                )
            )
        self._event(name, PAUSED)
        if self.outcome is None:
            return self._finish(name, destination_uri)
        return self.outcome.addCallback(lambda _: self._finish(name, destination_uri))

    def _finish(self, name, destination_uri):
        if self.fail_migration:
            self._event(name, RUNNING)  # libvirt resumes it here
            raise RuntimeError(self.fail_migration)
        domain = self.domains.pop(name)
        self._event(name, SHUTOFF)
        if self.lose_in_migration:
            raise RuntimeError("the connection to the destination broke")
        target = self.hosts[destination_uri]
        target.domains[name] = domain  # the same domain: no start there
        target._event(name, RUNNING)


class Pe2Pe:
    """PeerAsker and ClaimAsker over in-memory cores (through the codec, as on a wire)."""

    def __init__(self, cores: dict) -> None:
        self.cores = cores
        self.requests: list = []

    def _ask(self, identifier, message):
        answers = Session()
        self.requests.append(message)
        self.cores[identifier].handle(S.decode(S.encode(message)), answers)
        return defer.succeed(answers.sent[0] if answers.sent else None)

    def report(self, el):
        return self._ask(el.identifier, S.VmQuery(0))

    def move(self, el, request):
        return self._ask(el.identifier, request)

    def claims_for(self, me):
        peers = self

        class Claims:
            def ask(self, query, also=frozenset()):
                answers = [peers._ask(i, query).result for i in peers.cores if i != me]
                return defer.succeed([a for a in answers if a is not None])

        return Claims()


class PuLink:
    """The keeper's PoolAccess: resolves to the cores, and connects in memory."""

    def __init__(self, cores: dict) -> None:
        self.cores = cores
        self.unreachable: list[int] = []

    def resolve(self, pool_handle, items, ram_mb=None):
        return defer.succeed([element(i) for i in sorted(self.cores)])

    def connect(self, el, deliver):
        core = self.cores[el.identifier]

        class PeSide:
            open = True

            def send(self, message):
                if self.open:
                    deliver(message)

            def close(self):
                if self.open:
                    self.open = False
                    deliver(LOST)

        pe_side = PeSide()

        class PuSide:
            def send(self, message):
                if pe_side.open:
                    core.handle(message, pe_side)

            def close(self):
                if pe_side.open:
                    pe_side.open = False
                    core.session_lost(pe_side)

        return defer.succeed(PuSide())

    def report_unreachable(self, pool_handle, identifier):
        self.unreachable.append(identifier)


@pytest.fixture
def pool():
    """Two live-migrating PEs with a fencer each, and a keeper per VM: "a" and "b" busy on
    PE 2, "c" idle on PE 1. PE 1 leads (lowest identifier): it plans "b" to itself, and
    asks PE 2 over the (in-memory) wire to move it."""
    clock = Clock()
    hosts: dict = {}
    cores: dict = {}
    fencer = Fencer()
    for n in (1, 2):
        uri = f"qemu+tcp://host{n}/system"
        core = PoolElementCore(
            PeSettings(
                pe_identifier=n, host=f"host{n}", secret=SECRET, migration_uri=uri
            ),
            MigratingHypervisor(hosts, uri),
            HostAccounting(NodeInfo(f"host{n}", 2, 1024 * MB)),
            CpuLoad(),
            clock,
            fencer=fencer,
        )
        core.hypervisor.watch(core.domain_event)
        core.events_live = True
        cores[n] = core
    wire = Pe2Pe(cores)
    for n, core in cores.items():
        core.peers, core.claims = wire, wire.claims_for(n)
    link = PuLink(cores)
    keepers = {}
    for name, share, pe in (("a", 0.4, 2), ("b", 0.3, 2), ("c", 0.05, 1)):
        link.cores = {
            pe: cores[pe]
        }  # the registrar's answer puts each VM where planned
        k = VmKeeper(
            S.CreateServer(name, f"nbd://san/{name}", (), 64),
            link,
            clock,
            PuSettings(heartbeat_interval_s=1, heartbeat_timeout_s=3),
        )
        k.run()
        keepers[name] = k
        (
            cores[pe].accounting.vms[name].cpu_share,
            cores[pe].accounting.vms[name].samples,
        ) = share, 10
    link.cores = cores

    class Pool:
        pass

    p = Pool()
    p.clock, p.cores, p.wire, p.link, p.keepers, p.fencer = (
        clock,
        cores,
        wire,
        link,
        keepers,
        fencer,
    )
    p.source, p.target = cores[2].hypervisor, cores[1].hypervisor
    return p


def lead(pool) -> list:
    moved = []
    pool.cores[1].rebalance(
        PlannedMoves(quiet_rounds=0), [element(1), element(2)]
    ).addCallback(moved.append)
    return moved


def everywhere(pool, name) -> list[int]:
    """The PEs whose hypervisor runs ``name`` (exactly one, always)."""
    return [n for n, core in pool.cores.items() if name in core.hypervisor.domains]


def test_a_planned_move_live_migrates_and_the_keeper_re_adopts_the_vm_on_the_target(
    pool,
):
    spec = pool.source.domains["b"]["spec"]
    moved = lead(pool)
    request = next(m for m in pool.wire.requests if isinstance(m, S.MoveRequest))
    assert request.migration == S.MigrationTarget(
        "host1", "qemu+tcp://host1/system"
    )  # the target's own
    assert everywhere(pool, "b") == [1] and pool.target.domains["b"]["spec"] is spec
    assert pool.target.starts == [
        "c"
    ]  # never started there: the same domain, still running
    keeper = pool.keepers["b"]
    assert (
        keeper.pe.identifier == 1
        and keeper.state.value == "running"
        and keeper.moves == 1
    )
    assert (
        keeper.failovers == 0
        and pool.link.unreachable == []
        and pool.fencer.fenced == []
    )
    state = C.peek(keeper.cookie)
    assert (state.pe_identifier, state.host, state.running, state.disk) == (
        1,
        "host1",
        True,
        "nbd://san/b",
    )
    assert (
        "b" not in pool.cores[2].accounting.vms and "b" in pool.cores[1].accounting.vms
    )
    pool.clock.advance(pool.cores[1].MOVE_POLL_S)
    assert moved == [["b"]]  # the leader saw it run (with its PU) on the target
    pool.clock.advance(3600)  # long after any lease: still held, still once
    assert everywhere(pool, "b") == [1] and keeper.state.value == "running"


def test_the_pu_told_before_the_target_saw_the_vm_arrive_is_not_refused(pool):
    pool.target.events = (
        False  # no lifecycle event: the target learns of it from the cookie
    )
    lead(pool)
    keeper = pool.keepers["b"]
    assert keeper.pe.identifier == 1 and keeper.state.value == "running"
    assert (
        everywhere(pool, "b") == [1]
        and pool.target.starts == ["c"]
        and pool.fencer.fenced == []
    )


def test_during_the_migration_the_vm_keeps_its_session_and_heartbeats_say_running(pool):
    pool.source.outcome = defer.Deferred()
    lead(pool)
    keeper = pool.keepers["b"]
    pool.source._event("b", SHUTOFF)  # libvirt's event as the source copy ends
    pool.clock.advance(2)  # heartbeats meanwhile
    assert (
        keeper.pe.identifier == 2
        and keeper.state.value == "running"
        and keeper.domain_state in NORMAL_STATES
    )
    pool.source._event("b", RUNNING)
    pool.source.outcome.callback(None)
    assert (
        keeper.pe.identifier == 1
        and everywhere(pool, "b") == [1]
        and pool.target.starts == ["c"]
    )


def test_a_failed_migration_falls_back_to_stop_and_restart(pool):
    pool.source.fail_migration = "migration job: unexpectedly failed"
    moved = lead(pool)
    keeper = pool.keepers["b"]
    assert everywhere(pool, "b") == [1] and pool.target.starts == [
        "c",
        "b",
    ]  # restarted there
    assert (
        keeper.pe.identifier == 1
        and keeper.state.value == "running"
        and pool.fencer.fenced == []
    )
    assert C.peek(keeper.cookie).pe_identifier == 1
    pool.clock.advance(pool.cores[1].MOVE_POLL_S)
    assert moved == [["b"]]


def test_a_vm_lost_in_a_failed_migration_is_started_on_the_target_once(pool):
    pool.source.lose_in_migration = True
    lead(pool)
    keeper = pool.keepers["b"]
    assert everywhere(pool, "b") == [1] and pool.target.starts == ["c", "b"]
    assert (
        keeper.pe.identifier == 1
        and keeper.state.value == "running"
        and pool.fencer.fenced == []
    )


@pytest.mark.parametrize("where", ["source", "target"])
def test_without_live_migration_at_either_end_the_move_stops_and_restarts(pool, where):
    if where == "source":
        pool.source.live_migration = (
            False  # the test driver: the request still names the target's URI
        )
    else:
        pool.cores[1].settings = PeSettings(
            pe_identifier=1, host="host1", secret=SECRET
        )  # no --migration-uri
    lead(pool)
    request = next(m for m in pool.wire.requests if isinstance(m, S.MoveRequest))
    assert (request.migration is None) == (where == "target")
    assert everywhere(pool, "b") == [1] and pool.target.starts == ["c", "b"]
    assert pool.keepers["b"].pe.identifier == 1 and pool.fencer.fenced == []


def test_a_hypervisor_that_refuses_migration_falls_back(pool):
    pool.source.migrate = lambda name, uri: defer.fail(
        MigrationUnsupported("argument unsupported: p2p migration")
    )
    lead(pool)
    assert everywhere(pool, "b") == [1] and pool.target.starts == ["c", "b"]


def test_a_migration_target_changed_on_the_way_breaks_the_mac(pool):
    target = S.MigrationTarget("host1", "qemu+tcp://host1/system")
    mac = S.move_request_mac(SECRET, 1, "b", 1, target)
    forged = S.MoveRequest(
        1, "b", 1, mac, S.MigrationTarget("evil", "qemu+tcp://evil/system")
    )
    answer = defer.Deferred.fromCoroutine(pool.cores[2].move_on_request(forged))
    assert answer.result.reason == "not signed with the pool secret" and everywhere(
        pool, "b"
    ) == [2]
    signed = S.MoveRequest(1, "b", 1, mac, target)
    assert defer.Deferred.fromCoroutine(
        pool.cores[2].move_on_request(signed)
    ).result.moved and everywhere(pool, "b") == [1]


def test_a_cookie_naming_this_pe_for_a_vm_it_does_not_run_starts_it_without_fencing(
    pool,
):
    """A live-migration cookie whose VM is nowhere (or a PE restarted since): started here."""
    state = C.SessionState(
        b"Xen", "d", "", (), 64, 1, True, "host1", 1, pool.clock.seconds()
    )
    session = Session()
    pool.cores[1].handle(M.CookieEcho(C.seal(state, SECRET)), session)
    assert (
        session.results()[-1].ok
        and pool.target.starts == ["c", "d"]
        and pool.fencer.fenced == []
    )
