"""Rebalancing after start: the hot-cold rebalancer, the PE's planned move, the PU following it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from xenpool.interfaces import LoadSample, PoolMember
from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.sim.run import Simulation
from xenpool_plugins.load import CpuLoad
from xenpool_plugins.rebalance import GapFit, HotToCold

from .test_pe_core import Session, create
from .test_pe_core import pe as pe  # noqa: F401 - the fixture
from .test_pe_core import clock as clock  # noqa: F401 - the fixture
from .test_pu_core import Pool, ScriptedPE, keeper

SAMPLE = LoadSample(cpu=0.9, ram=0.5, vm_cpu={"small": 0.1, "medium": 0.3, "big": 0.5})


@pytest.mark.parametrize(
    "pool, expected",
    [
        ([0.9, 0.5, 0.4, 0.4], "medium"),  # mean 0.55: without medium this PE is at 0.6, the closest
        ([0.9, 0.8, 0.85, 0.9], None),  # mean 0.86: within the threshold
        ([0.9, 0.95, 0.2, 0.3], None),  # not the hottest: the hottest moves first
        ([0.9, 0.85], None),  # any move would make the other PE the hottest
    ],
)
def test_hot_cold_choice(pool, expected):
    members = [PoolMember(load, own=i == 0) for i, load in enumerate(pool)]
    assert HotToCold(threshold=0.05).choose(SAMPLE, {}, members, CpuLoad(), 1024 * 1024) == expected


def test_hot_cold_checks_its_threshold():
    with pytest.raises(ValueError, match="threshold"):
        HotToCold(threshold=2)
    assert "hot-cold" in load_plugins().names("rebalancer")


def test_the_pe_moves_a_measured_vm_as_a_planned_failover(pe, clock):  # noqa: F811
    session = create(pe, "web1", 300)
    other = create(pe, "web2", 64)
    for name, share in (("web1", 0.6), ("web2", 0.1)):
        pe.accounting.vms[name].cpu_share, pe.accounting.vms[name].samples = share, 5
    moved = []
    pe.rebalance(HotToCold(), [pe.load(), 0.0, 0.0, 0.0, 0.0]).addCallback(moved.append)
    assert moved == ["web1"] and pe.moves == 1
    cookie = [m for m in session.sent if isinstance(m, M.Cookie)][-1]
    assert session.sent[-1] == S.StopResult("web1", S.ResultCode.MOVED, "stopped on pe1 to even out the pool")
    assert session.closed and "web1" not in pe.hypervisor.domains and "web2" in pe.hypervisor.domains
    from xenpool.protocol import cookie as C

    assert C.peek(cookie.cookie).running is False  # the next PE fences no one
    moved.clear()
    pe.rebalance(HotToCold(), [1.0, 0.0, 0.0]).addCallback(moved.append)
    assert moved == [None]  # the cooldown: let the pool see the effect first
    assert not other.closed


def test_the_pu_follows_a_move_without_reporting_the_pe():
    clock = Clock()
    first, second = ScriptedPE(1), ScriptedPE(2)
    pool = Pool(clock, first, second)
    k = keeper(clock, pool)
    k.run()
    first.deliver(M.Cookie(b"cookie from 1, not running"))
    first.deliver(S.StopResult("web1", S.ResultCode.MOVED, "stopped on pe1 to even out the pool"))
    first.die()
    clock.advance(1)
    assert k.pe.identifier == 2 and k.moves == 1 and k.failovers == 0
    assert second.received[0] == M.CookieEcho(b"cookie from 1, not running")
    assert pool.unreachable == []  # a planned move is not a failure


def test_the_simulator_counts_moves():
    scenario = json.loads((Path(__file__).resolve().parents[1] / "scenarios" / "thesis-mixed-order.json").read_text())
    result = Simulation(scenario, load_plugins(), load_plugin="weighted", policy=None, seed=0, rebalance="hot-cold").run()
    assert result.moves > 0 and result.not_started == 0
    placed = [vm for pe in result.per_pe for vm in pe["vms"]]
    assert len(placed) == len(set(placed)) == 40  # every VM runs exactly once after the moves


@pytest.mark.slow
@pytest.mark.parametrize("rebalancer", ["hot-cold", "gap-fit"])
def test_a_pe_daemon_moves_a_vm_to_a_new_empty_pe(tmp_path, rebalancer):
    """Real processes: four VMs on the only PE; a second PE joins; the first moves one VM
    there as a planned failover (no fence), and every VM runs exactly once."""
    import urllib.request

    from .daemons import Daemon, free_port

    etc = Path(__file__).resolve().parents[1] / "etc" / "xenpool"
    (tmp_path / "vms.conf").write_text("".join(f"[vm vm{i}]\nram = 150\n" for i in range(1, 5)))
    asap = free_port()
    daemons = [Daemon("xenpool-registrar", f"--asap=tcp:{asap}:interface=127.0.0.1", ready="started", cwd=tmp_path)]

    def start_pe(n: int) -> Daemon:
        status = free_port()
        pe = Daemon(
            "xenpool-pe", f"--registrar=tcp:host=127.0.0.1:port={asap}", f"--pe-id={n}", f"--port={free_port()}",
            "--bind=127.0.0.1", f"--host=host{n}", f"--libvirt-uri=test://{etc / f'node-host{n}.xml'}",
            f"--status=tcp:{status}:interface=127.0.0.1", "--load-plugin=max", f"--rebalance={rebalancer}",
            "--rebalance-interval=0.5", ready="registered in pool Xen", cwd=tmp_path,
        )  # fmt: skip
        pe.status_port = status
        daemons.append(pe)
        return pe

    def domains(pe: Daemon) -> set[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{pe.status_port}/status", timeout=10) as response:
            return set(json.load(response)["domains"])

    try:
        first = start_pe(1)
        keeper = Daemon(
            "xenpool-pu", f"--keep={tmp_path / 'vms.conf'}", f"--registrar=127.0.0.1:{asap}",
            f"--state-dir={tmp_path / 'keeper'}", "--heartbeat-interval=0.2", ready="vm4: running", cwd=tmp_path,
        )  # fmt: skip
        daemons.append(keeper)
        for i in range(1, 5):
            keeper.wait_for(f"vm{i}: running: on PE 0x00000001")
        second = start_pe(2)
        first.wait_for("to even out the pool")
        keeper.wait_for("moved off PE 0x00000001")
        keeper.wait_for(": running: on PE 0x00000002")
        on_first, on_second = domains(first), domains(second)
        assert len(on_second) == 1 and on_first | on_second == {"vm1", "vm2", "vm3", "vm4"} and not on_first & on_second
        assert "fenced" not in second.drain()  # a planned move fences no one
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


MB = 1024
RAM = {"small": 64 * MB, "medium": 150 * MB, "big": 64 * MB, "fat": 300 * MB}


def pool(own_load, *others, own_free_mb=None):
    """PoolMembers: this PE first, then (load, free MB) of the others."""
    own = PoolMember(own_load, None if own_free_mb is None else own_free_mb * MB, own=True)
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
    assert GapFit(room_mb=0).choose(SAMPLE, RAM, pool(0.9, *others), CpuLoad(), 1024 * MB) == expected


def test_gap_fit_does_not_move_back_and_forth():
    # Two PEs at 0.9 and 0.4: "big" (0.6) would only make the other PE the hot one;
    # "medium" (0.3) leaves 0.6 / 0.7.
    sample = LoadSample(cpu=0.9, ram=0.5, vm_cpu={"medium": 0.3, "big": 0.6})
    assert GapFit(room_mb=0).choose(sample, RAM, pool(0.9, (0.4, 500)), CpuLoad(), 1024 * MB) == "medium"
    # On the receiver afterwards nothing goes back: every move would widen the gap again.
    back = LoadSample(cpu=0.7, ram=0.5, vm_cpu={"medium": 0.3, "other": 0.4})
    assert GapFit(room_mb=0).choose(back, RAM, pool(0.7, (0.6, 500)), CpuLoad(), 1024 * MB) is None


def test_gap_fit_makes_room_on_a_cold_pe_whose_ram_is_full():
    # This PE is the coldest but has 40 MB free: no VM from the hot PE fits here. It moves
    # "fat" (300 MB, little CPU) to the PE with RAM for it, so the hot PE can then send here.
    cold = LoadSample(cpu=0.3, ram=0.9, vm_cpu={"fat": 0.08, "medium": 0.2})
    members = pool(0.3, (1.0, 600), (0.7, 600), own_free_mb=40)
    assert GapFit(room_mb=160).choose(cold, RAM, members, CpuLoad(), 1024 * MB) == "fat"
    assert GapFit(room_mb=0).choose(cold, RAM, members, CpuLoad(), 1024 * MB) is None  # the rule switched off
    roomy = pool(0.3, (1.0, 600), (0.7, 600), own_free_mb=400)
    assert GapFit(room_mb=160).choose(cold, RAM, roomy, CpuLoad(), 1024 * MB) is None  # room enough already


def test_gap_fit_checks_its_options():
    for bad in ({"min_gain": 0}, {"min_samples": 0}, {"cooldown_s": -1}):
        with pytest.raises(ValueError):
            GapFit(**bad)
    assert "gap-fit" in load_plugins().names("rebalancer")


def test_the_pe_waits_until_the_pool_has_settled(pe, clock):  # noqa: F811
    """No move while the pool's summed load still changes (VMs being started): the pool
    policy is placing them; a move then would undo its work."""
    create(pe, "web1", 300)
    create(pe, "web2", 64)
    for name, share in (("web1", 0.6), ("web2", 0.1)):
        pe.accounting.vms[name].cpu_share, pe.accounting.vms[name].samples = share, 5
    from xenpool.protocol import params as P

    def elements(*others):  # this PE (7), as a registrar answers, then the others
        policy = lambda load: P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=P.load_to_wire(load))  # noqa: E731
        transport = P.TcpTransport(1, ("10.0.0.1",))
        return [P.PoolElement(i, 0, 1000, transport, policy(load)) for i, load in enumerate((0.5, *others), 7)]

    rebalancer = GapFit(room_mb=0)
    moved = []
    pe.rebalance(rebalancer, elements(0.0, 0.0)).addCallback(moved.append)
    assert moved == [None]  # the first look: nothing to compare with yet
    pe.rebalance(rebalancer, elements(0.3, 0.0)).addCallback(moved.append)
    assert moved == [None, None]  # the pool's load changed by 0.3: a start somewhere
    pe.rebalance(rebalancer, elements(0.3, 0.0)).addCallback(moved.append)
    assert moved == [None, None, "web1"]


def test_a_moved_vm_carries_the_cpu_it_used_to_the_next_pe(pe, clock):  # noqa: F811
    from xenpool.protocol import cookie as C

    session = create(pe, "web1", 300)
    create(pe, "web2", 64)
    pe.accounting.vms["web1"].cpu_share, pe.accounting.vms["web1"].samples = 0.6, 5
    pe.accounting.vms["web2"].cpu_share, pe.accounting.vms["web2"].samples = 0.1, 5
    pe.rebalance(HotToCold(), [pe.load(), 0.0, 0.0, 0.0, 0.0])
    cookie = [m for m in session.sent if isinstance(m, M.Cookie)][-1]
    cores = C.peek(cookie.cookie).cpu_cores
    assert cores == pytest.approx(0.6 * pe.accounting.node.cpus, abs=0.01)
    # the next PE books it at that, not at its RAM share (300 MB of the host)
    pe.accounting.reserve("web1", 300, cores / pe.accounting.node.cpus)
    assert pe.accounting.vms["web1"].cpu_share == pytest.approx(0.6, abs=0.01)
    pe.accounting.reserve("web3", 300)
    assert pe.accounting.vms["web3"].cpu_share == pytest.approx(300 * 1024 / pe.accounting.node.ram_kb)


def test_the_window_share_is_free_of_the_start_estimate():
    from xenpool.interfaces import NodeInfo
    from xenpool.pe.accounting import HostAccounting, LoadSettings

    accounting = HostAccounting(NodeInfo("h", 2, 1024 * MB), LoadSettings(window_samples=4))
    accounting.reserve("vm", 64)  # estimated at 64/1024 of the host
    for i in range(6):  # it uses 0.5 of one core: 0.25 of the host
        accounting.sample_vm("vm", int(i * 30 * 0.5e9), i * 30.0)
    assert accounting.window_share("vm") == pytest.approx(0.25)
    assert accounting.vms["vm"].cpu_share < 0.24  # the smoothed share still remembers 64/1024
    assert len(accounting.vms["vm"].history) == 5


def test_counting_cpu_wait_measures_what_a_vm_wants():
    from xenpool.interfaces import NodeInfo
    from xenpool.pe.accounting import HostAccounting, LoadSettings

    for count, expected in ((False, 0.25), (True, 0.5)):
        accounting = HostAccounting(NodeInfo("h", 2, 1024 * MB), LoadSettings(smoothing=0, count_cpu_wait=count))
        accounting.reserve("vm", 64)
        accounting.sample_vm("vm", 0, 0.0, 0)
        accounting.sample_vm("vm", int(15e9), 30.0, int(15e9))  # got half a core, waited as long
        assert accounting.vms["vm"].cpu_share == pytest.approx(expected)


def test_gap_fit_evens_out_the_simulated_pool_and_keeps_by_type_order_even():
    scenarios = Path(__file__).resolve().parents[1] / "scenarios"
    options = {"load_plugin": "cpu", "policy": "LeastUsedFreeRAM", "seed": 3, "pe_overrides": {"count_cpu_wait": True},
               "rebalance_interval_s": 60.0}  # fmt: skip
    mixed = json.loads((scenarios / "thesis-mixed-order.json").read_text())
    without = Simulation(mixed, load_plugins(), **options).run()
    result = Simulation(mixed, load_plugins(), rebalance="gap-fit", **options).run()
    assert result.metric_percent < without.metric_percent / 2 and result.ram_failed_starts == 0
    assert 0 < result.moves <= 40 and result.not_started == 0
    again = Simulation(mixed, load_plugins(), rebalance="gap-fit", **options).run()
    assert again.samples_percent == result.samples_percent  # same seed, same run
    by_type = json.loads((scenarios / "thesis-by-type-order.json").read_text())
    assert Simulation(by_type, load_plugins(), rebalance="gap-fit", **options).run().metric_percent < 1
