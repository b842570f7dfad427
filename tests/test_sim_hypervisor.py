"""The simulated hypervisor: its CPU model against independent references, exactly.

Everything runs on a twisted ``Clock`` with seeded ``random.Random``s; the references replay
the draws the hypervisor documents (one ``getrandbits(64)`` per start seeds the guest's own
stream: its phase, then one jitter per cycle) and integrate the busy intervals by brute force
over every elementary interval, with Fractions.
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from xenpool.interfaces import DomainSpec, IHypervisor, NodeInfo
from xenpool.sim.hypervisor import (
    RUNNING,
    SHUTOFF,
    SimError,
    SimulatedHypervisor,
    UnknownDomain,
)

NS = 1_000_000_000
CYCLE_NS = 30 * NS
OVERHEAD_KB = 12 * 1024 + 7 * 1024  # 12 MB + 7 KB per MB of a 1024 MB host
JITTER = (-1, 0, 1)
JITTER_P = (1 / 3, 1 / 3, 1 / 3)


def result(d: Deferred):
    """The result of an already-fired Deferred (fails the test if it failed or is pending)."""
    out: list = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure(d: Deferred, kind: type[BaseException]) -> BaseException:
    out: list = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), f"expected a failure, got {out}"
    assert out[0].check(kind), out[0]
    return out[0].value


def spec(name: str, ram_mb: int = 64, vcpus: int = 1) -> DomainSpec:
    return DomainSpec(name=name, ram_mb=ram_mb, vcpus=vcpus, disk_xml="<disk/>")


def host(
    clock, profiles, *, seed=1, cpus=2, memory_mb=1024, **kwargs
) -> SimulatedHypervisor:
    return SimulatedHypervisor(
        clock,
        name="pc72",
        cpus=cpus,
        memory_mb=memory_mb,
        profiles=profiles,
        rng=random.Random(seed),
        **kwargs,
    )


# -- references --------------------------------------------------------------------------


class Replay:
    """Replays a host's documented draws: one getrandbits(64) per start, in start order."""

    def __init__(self, seed: int, jitter=JITTER, jitter_p=JITTER_P) -> None:
        self.rng = random.Random(seed)
        self.jitter = jitter
        self.cum = list(itertools.accumulate(jitter_p))

    def guest(
        self, busy_s: float, start_ns: int, until_ns: int, stop_ns: int | None = None
    ) -> list[tuple[int, int]]:
        """The busy intervals [a, b) of a guest started at start_ns, clipped to its life."""
        g = random.Random(self.rng.getrandbits(64))
        phase = g.randrange(CYCLE_NS)
        end_of_life = until_ns if stop_ns is None else stop_ns
        intervals = []
        c = start_ns - phase
        while c < end_of_life:
            j = g.choices(self.jitter, cum_weights=self.cum)[0]
            busy = min(max(round((busy_s + j) * NS), 0), CYCLE_NS)
            a, b = max(c, start_ns), min(c + busy, end_of_life)
            if a < b:
                intervals.append((a, b))
            c += CYCLE_NS
        return intervals


def reference_cpu(
    busy: dict[str, list[tuple[int, int]]], cpus: int, t_ns: int
) -> dict[str, int]:
    """Brute force: for every elementary interval between any two transitions, count the busy
    guests and give each min(1, cpus/n) of it."""
    points = sorted(
        {p for ivs in busy.values() for iv in ivs for p in iv if p <= t_ns} | {t_ns}
    )
    totals = {name: Fraction(0) for name in busy}
    for a, b in itertools.pairwise(points):
        running = [
            n for n, ivs in busy.items() if any(x <= a and b <= y for x, y in ivs)
        ]
        if running:
            share = min(Fraction(1), Fraction(cpus, len(running)))
            for n in running:
                totals[n] += (b - a) * share
    return {n: math.floor(v) for n, v in totals.items()}


# -- the interface -----------------------------------------------------------------------


def test_implements_ihypervisor() -> None:
    hv = host(Clock(), {"a": 1})
    verifyClass(IHypervisor, SimulatedHypervisor)
    verifyObject(IHypervisor, hv)
    assert hv.measures_cpu is True
    assert result(hv.node()) == NodeInfo("pc72", 2, 1024 * 1024)
    assert result(hv.watch(lambda name, state: None)) is True


def test_lifecycle_and_events() -> None:
    hv = host(Clock(), lambda name: 5)
    events: list[tuple[str, int]] = []
    hv.watch(lambda name, state: events.append((name, state)))
    assert result(hv.start(spec("a"))) == RUNNING
    assert result(hv.state("a")) == RUNNING
    assert result(hv.domains()) == {"a": (RUNNING, 64 * 1024)}
    failure(hv.state("nope"), UnknownDomain)
    failure(hv.cpu_time_ns("nope"), UnknownDomain)
    assert result(hv.shutdown("a", 10)) is True
    assert result(hv.shutdown("a", 10)) is True  # nothing running: still True
    result(hv.start(spec("b")))
    assert result(hv.destroy("b")) is True
    assert result(hv.destroy("b")) is False
    result(hv.start(spec("c")))
    assert hv.crash("c") is True
    assert events == [
        ("a", RUNNING),
        ("a", SHUTOFF),
        ("b", RUNNING),
        ("b", SHUTOFF),
        ("c", RUNNING),
        ("c", SHUTOFF),
    ]
    failure(hv.state("a"), UnknownDomain)
    assert result(hv.domains()) == {}


def test_a_failing_watcher_does_not_stop_the_others() -> None:
    hv = host(Clock(), lambda name: 5)
    seen = []

    def bad(name, state):
        raise RuntimeError("boom")

    hv.watch(bad)
    hv.watch(lambda name, state: seen.append(state))
    result(hv.start(spec("a")))
    assert seen == [RUNNING]


def test_duplicate_start_fails() -> None:
    hv = host(Clock(), {"a": 10})
    result(hv.start(spec("a")))
    err = failure(hv.start(spec("a")), SimError)
    assert "already exists" in err.reason
    assert result(hv.domains()) == {"a": (RUNNING, 64 * 1024)}


@pytest.mark.parametrize(
    "bad",
    [DomainSpec("", 64, 1, ""), DomainSpec(" a", 64, 1, ""), DomainSpec("a", 0, 1, "")],
)
def test_bad_spec_fails(bad: DomainSpec) -> None:
    failure(host(Clock(), {"a": 10, " a": 10, "": 10}).start(bad), SimError)


def test_profiles_mapping_tuple_callable_and_missing() -> None:
    hv = host(Clock(), {"last-10-1": (10, 150), "last-2-1": 2})
    result(hv.start(spec("last-10-1", 150)))
    result(hv.start(spec("last-2-1")))
    assert hv.guests() == {"last-10-1": 10.0, "last-2-1": 2.0}
    assert "no load profile" in failure(hv.start(spec("other")), SimError).reason

    types = {"last-10": 10, "last-25": 25}
    hv = host(Clock(), lambda server_id: types[server_id.rsplit("-", 1)[0]])
    result(hv.start(spec("last-25-3")))
    assert hv.guests() == {"last-25-3": 25.0}
    failure(hv.start(spec("last-7-1")), SimError)
    failure(
        host(Clock(), {"a": 31}).start(spec("a")), SimError
    )  # busy longer than a cycle


def test_ram_accounting() -> None:
    hv = host(Clock(), lambda name: 5)
    total_kb = 1024 * 1024
    assert result(hv.free_ram_kb()) == total_kb - OVERHEAD_KB
    result(hv.start(spec("a", 300)))
    result(hv.start(spec("b", 150)))
    assert hv.ram_used_mb() == 450
    assert result(hv.free_ram_kb()) == total_kb - OVERHEAD_KB - 450 * 1024
    assert result(hv.domains()) == {
        "a": (RUNNING, 300 * 1024),
        "b": (RUNNING, 150 * 1024),
    }
    # 1005 MB for guests in all: 555 MB are left, so 556 MB do not fit and 555 MB do.
    assert "MB free" in failure(hv.start(spec("c", 556)), SimError).reason
    result(hv.start(spec("c", 555)))
    assert result(hv.free_ram_kb()) == 0
    result(hv.destroy("a"))
    assert hv.ram_used_mb() == 705
    assert result(hv.free_ram_kb()) == 300 * 1024


def test_overhead_parameters() -> None:
    hv = host(Clock(), {}, memory_mb=2048, overhead_mb=20, overhead_kb_per_mb=0)
    assert result(hv.free_ram_kb()) == (2048 - 20) * 1024


def test_theoretical_load() -> None:
    busy = {
        "last-25-1": 25,
        "last-10-1": 10,
        "last-10-9": 10,
        "last-5-1": 5,
        "last-2-1": 2,
    }
    hv = host(Clock(), busy)
    assert hv.theoretical_load() == 0
    for name in busy:
        result(hv.start(spec(name)))
    assert hv.theoretical_load() == pytest.approx(52 / 60)  # the thesis' 86.7 %
    result(hv.destroy("last-25-1"))
    assert hv.theoretical_load() == pytest.approx(27 / 60)


# -- the CPU model -----------------------------------------------------------------------


def test_deterministic_single_guest_exact() -> None:
    """No jitter: exactly 10 s of CPU per 30 s cycle, placed by the guest's phase."""
    clock = Clock()
    clock.advance(7)  # start at a time that is not a cycle boundary
    hv = host(clock, {"a": 10}, seed=42, jitter=(0,), jitter_p=(1,))
    result(hv.start(spec("a")))
    phase = hv.phase_ns("a")
    assert phase == random.Random(random.Random(42).getrandbits(64)).randrange(CYCLE_NS)
    start = 7 * NS

    def expected(
        t_ns: int,
    ) -> int:  # busy during [c, c + 10 s) for c = start - phase + k * 30 s
        total, c = 0, start - phase
        while c < t_ns:
            total += max(0, min(c + 10 * NS, t_ns) - max(c, start))
            c += CYCLE_NS
        return total

    for _ in range(400):
        clock.advance(0.25)
        assert result(hv.cpu_time_ns("a")) == expected(round(clock.seconds() * NS))
    # Whole cycles after the first give exactly 10 s each.
    clock.advance(
        30 - (clock.seconds() - 7) % 30
    )  # to a multiple of 30 s after the start
    before = result(hv.cpu_time_ns("a"))
    clock.advance(300)
    assert result(hv.cpu_time_ns("a")) - before == 100 * NS


@pytest.mark.parametrize(
    "busy_s", [10, 0, 1, 0.5, 29.5, 30]
)  # draws of 0 and of a whole cycle included
def test_single_guest_replays_its_draws_exactly(busy_s: float) -> None:
    clock = Clock()
    hv = host(clock, {"a": busy_s}, seed=7)
    result(hv.start(spec("a")))
    replay = Replay(7).guest(busy_s, 0, 1300 * NS)
    for _ in range(100):
        clock.advance(13)
        t_ns = round(clock.seconds() * NS)
        assert result(hv.cpu_time_ns("a")) == sum(
            max(0, min(b, t_ns) - a) for a, b in replay
        )


def test_never_and_always_busy_without_jitter() -> None:
    clock = Clock()
    hv = host(clock, {"idle": 0, "busy": 30}, jitter=(0,), jitter_p=(1,))
    result(hv.start(spec("idle")))
    result(hv.start(spec("busy")))
    clock.advance(1234.5)
    assert result(hv.cpu_time_ns("idle")) == 0
    assert result(hv.cpu_time_ns("busy")) == 1234_500_000_000


def test_single_guest_mean_share() -> None:
    clock = Clock()
    hv = host(clock, {"a": 10}, seed=3)
    result(hv.start(spec("a")))
    clock.advance(30 * 2000)
    share = result(hv.cpu_time_ns("a")) / (30 * 2000 * NS)
    assert share == pytest.approx(10 / 30, abs=0.005)


def test_contention_shares_cores_equally() -> None:
    """Three always-busy guests on two cores: 2/3 s of CPU per second each, exactly."""
    clock = Clock()
    hv = host(clock, lambda name: 30, jitter=(0,), jitter_p=(1,))
    for name in "abc":
        result(hv.start(spec(name)))
    assert hv.busy_guests() == 3
    for second in range(1, 91):
        clock.advance(1)
        for name in "abc":
            assert result(hv.cpu_time_ns(name)) == second * 2 * NS // 3
    result(hv.destroy("c"))
    clock.advance(10)  # two busy guests, two cores: a full core each
    for name in "ab":
        assert result(hv.cpu_time_ns(name)) == 60 * NS + 10 * NS
    result(hv.start(spec("c")))  # a new guest starts with 0 and shares again
    clock.advance(3)
    assert result(hv.cpu_time_ns("c")) == 2 * NS
    assert result(hv.cpu_time_ns("a")) == 72 * NS


def test_contention_with_random_profiles_matches_brute_force() -> None:
    clock = Clock()
    busy = {"g1": 25, "g2": 10, "g3": 10, "g4": 5, "g5": 2, "g6": 25, "g7": 17.5}
    hv = host(clock, busy, seed=11)
    replay = Replay(11)
    starts = {"g1": 0, "g2": 3.5, "g3": 3.5, "g4": 40, "g5": 41, "g6": 77.25, "g7": 100}
    stops = {"g3": 500.125}
    end_s = 1200
    intervals = {}
    for name, at in starts.items():  # in start order, like the host
        clock.advance(at - clock.seconds())
        result(hv.start(spec(name)))
        stop = stops.get(name)
        stop_ns = None if stop is None else round(stop * NS)
        intervals[name] = replay.guest(busy[name], round(at * NS), end_s * NS, stop_ns)
    clock.advance(stops["g3"] - clock.seconds())
    reached = hv.cpu_time_now_ns("g3")
    result(hv.destroy("g3"))
    clock.advance(end_s - clock.seconds())
    expected = reference_cpu(intervals, 2, end_s * NS)
    assert reached == expected["g3"]
    for name in busy.keys() - stops.keys():
        assert result(hv.cpu_time_ns(name)) == expected[name], name
    assert sum(expected.values()) <= 2 * end_s * NS


def test_lazy_evaluation_does_not_depend_on_queries() -> None:
    """The same host queried every second, every 7.3 s, or only at the end: same numbers,
    with starts (some at the same instant) and a destroy on the way."""
    busy = {f"g{i}": b for i, b in enumerate((25, 10, 10, 5, 2, 25, 10, 29))}
    actions = [
        (at, "start", name) for at, name in zip((0, 0, 12.5, 31, 31, 64, 90, 91), busy)
    ]
    actions += [(400, "destroy", "g1"), (1000, "end", "")]

    def run(step: float | None) -> dict[str, int]:
        clock = Clock()
        hv = host(clock, busy, seed=5)
        seen: dict[str, int] = {}
        for at, action, name in actions:
            while clock.seconds() < at:
                clock.advance(min(step or math.inf, at - clock.seconds()))
                if step:
                    for guest in hv.guests():
                        hv.cpu_time_now_ns(guest)
            if action == "start":
                result(hv.start(spec(name)))
            elif action == "destroy":
                seen[name] = hv.cpu_time_now_ns(name)
                assert result(hv.destroy(name)) is True
        return seen | {name: hv.cpu_time_now_ns(name) for name in hv.guests()}

    once = run(None)
    assert len(once) == len(busy)
    assert run(1) == once
    assert run(7.3) == once


def test_cpu_time_is_monotonic_and_bounded() -> None:
    clock = Clock()
    hv = host(clock, lambda name: 20, seed=9)
    for i in range(5):
        result(hv.start(spec(f"g{i}")))
    last = dict.fromkeys(hv.guests(), 0)
    for _ in range(300):
        clock.advance(0.7)
        now = {name: hv.cpu_time_now_ns(name) for name in hv.guests()}
        for name, value in now.items():
            assert last[name] <= value <= round(clock.seconds() * NS)
        assert sum(now.values()) <= 2 * round(clock.seconds() * NS)
        last = now


def test_power_off_drops_every_guest_silently() -> None:
    hv = host(Clock(), lambda name: 5)
    events = []
    hv.watch(lambda name, state: events.append((name, state)))
    result(hv.start(spec("a")))
    result(hv.start(spec("b")))
    assert sorted(hv.power_off()) == ["a", "b"]
    assert result(hv.domains()) == {}
    assert events == [("a", RUNNING), ("b", RUNNING)]
    assert result(hv.free_ram_kb()) == 1024 * 1024 - OVERHEAD_KB


def test_performance_sanity_40_guests_8_hosts_5000_s() -> None:
    """The thesis set-up, run for 5000 simulated seconds in 1 s steps, every guest's CPU time
    read every 30 s (no timing assertion: it just has to finish)."""
    clock = Clock()
    rng = random.Random(2024)
    types = {"last-2": 2, "last-5": 5, "last-10": 10, "last-25": 25}
    hosts = [
        SimulatedHypervisor(
            clock,
            name=f"pc{72 + i}",
            cpus=2,
            memory_mb=1024,
            profiles=lambda sid: types[sid.rsplit("-", 1)[0]],
            rng=random.Random(rng.random()),
        )
        for i in range(8)
    ]
    names = [f"last-10-{nr}" for nr in range(1, 17)]
    names += [
        f"{t}-{nr}" for t in ("last-2", "last-5", "last-25") for nr in range(1, 9)
    ]
    for i, name in enumerate(names):
        result(hosts[i % 8].start(spec(name)))
    readings = 0
    for second in range(1, 5001):
        clock.advance(1)
        if second % 30 == 0:
            for hv in hosts:
                for name in hv.guests():
                    readings += result(hv.cpu_time_ns(name)) >= 0
    assert readings == 40 * (5000 // 30)
    total = sum(hv.cpu_time_now_ns(name) for hv in hosts for name in hv.guests())
    # At most the nominal demand (mean busy time = L), less what contention takes.
    demand = sum(types[n.rsplit("-", 1)[0]] for n in names) / 30
    assert 0.8 * demand < total / (5000 * NS) < 1.01 * demand
