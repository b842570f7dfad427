"""Rebalancing after start: the hot-cold rebalancer, the PE's planned move, the PU following it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from xenpool.interfaces import LoadSample, PoolMember
from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol import session as S
from xenpool.sim.run import Simulation
from xenpool.testing import ScriptedPE
from xenpool.testing import ScriptedPool as Pool
from xenpool_plugins.load import CpuLoad
from xenpool_plugins.rebalance import GapFit, HotToCold

from .helpers import Session, create, keeper

SAMPLE = LoadSample(cpu=0.9, ram=0.5, vm_cpu={"small": 0.1, "medium": 0.3, "big": 0.5})


def answer(*others: float) -> list[P.PoolElement]:
    """A registrar's resolution answer: the PE under test (7, whose own load counts, not
    the one listed), then PEs 8, 9, ... at ``others`` loads."""

    def policy(load: float) -> P.PoolPolicy:
        return P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=P.load_to_wire(load))

    transport = P.TcpTransport(1, ("10.0.0.1",))
    return [
        P.PoolElement(i, 0, 1000, transport, policy(load))
        for i, load in enumerate((0.5, *others), 7)
    ]


@pytest.mark.parametrize(
    "pool, expected",
    [
        (
            [0.9, 0.5, 0.4, 0.4],
            "medium",
        ),  # mean 0.55: without medium this PE is at 0.6, the closest
        ([0.9, 0.8, 0.85, 0.9], None),  # mean 0.86: within the threshold
        ([0.9, 0.95, 0.2, 0.3], None),  # not the hottest: the hottest moves first
        ([0.9, 0.85], None),  # any move would make the other PE the hottest
    ],
)
def test_hot_cold_choice(pool, expected):
    members = [PoolMember(load, own=i == 0) for i, load in enumerate(pool)]
    assert (
        HotToCold(threshold=0.05).choose(SAMPLE, {}, members, CpuLoad(), 1024 * 1024)
        == expected
    )


def test_hot_cold_checks_its_threshold():
    with pytest.raises(ValueError, match="threshold"):
        HotToCold(threshold=2)
    assert "hot-cold" in load_plugins().names("rebalancer")


def test_the_pe_moves_a_measured_vm_as_a_planned_failover(pe, clock):
    session = create(pe, "web1", 300)
    other = create(pe, "web2", 64)
    for name, share in (("web1", 0.6), ("web2", 0.1)):
        pe.accounting.vms[name].cpu_share, pe.accounting.vms[name].samples = share, 5
    moved = []
    pe.rebalance(HotToCold(), answer(0.0, 0.0, 0.0, 0.0)).addCallback(moved.append)
    assert moved == ["web1"] and pe.moves == 1
    cookie = [m for m in session.sent if isinstance(m, M.Cookie)][-1]
    assert session.sent[-1] == S.StopResult(
        "web1", S.ResultCode.MOVED, "stopped on pe1 to even out the pool"
    )
    assert (
        session.closed
        and "web1" not in pe.hypervisor.domains
        and "web2" in pe.hypervisor.domains
    )
    from xenpool.protocol import cookie as C

    assert C.peek(cookie.cookie).running is False  # the next PE fences no one
    moved.clear()
    pe.rebalance(HotToCold(), answer(0.0, 0.0)).addCallback(moved.append)
    assert moved == [None]  # the cooldown: let the pool see the effect first
    assert not other.closed


def test_the_pu_follows_a_move_without_reporting_the_pe():
    clock = Clock()
    first, second = ScriptedPE(1), ScriptedPE(2)
    pool = Pool(clock, first, second)
    k = keeper(clock, pool)
    k.run()
    first.deliver(M.Cookie(b"cookie from 1, not running"))
    first.deliver(
        S.StopResult("web1", S.ResultCode.MOVED, "stopped on pe1 to even out the pool")
    )
    first.die()
    clock.advance(1)
    assert k.pe.identifier == 2 and k.moves == 1 and k.failovers == 0
    assert second.received[0] == M.CookieEcho(b"cookie from 1, not running")
    assert pool.unreachable == []  # a planned move is not a failure


def test_the_simulator_counts_moves():
    scenario = json.loads(
        (
            Path(__file__).resolve().parents[1]
            / "scenarios"
            / "thesis-mixed-order.json"
        ).read_text()
    )
    result = Simulation(
        scenario,
        load_plugins(),
        load_plugin="weighted",
        policy=None,
        seed=0,
        rebalance="hot-cold",
    ).run()
    assert result.moves > 0 and result.not_started == 0
    placed = [vm for pe in result.per_pe for vm in pe["vms"]]
    assert (
        len(placed) == len(set(placed)) == 40
    )  # every VM runs exactly once after the moves


@pytest.mark.slow
@pytest.mark.parametrize("rebalancer", ["hot-cold", "gap-fit", "plan"])
def test_a_pe_daemon_moves_a_vm_to_a_new_empty_pe(tmp_path, rebalancer):
    """Real processes: four VMs on the only PE; a second PE joins; the first moves one VM
    there as a planned failover (no fence), and every VM runs exactly once. With ``plan``
    the first PE leads (lowest identifier), asks the second for its VMs over TCP, moves
    two VMs with the second as their named target, and the keeper follows to it."""
    import urllib.request

    from .daemons import Daemon, free_port

    etc = Path(__file__).resolve().parents[1] / "etc" / "xenpool"
    (tmp_path / "vms.conf").write_text(
        "".join(f"[vm vm{i}]\nram = 150\n" for i in range(1, 5))
    )
    asap = free_port()
    daemons = [
        Daemon(
            "xenpool-registrar",
            f"--asap=tcp:{asap}:interface=127.0.0.1",
            ready="started",
            cwd=tmp_path,
        )
    ]

    def start_pe(n: int) -> Daemon:
        status = free_port()
        pe = Daemon(
            "xenpool-pe",
            f"--registrar=tcp:host=127.0.0.1:port={asap}",
            f"--pe-id={n}",
            f"--port={free_port()}",
            "--bind=127.0.0.1",
            f"--host=host{n}",
            f"--libvirt-uri=test://{etc / f'node-host{n}.xml'}",
            f"--status=tcp:{status}:interface=127.0.0.1",
            "--load-plugin=max",
            f"--rebalance={rebalancer}",
            "--rebalance-interval=0.5",
            ready="registered in pool Xen",
            cwd=tmp_path,
        )
        pe.status_port = status
        daemons.append(pe)
        return pe

    def domains(pe: Daemon) -> set[str]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{pe.status_port}/status", timeout=10
        ) as response:
            return set(json.load(response)["domains"])

    try:
        first = start_pe(1)
        keeper = Daemon(
            "xenpool-pu",
            f"--keep={tmp_path / 'vms.conf'}",
            f"--registrar=127.0.0.1:{asap}",
            f"--state-dir={tmp_path / 'keeper'}",
            "--heartbeat-interval=0.2",
            ready="vm4: running",
            cwd=tmp_path,
        )
        daemons.append(keeper)
        for i in range(1, 5):
            keeper.wait_for(f"vm{i}: running: on PE 0x00000001")
        second = start_pe(2)
        first.wait_for("to even out the pool")
        if rebalancer == "plan":
            for daemon, text in (
                (first, "from PE 0x00000001 to PE 0x00000002 (planned)"),
                (keeper, "moved off PE 0x00000001 to PE 0x00000002"),
                (keeper, ": running: on PE 0x00000002"),
            ):
                daemon.wait_for(text)
                daemon.wait_for(
                    text, since=daemon.log.index(text) + len(text)
                )  # the second move
            expected_on_second = 2  # four equal VMs: two each
        else:
            keeper.wait_for("moved off PE 0x00000001")
            keeper.wait_for(": running: on PE 0x00000002")
            expected_on_second = 1
        on_first, on_second = domains(first), domains(second)
        assert len(on_second) == expected_on_second
        assert (
            on_first | on_second == {"vm1", "vm2", "vm3", "vm4"}
            and not on_first & on_second
        )
        assert "fenced" not in second.drain()  # a planned move fences no one
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


MB = 1024
RAM = {"small": 64 * MB, "medium": 150 * MB, "big": 64 * MB, "fat": 300 * MB}


def pool(own_load, *others, own_free_mb=None):
    """PoolMembers: this PE first, then (load, free MB) of the others."""
    own = PoolMember(
        own_load, None if own_free_mb is None else own_free_mb * MB, own=True
    )
    return [own, *(PoolMember(load, free * MB) for load, free in others)]


@pytest.mark.parametrize(
    "others, expected",
    [
        # mean 0.65; the coldest (0.4) is 0.5 below: "medium" (0.3) evens both ends best
        ([(0.4, 500), (0.65, 500), (0.65, 500)], "medium"),
        # the coldest has no RAM for "medium"; the next coldest (0.6) only fits "small"
        ([(0.4, 100), (0.6, 500), (0.75, 500)], "small"),
        # everyone within reach of the mean: no move gains min_gain
        ([(0.88, 500), (0.9, 500), (0.92, 500)], None),
    ],
)
def test_gap_fit_moves_the_vm_that_best_fills_the_gap_where_it_fits(others, expected):
    assert (
        GapFit(room_mb=0).choose(SAMPLE, RAM, pool(0.9, *others), CpuLoad(), 1024 * MB)
        == expected
    )


def test_gap_fit_does_not_move_back_and_forth():
    # Two PEs at 0.9 and 0.4: "big" (0.6) would only make the other PE the hot one;
    # "medium" (0.3) leaves 0.6 / 0.7.
    sample = LoadSample(cpu=0.9, ram=0.5, vm_cpu={"medium": 0.3, "big": 0.6})
    assert (
        GapFit(room_mb=0).choose(
            sample, RAM, pool(0.9, (0.4, 500)), CpuLoad(), 1024 * MB
        )
        == "medium"
    )
    # On the receiver afterwards nothing goes back: every move would widen the gap again.
    back = LoadSample(cpu=0.7, ram=0.5, vm_cpu={"medium": 0.3, "other": 0.4})
    assert (
        GapFit(room_mb=0).choose(back, RAM, pool(0.7, (0.6, 500)), CpuLoad(), 1024 * MB)
        is None
    )


def test_gap_fit_makes_room_on_a_cold_pe_whose_ram_is_full():
    # This PE is the coldest but has 40 MB free: no VM from the hot PE fits here. It moves
    # "fat" (300 MB, little CPU) to the PE with RAM for it, so the hot PE can then send here.
    cold = LoadSample(cpu=0.3, ram=0.9, vm_cpu={"fat": 0.08, "medium": 0.2})
    members = pool(0.3, (1.0, 600), (0.7, 600), own_free_mb=40)
    assert GapFit(room_mb=160).choose(cold, RAM, members, CpuLoad(), 1024 * MB) == "fat"
    assert (
        GapFit(room_mb=0).choose(cold, RAM, members, CpuLoad(), 1024 * MB) is None
    )  # the rule switched off
    roomy = pool(0.3, (1.0, 600), (0.7, 600), own_free_mb=400)
    assert (
        GapFit(room_mb=160).choose(cold, RAM, roomy, CpuLoad(), 1024 * MB) is None
    )  # room enough already


def test_gap_fit_checks_its_options():
    for bad in ({"min_gain": 0}, {"min_samples": 0}, {"cooldown_s": -1}):
        with pytest.raises(ValueError):
            GapFit(**bad)
    assert "gap-fit" in load_plugins().names("rebalancer")


def test_the_pe_waits_until_the_pool_has_settled(pe, clock):
    """No move while the pool's summed load still changes (VMs being started): the pool
    policy is placing them; a move then would undo its work."""
    create(pe, "web1", 300)
    create(pe, "web2", 64)
    for name, share in (("web1", 0.6), ("web2", 0.1)):
        pe.accounting.vms[name].cpu_share, pe.accounting.vms[name].samples = share, 5
    rebalancer = GapFit(room_mb=0)
    moved = []
    pe.rebalance(rebalancer, answer(0.0, 0.0)).addCallback(moved.append)
    assert moved == [None]  # the first look: nothing to compare with yet
    pe.rebalance(rebalancer, answer(0.3, 0.0)).addCallback(moved.append)
    assert moved == [None, None]  # the pool's load changed by 0.3: a start somewhere
    pe.rebalance(rebalancer, answer(0.3, 0.0)).addCallback(moved.append)
    assert moved == [None, None, "web1"]


def test_a_moved_vm_carries_the_cpu_it_used_to_the_next_pe(pe, clock):
    from xenpool.protocol import cookie as C

    session = create(pe, "web1", 300)
    create(pe, "web2", 64)
    pe.accounting.vms["web1"].cpu_share, pe.accounting.vms["web1"].samples = 0.6, 5
    pe.accounting.vms["web2"].cpu_share, pe.accounting.vms["web2"].samples = 0.1, 5
    pe.rebalance(HotToCold(), answer(0.0, 0.0, 0.0, 0.0))
    cookie = [m for m in session.sent if isinstance(m, M.Cookie)][-1]
    cores = C.peek(cookie.cookie).cpu_cores
    assert cores == pytest.approx(0.6 * pe.accounting.node.cpus, abs=0.01)
    # the next PE books it at that, not at its RAM share (300 MB of the host)
    pe.accounting.reserve("web1", 300, cores / pe.accounting.node.cpus)
    assert pe.accounting.vms["web1"].cpu_share == pytest.approx(0.6, abs=0.01)
    pe.accounting.reserve("web3", 300)
    assert pe.accounting.vms["web3"].cpu_share == pytest.approx(
        300 * 1024 / pe.accounting.node.ram_kb
    )


def test_the_window_share_is_free_of_the_start_estimate():
    from xenpool.interfaces import NodeInfo
    from xenpool.pe.accounting import HostAccounting, LoadSettings

    accounting = HostAccounting(
        NodeInfo("h", 2, 1024 * MB), LoadSettings(window_samples=4)
    )
    accounting.reserve("vm", 64)  # estimated at 64/1024 of the host
    for i in range(6):  # it uses 0.5 of one core: 0.25 of the host
        accounting.sample_vm("vm", int(i * 30 * 0.5e9), i * 30.0)
    assert accounting.window_share("vm") == pytest.approx(0.25)
    assert (
        accounting.vms["vm"].cpu_share < 0.24
    )  # the smoothed share still remembers 64/1024
    assert len(accounting.vms["vm"].history) == 5


def test_counting_cpu_wait_measures_what_a_vm_wants():
    from xenpool.interfaces import NodeInfo
    from xenpool.pe.accounting import HostAccounting, LoadSettings

    for count, expected in ((False, 0.25), (True, 0.5)):
        accounting = HostAccounting(
            NodeInfo("h", 2, 1024 * MB), LoadSettings(smoothing=0, count_cpu_wait=count)
        )
        accounting.reserve("vm", 64)
        accounting.sample_vm("vm", 0, 0.0, 0)
        accounting.sample_vm(
            "vm", int(15e9), 30.0, int(15e9)
        )  # got half a core, waited as long
        assert accounting.vms["vm"].cpu_share == pytest.approx(expected)


def test_gap_fit_evens_out_the_simulated_pool_and_keeps_by_type_order_even():
    scenarios = Path(__file__).resolve().parents[1] / "scenarios"
    options = {
        "load_plugin": "cpu",
        "policy": "LeastUsedFreeRAM",
        "seed": 3,
        "pe_overrides": {"count_cpu_wait": True},
        "rebalance_interval_s": 60.0,
    }
    mixed = json.loads((scenarios / "thesis-mixed-order.json").read_text())
    without = Simulation(mixed, load_plugins(), **options).run()
    result = Simulation(mixed, load_plugins(), rebalance="gap-fit", **options).run()
    assert (
        result.metric_percent < without.metric_percent / 2
        and result.ram_failed_starts == 0
    )
    assert 0 < result.moves <= 40 and result.not_started == 0
    again = Simulation(mixed, load_plugins(), rebalance="gap-fit", **options).run()
    assert again.samples_percent == result.samples_percent  # same seed, same run
    by_type = json.loads((scenarios / "thesis-by-type-order.json").read_text())
    assert (
        Simulation(by_type, load_plugins(), rebalance="gap-fit", **options)
        .run()
        .metric_percent
        < 1
    )


# ------------------------------------------------------------------ planned rebalancing (plan)

from xenpool.interfaces import Move, PlannedPe, PlannedVm  # noqa: E402
from xenpool_plugins.rebalance import PlannedMoves  # noqa: E402


def planned(identifier, *vms, free_mb=1000, cpus=2):
    """A PlannedPe; each VM as (name, cores, RAM MB) or (name, cores, RAM MB, movable)."""
    return PlannedPe(
        identifier,
        cpus,
        free_mb * MB,
        tuple(PlannedVm(v[0], v[1], v[2] * MB, *v[3:]) for v in vms),
    )


def test_plan_swaps_where_no_single_move_helps():
    # 1.2 and 1.0 cores on two 2-core PEs: any single move overshoots (0.3 / 0.8 at
    # best); exchanging a 0.6 for a 0.5 evens them exactly.
    pool = [
        planned(1, ("a", 0.6, 64), ("b", 0.6, 64)),
        planned(2, ("c", 0.5, 64), ("d", 0.5, 64)),
    ]
    assert PlannedMoves().plan(pool) == [Move("a", 1, 2), Move("c", 2, 1)]
    # 0.7 / 0.5: swapping a (0.8) for c (0.4) only mirrors the imbalance; a for d evens it
    pool = [
        planned(1, ("a", 0.8, 64), ("b", 0.6, 64)),
        planned(2, ("c", 0.4, 64), ("d", 0.6, 64)),
    ]
    assert PlannedMoves().plan(pool) == [Move("a", 1, 2), Move("d", 2, 1)]


def test_plan_keeps_ram_constraints_at_every_step():
    # The second swap above ("c" pinned), but PE 2 has no room for "a" (300 MB) before
    # "d" (150 MB) has left: d goes first.
    pool = [
        planned(1, ("a", 0.8, 300), ("b", 0.6, 64), free_mb=200),
        planned(2, ("c", 0.4, 64, False), ("d", 0.6, 150), free_mb=160),
    ]
    assert PlannedMoves().plan(pool) == [Move("d", 2, 1), Move("a", 1, 2)]
    # Neither end can take the other's VM first: no swap, and no single move fits either.
    tight = [
        planned(1, ("a", 0.8, 300), ("b", 0.6, 64), free_mb=10),
        planned(2, ("c", 0.4, 64), ("d", 0.6, 150), free_mb=10),
    ]
    assert PlannedMoves().plan(tight) == []


def test_plan_moves_the_vm_that_fills_the_gap_to_the_coldest_pe_with_room():
    pool = [
        planned(1, ("hot1", 0.9, 64), ("hot2", 0.9, 64), ("small", 0.2, 64)),  # 1.0
        planned(2, ("mid", 0.8, 64), free_mb=1000),  # 0.4
        planned(3, ("mid2", 0.8, 64), free_mb=30),  # 0.4, but no room for anything
    ]
    moves = PlannedMoves().plan(pool)
    assert moves[0] == Move("small", 1, 2) or moves[0].target == 2
    assert all(move.target != 3 for move in moves)  # PE 3 has no room


def test_plan_leaves_an_even_pool_alone_and_never_moves_what_may_not_move():
    even = [
        planned(1, ("a", 0.5, 64), ("b", 0.5, 64)),
        planned(2, ("c", 0.5, 64), ("d", 0.48, 64)),
    ]
    assert (
        PlannedMoves().plan(even) == []
    )  # a gain below min_gain is not worth a restart
    pinned = [
        planned(1, ("a", 0.8, 64, False), ("b", 0.6, 64, False)),
        planned(2, ("c", 0.4, 64), ("d", 0.6, 64)),
    ]
    assert all(move.server_id not in ("a", "b") for move in PlannedMoves().plan(pinned))


def test_plan_moves_each_vm_at_most_once_and_is_deterministic():
    pool = [
        planned(i, *((f"vm{i}-{k}", 0.1 * ((i * k) % 7 + 1), 64) for k in range(5)))
        for i in range(1, 6)
    ]
    moves = PlannedMoves().plan(pool)
    assert (
        moves
        and len({m.server_id for m in moves}) == len(moves) <= PlannedMoves().max_moves
    )
    assert PlannedMoves().plan(list(reversed(pool))) == moves


def test_plan_is_a_verified_rebalancer_plugin_with_checked_options():
    from zope.interface.verify import verifyObject

    from xenpool.interfaces import IPoolPlanner

    planner = load_plugins().create("rebalancer", "plan")
    assert (
        verifyObject(IPoolPlanner, planner)
        and planner.choose(SAMPLE, {}, [], CpuLoad(), 1) is None
    )
    for bad in (
        {"min_gain": 0},
        {"move_cost": 1},
        {"max_moves": 0},
        {"min_samples": 0},
        {"cooldown_s": -1},
    ):
        with pytest.raises(ValueError):
            PlannedMoves(**bad)


class Peers:
    """PeerAsker over in-memory PE cores (unit tests only); records what was asked."""

    def __init__(self, cores) -> None:
        self.cores = {core.settings.pe_identifier: core for core in cores}
        self.asked: list = []
        self.silent: set[int] = set()

    def _ask(self, element, message):
        from twisted.internet import defer

        self.asked.append((element.identifier, type(message).__name__))
        if element.identifier in self.silent:
            return defer.succeed(None)
        answers = Session()
        self.cores[element.identifier].handle(S.decode(S.encode(message)), answers)
        return defer.succeed(answers.sent[0] if answers.sent else None)

    def report(self, element):
        return self._ask(element, S.VmQuery(0))

    def move(self, element, request):
        return self._ask(element, request)


def _elements(*identifiers):
    from xenpool.testing import element

    return [element(i) for i in identifiers]


def _two_pes(clock, secret=b""):
    from xenpool.interfaces import NodeInfo
    from xenpool.pe.accounting import HostAccounting
    from xenpool.pe.core import PeSettings, PoolElementCore
    from xenpool.testing import MemoryHypervisor

    cores = [
        PoolElementCore(
            PeSettings(pe_identifier=n, host=f"host{n}", secret=secret),
            MemoryHypervisor(),
            HostAccounting(NodeInfo(f"host{n}", 2, 1024 * MB)),
            CpuLoad(),
            clock,
        )
        for n in (1, 2)
    ]
    peers = Peers(cores)
    for core in cores:
        core.peers = peers
    sessions = {}
    for name, share, core in (
        ("a", 0.4, cores[0]),
        ("b", 0.3, cores[0]),
        ("c", 0.05, cores[1]),
    ):
        sessions[name] = create(core, name, 64)
        core.accounting.vms[name].cpu_share, core.accounting.vms[name].samples = (
            share,
            10,
        )
    return cores, peers, sessions


def test_only_the_lowest_pe_identifier_leads(clock):
    cores, peers, _ = _two_pes(clock)
    moved = []
    cores[1].rebalance(PlannedMoves(quiet_rounds=0), _elements(1, 2)).addCallback(
        moved.append
    )
    assert moved == [[]] and peers.asked == []  # PE 2 is not the leader: it asks no one
    cores[0].rebalance(PlannedMoves(quiet_rounds=0), _elements(2)).addCallback(
        moved.append
    )
    assert (
        moved == [[], []] and peers.asked == []
    )  # not in the registrar's answer: not the leader either
    cores[1].rebalance(PlannedMoves(quiet_rounds=0), _elements(2, 3)).addCallback(
        moved.append
    )
    assert peers.asked == [
        (3, "VmQuery")
    ]  # PE 1 gone: PE 2 leads (PE 3 does not answer here)


def test_the_leader_moves_a_vm_to_the_planned_target_and_waits_for_it(clock):
    from xenpool.protocol import cookie as C

    cores, peers, sessions = _two_pes(clock)
    planner = PlannedMoves(quiet_rounds=1)
    moved = []
    cores[0].rebalance(planner, _elements(1, 2)).addCallback(moved.append)
    assert moved == [[]] and peers.asked == [
        (2, "VmQuery")
    ]  # the first look: were VMs still starting?
    cores[0].rebalance(planner, _elements(1, 2)).addCallback(moved.append)
    # loads 0.7 / 0.05: moving "b" (0.6 cores) gives 0.4 / 0.35; "a" (0.8) would overshoot
    stop = sessions["b"].sent[-1]
    assert stop == S.StopResult(
        "b", S.ResultCode.MOVED, "stopped on host1 to even out the pool", target_pe=2
    )
    assert (
        C.peek(
            [m for m in sessions["b"].sent if isinstance(m, M.Cookie)][-1].cookie
        ).running
        is False
    )
    assert (
        "b" not in cores[0].hypervisor.domains and len(moved) == 1
    )  # waiting for "b" to run on PE 2
    create(cores[1], "b", 64)  # its PU arrives there
    clock.advance(cores[0].MOVE_POLL_S)
    assert (
        moved == [[], ["b"]]
        and cores[0].moved_at == {"b": 0.0}
        and not sessions["a"].closed
    )


def test_a_move_that_does_not_arrive_in_time_is_not_counted(clock):
    cores, peers, sessions = _two_pes(clock)
    moved = []
    cores[0].rebalance(PlannedMoves(quiet_rounds=0), _elements(1, 2)).addCallback(
        moved.append
    )
    clock.pump([cores[0].MOVE_POLL_S] * int(cores[0].MOVE_TIMEOUT_S + 2))
    assert (
        moved == [[]] and "b" not in cores[1].hypervisor.domains
    )  # "b" never ran on PE 2: the leader gave up


def test_the_leader_does_not_plan_without_every_pe_report(clock):
    cores, peers, sessions = _two_pes(clock)
    peers.silent.add(2)
    moved = []
    cores[0].rebalance(PlannedMoves(quiet_rounds=0), _elements(1, 2)).addCallback(
        moved.append
    )
    assert moved == [[]] and "a" in cores[0].hypervisor.domains


@pytest.mark.parametrize(
    "request_, reason",
    [
        (S.MoveRequest(1, "nosuch", 1), "nosuch has no PU session here"),
        (S.MoveRequest(1, "c", 2), "the target is this PE"),
        (S.MoveRequest(1, "c", 1, b"x" * 32), "not signed with the pool secret"),
    ],
)
def test_a_pe_refuses_moves_it_cannot_or_may_not_make(clock, request_, reason):
    cores, _, sessions = _two_pes(clock)
    answer = Session()
    cores[1].handle(request_, answer)
    assert (
        answer.sent
        == [S.MoveAnswer(2, request_.server_id, S.ResultCode.INVALID_REQUEST, reason)]
        and answer.closed
    )
    assert "c" in cores[1].hypervisor.domains and not sessions["c"].closed


def test_with_a_pool_secret_a_move_needs_its_mac(clock):
    cores, _, sessions = _two_pes(clock, secret=b"s3cret")
    answer = Session()
    cores[1].handle(S.MoveRequest(1, "c", 1), answer)
    assert (
        answer.sent[0].reason == "not signed with the pool secret"
        and "c" in cores[1].hypervisor.domains
    )
    signed = S.MoveRequest(1, "c", 1, S.move_request_mac(b"s3cret", 1, "c", 1))
    cores[1].handle(signed, answer)
    assert answer.sent[1].moved and sessions["c"].sent[-1].target_pe == 1


def test_a_signed_move_is_taken_once_and_only_while_fresh(clock):
    cores, _, sessions = _two_pes(clock, secret=b"s3cret")
    clock.advance(1000)

    def signed(issued: int) -> S.MoveRequest:
        return S.MoveRequest(
            1,
            "c",
            1,
            S.move_request_mac(b"s3cret", 1, "c", 1, None, issued),
            None,
            issued,
        )

    for issued, why in (
        (1000 - 61, "issued 61 s from now"),
        (1000 + 61, "issued -61 s from now"),
    ):
        answer = Session()
        cores[1].handle(signed(issued), answer)
        assert (
            answer.sent[0].reason.startswith(why) and "c" in cores[1].hypervisor.domains
        )
    fresh, answer = signed(1000 - 5), Session()
    cores[1].handle(fresh, answer)
    assert answer.sent[0].moved
    replay = Session()
    cores[1].handle(fresh, replay)
    assert replay.sent[0].reason == "a replay of a request already taken"
    assert cores[
        1
    ].move_requests.taken  # remembered until it could no longer pass the age check
    clock.advance(121)
    cores[1]._replayed(signed(int(clock.seconds())))
    assert list(cores[1].move_requests.taken) == [
        signed(int(clock.seconds())).mac
    ]  # the old one is forgotten


def test_the_vm_report_lists_demand_ram_and_what_may_move(clock):
    cores, _, _ = _two_pes(clock)
    answer = Session()
    cores[0].handle(S.VmQuery(2), answer)
    report = answer.sent[0]
    assert report == S.VmReport(
        1,
        2,
        1024 * MB,
        cores[0].accounting.free_kb,
        0,
        (
            S.VmEntry("a", 64 * MB, 800, 10, True),
            S.VmEntry("b", 64 * MB, 600, 10, True),
        ),
    )
    assert answer.closed


def test_the_pu_goes_to_the_planned_target_first():
    clock = Clock()
    first, second, third = ScriptedPE(1), ScriptedPE(2), ScriptedPE(3)
    k = keeper(clock, Pool(clock, first, second, third))
    k.run()
    first.deliver(S.StopResult("web1", S.ResultCode.MOVED, "planned", target_pe=3))
    first.die()
    assert k.pe.identifier == 3 and k.moves == 1 and second.received == []
    assert any("to PE 0x00000003" in why for _, why in k.history)


def test_a_refused_target_falls_back_to_the_pool_policy():
    clock = Clock()
    first, second, third = (
        ScriptedPE(1),
        ScriptedPE(2),
        ScriptedPE(3, refuse=S.ResultCode.NO_RAM),
    )
    k = keeper(clock, Pool(clock, first, second, third))
    k.run()
    first.deliver(S.StopResult("web1", S.ResultCode.MOVED, "planned", target_pe=3))
    first.die()
    assert (
        len(third.received) == 1 and k.pe.identifier == 2 and k.state.value == "running"
    )


def test_plan_evens_out_the_simulated_pool_with_few_moves_and_keeps_by_type_order():
    scenarios = Path(__file__).resolve().parents[1] / "scenarios"
    options = {
        "load_plugin": "cpu",
        "policy": "LeastUsedFreeRAM",
        "seed": 3,
        "pe_overrides": {"count_cpu_wait": True},
        "rebalance_interval_s": 60.0,
    }
    mixed = json.loads((scenarios / "thesis-mixed-order.json").read_text())
    result = Simulation(mixed, load_plugins(), rebalance="plan", **options).run()
    assert (
        result.settled_metric_percent <= 2
        and result.ram_failed_starts == 0
        and result.not_started == 0
    )
    assert 0 < result.moves <= 40  # at most one move per VM
    placed = [vm for pe in result.per_pe for vm in pe["vms"]]
    assert len(placed) == len(set(placed)) == 40
    again = Simulation(mixed, load_plugins(), rebalance="plan", **options).run()
    assert (
        again.samples_percent == result.samples_percent and again.moves == result.moves
    )
    by_type = json.loads((scenarios / "thesis-by-type-order.json").read_text())
    even = Simulation(by_type, load_plugins(), rebalance="plan", **options).run()
    assert even.metric_percent == 0 and even.moves == 0
