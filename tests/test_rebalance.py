"""Rebalancing after start: the hot-cold rebalancer, the PE's planned move, the PU following it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from xenpool.interfaces import LoadSample
from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.sim.run import Simulation
from xenpool_plugins.load import CpuLoad
from xenpool_plugins.rebalance import HotToCold

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
    assert HotToCold(threshold=0.05).choose(SAMPLE, {}, pool, CpuLoad(), 1024 * 1024) == expected


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
def test_a_pe_daemon_moves_a_vm_to_a_new_empty_pe(tmp_path):
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
            f"--status=tcp:{status}:interface=127.0.0.1", "--load-plugin=max", "--rebalance=hot-cold",
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
