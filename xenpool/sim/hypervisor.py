"""A simulated hypervisor on a virtual clock whose guests follow the scenarios' load profiles.

It implements ``IHypervisor`` like the libvirt plugin does (same results, same failures), but
every method answers at once with an already-fired Deferred: no threads, no reactor, only an
injected clock with ``seconds()`` (a ``twisted.internet.task.Clock`` in the simulator and
the tests). ``measures_cpu`` is True: ``cpu_time_ns`` is the CPU a guest really received.

Load profiles. ``profiles`` gives each guest's busy seconds per cycle from its domain name
(the PE names a domain after the VM's server ID), either as

* a callable ``server_id -> busy_s`` (what the simulator passes: it knows each server ID's
  type from the scenario's start list), or
* a mapping ``server_id -> busy_s`` or ``server_id -> (busy_s, ram_mb)``; only busy_s is used.

A guest's RAM always comes from its ``DomainSpec.ram_mb``, as on a real host. A start whose
name has no profile (the callable raises KeyError/LookupError/ValueError, or the mapping
lacks it) fails with SimError.

The CPU model (docs/load-study.md, "The model"; the scenarios' ``load_generator``):

* Every guest runs a load generator with a cycle of ``cycle_s`` (30 s). At the start of each
  cycle it draws its busy time ``L' = L + j``, ``j`` from ``jitter`` with the probabilities
  ``jitter_p`` (-1/0/+1 s, 1/3 each), clamped to [0, cycle_s]. It is busy for the first L'
  seconds of the cycle and idle for the rest; while busy it wants exactly one core.
* Phase: the guest does not start at the start of a cycle. A start draws a phase
  ``p`` in [0, cycle_s) and the guest's first cycle began ``p`` seconds before the start
  (so it is busy at once if p < L'), its cycles begin at ``start - p + k * cycle_s``. Guests
  started together therefore do not switch between busy and idle in step.
* Contention: with ``n`` guests busy on a host of ``cpus`` cores, each busy guest gets one
  core if ``n <= cpus`` and ``cpus / n`` of a core otherwise (fair sharing). Idle guests get
  nothing; the hypervisor's own CPU is not modelled.
* ``cpu_time_ns`` is the integral of that rate from the guest's start to the clock's now,
  exact: times are integer nanoseconds (``round(clock.seconds() * 1e9)``), the integral is
  kept as a rational number, and the result is rounded down to whole nanoseconds.

Randomness and laziness. A start takes one draw (``getrandbits(64)``) from the injected
``rng`` to seed the guest's own ``random.Random``; the guest's phase
(``randrange(cycle_ns)``) and then each cycle's jitter (``choices(jitter,
cum_weights=...)``), in cycle order, come from that stream alone. So the results depend only
on the order of starts, never on when or how often anyone asks: the host's timeline is
advanced on demand, by an event sweep from the last computed time to now that handles every
busy/idle transition of every guest in time order (a heap, one pending event per guest), and
it keeps one running integral S(t) of the per-busy-guest share; a guest's CPU time is the
sum of S's increase over its busy periods. Cost: O(log guests) per transition, nothing per
idle second.

Lifecycle: ``start`` (RUNNING), ``shutdown`` (stops it at once and fires True), ``destroy``
(fires True if it was running, False if not), and for the simulator ``crash(name)`` (the
guest dies by itself) and ``power_off()`` (the host is gone: every guest vanishes, no
events). ``watch(callback)`` callbacks get ``(name, state)`` synchronously, right after the
change: RUNNING (1) on start, SHUTOFF (5) on shutdown, destroy and crash.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from xenpool.interfaces import DomainSpec, IHypervisor, NodeInfo

log = Logger()

#: libvirt's domain states (``libvirt.VIR_DOMAIN_*``), without importing libvirt.
RUNNING = 1
SHUTOFF = 5

NS = 1_000_000_000

Profiles = Mapping[str, "float | tuple[float, float]"] | Callable[[str], float]


class SimError(Exception):
    """A simulated hypervisor operation that failed (like the libvirt plugin's
    HypervisorError: ``reason`` says what and why; ``code`` is always None)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code: int | None = None


class UnknownDomain(SimError, LookupError):
    """No domain of that name runs on this simulated host."""


def to_ns(seconds: float) -> int:
    """Seconds (a clock's float) as whole nanoseconds."""
    return round(seconds * NS)


class _Guest:
    __slots__ = (
        "name",
        "ram_mb",
        "busy_s",
        "rng",
        "phase_ns",
        "started_ns",
        "cycle_start",
        "busy",
        "total",
        "s0",
        "next_is_cycle_start",
        "alive",
        "busy_ns",
        "busy_since",
    )

    def __init__(
        self, name: str, ram_mb: int, busy_s: float, rng: random.Random
    ) -> None:
        self.name = name
        self.ram_mb = ram_mb
        self.busy_s = busy_s
        self.rng = rng
        self.phase_ns = 0
        self.started_ns = 0
        self.cycle_start = 0  # ns; start of its current cycle
        self.busy = False
        self.total: int | Fraction = 0  # ns of CPU over its finished busy periods
        self.s0: int | Fraction = 0  # the host's S when its current busy period began
        self.busy_ns = (
            0  # wall-clock ns it wanted a core, over its finished busy periods
        )
        self.busy_since = 0  # ns; when its current busy period began
        self.next_is_cycle_start = True
        self.alive = True


@implementer(IHypervisor)
class SimulatedHypervisor:
    """One simulated host. See the module docstring for the model."""

    measures_cpu = True

    def __init__(
        self,
        clock: Any,
        *,
        name: str,
        cpus: int,
        memory_mb: int,
        profiles: Profiles,
        rng: random.Random,
        cycle_s: float = 30,
        jitter: Sequence[float] = (-1, 0, 1),
        jitter_p: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
        overhead_mb: float = 12.0,
        overhead_kb_per_mb: float = 7.0,
    ) -> None:
        if cpus <= 0 or memory_mb <= 0:
            raise ValueError(
                f"host {name!r}: cpus and memory_mb must be > 0, got {cpus}, {memory_mb}"
            )
        if cycle_s <= 0:
            raise ValueError(f"cycle_s must be > 0, got {cycle_s}")
        jitter, jitter_p = tuple(jitter), tuple(jitter_p)
        if not jitter or len(jitter) != len(jitter_p):
            raise ValueError(
                f"jitter {jitter} and jitter_p {jitter_p} must be non-empty and of one length"
            )
        if any(p < 0 for p in jitter_p) or sum(jitter_p) <= 0:
            raise ValueError(
                f"jitter_p {jitter_p}: probabilities must be >= 0 and not all 0"
            )
        self.clock = clock
        self.name = name
        self.cpus = int(cpus)
        self.memory_mb = int(memory_mb)
        self.profiles = profiles
        self.rng = rng
        self.cycle_s = cycle_s
        self.cycle_ns = to_ns(cycle_s)
        self.jitter = jitter
        self.jitter_p = jitter_p
        self._cum_p = list(itertools.accumulate(jitter_p))
        self.overhead_mb = overhead_mb
        self.overhead_kb_per_mb = overhead_kb_per_mb
        self._guests: dict[str, _Guest] = {}
        self._watchers: list[Callable[[str, int], object]] = []
        # The timeline: computed up to _t (ns); S = integral of one busy guest's share.
        self._t = to_ns(clock.seconds())
        self._s: int | Fraction = 0
        self._busy = 0
        self._events: list[tuple[int, int, _Guest]] = []
        self._seq = itertools.count()

    # -- the CPU model -------------------------------------------------------------------

    def _integrate(self, t: int) -> None:
        """Move S from self._t to t (> self._t) at the current busy count."""
        dt = t - self._t
        if dt > 0:
            if self._busy <= self.cpus:
                self._s += dt
            else:
                self._s += Fraction(dt * self.cpus, self._busy)
            self._t = t

    def _set_busy(self, guest: _Guest, busy: bool) -> None:
        if busy == guest.busy:
            return
        guest.busy = busy
        if busy:
            guest.s0 = self._s
            guest.busy_since = self._t
            self._busy += 1
        else:
            guest.total += self._s - guest.s0
            guest.busy_ns += self._t - guest.busy_since
            self._busy -= 1

    def _schedule(self, guest: _Guest, at: int, cycle_start: bool) -> None:
        guest.next_is_cycle_start = cycle_start
        heapq.heappush(self._events, (at, next(self._seq), guest))

    def _begin_cycle(self, guest: _Guest, start: int, now: int) -> None:
        """Guest's cycle beginning at ``start`` (<= now): draw its busy time, set its state as
        of ``now`` and schedule its next transition."""
        guest.cycle_start = start
        j = guest.rng.choices(self.jitter, cum_weights=self._cum_p)[0]
        busy_ns = min(max(to_ns(guest.busy_s + j), 0), self.cycle_ns)
        end = start + busy_ns
        self._set_busy(guest, now < end)
        if now < end < start + self.cycle_ns:
            self._schedule(guest, end, cycle_start=False)
        else:
            self._schedule(guest, start + self.cycle_ns, cycle_start=True)

    def advance(self) -> int:
        """Bring the timeline up to the clock's now (every transition until then, in time
        order); returns now in ns. Every query does this itself."""
        now = to_ns(self.clock.seconds())
        events = self._events
        while events and events[0][0] <= now:
            at, _seq, guest = heapq.heappop(events)
            if not guest.alive:
                continue
            self._integrate(at)
            if guest.next_is_cycle_start:
                self._begin_cycle(guest, at, at)
            else:
                self._set_busy(guest, False)
                self._schedule(
                    guest, guest.cycle_start + self.cycle_ns, cycle_start=True
                )
        self._integrate(now)
        return now

    def _cpu_ns(self, guest: _Guest) -> int:
        total = guest.total + (self._s - guest.s0 if guest.busy else 0)
        return math.floor(total)

    def _busy_s(self, name: str) -> float:
        profiles = self.profiles
        try:
            if callable(profiles):
                busy: Any = profiles(name)
            else:
                busy = profiles[name]
                if isinstance(busy, (tuple, list)):
                    busy = busy[0]
            busy = float(busy)
        except (LookupError, ValueError, TypeError) as err:
            raise SimError(
                f"cannot start {name!r} on {self.name}: no load profile ({err!r})"
            ) from None
        if busy < 0 or busy > self.cycle_s or math.isnan(busy):
            raise SimError(
                f"cannot start {name!r} on {self.name}: busy {busy} s not in [0, {self.cycle_s}]"
            )
        return busy

    # -- helpers ---------------------------------------------------------------------------

    def _guest(self, name: str) -> _Guest:
        guest = self._guests.get(name)
        if guest is None:
            raise UnknownDomain(f"no domain {name!r} on {self.name}")
        return guest

    def overhead_kb(self) -> int:
        """The hypervisor's own RAM, in KB (the libvirt plugin's formula)."""
        return round(self.overhead_mb * 1024 + self.overhead_kb_per_mb * self.memory_mb)

    def _free_kb(self) -> int:
        return self.memory_mb * 1024 - self.overhead_kb() - self.ram_used_mb() * 1024

    def _notify(self, name: str, state: int) -> None:
        for callback in list(self._watchers):
            try:
                callback(name, state)
            except Exception:
                log.failure(
                    "domain event callback {callback!r} failed", callback=callback
                )

    def _remove(self, name: str) -> bool:
        guest = self._guests.get(name)
        if guest is None:
            return False
        self.advance()
        self._set_busy(guest, False)
        guest.alive = False  # its pending event is skipped
        del self._guests[name]
        return True

    # -- IHypervisor ---------------------------------------------------------------------

    def open(self) -> None:
        """Nothing to open: the guests are simulated in this process."""

    def close(self) -> None:
        """Nothing to close."""

    def node(self) -> defer.Deferred:
        return defer.succeed(self.node_info())

    def node_info(self) -> NodeInfo:
        return NodeInfo(self.name, self.cpus, self.memory_mb * 1024)

    def free_ram_kb(self) -> defer.Deferred:
        """Total - overhead (12 MB + 7 KB per MB of host RAM) - every guest's RAM; >= 0."""
        return defer.succeed(max(0, self._free_kb()))

    def domains(self) -> defer.Deferred:
        """{name: (RUNNING, ram_kb)} of every guest."""
        return defer.succeed(
            {g.name: (RUNNING, g.ram_mb * 1024) for g in self._guests.values()}
        )

    def start(self, spec: DomainSpec) -> defer.Deferred:
        """Start a guest; fires RUNNING. Fails with SimError for a bad spec, a name already
        in use, a name without a load profile, or too little free RAM."""
        try:
            guest = self._start(spec)
        except SimError:
            return defer.fail()
        self._notify(guest.name, RUNNING)
        return defer.succeed(RUNNING)

    def _start(self, spec: DomainSpec) -> _Guest:
        name = spec.name
        if not name or name != name.strip():
            raise SimError(f"bad domain name {name!r}")
        if spec.ram_mb <= 0 or spec.vcpus <= 0:
            raise SimError(
                f"domain {name!r}: RAM and vCPUs must be > 0, got {spec.ram_mb} MB, {spec.vcpus}"
            )
        if name in self._guests:
            raise SimError(
                f"cannot start {name!r}: a domain of that name already exists (running)"
            )
        free_kb = max(0, self._free_kb())
        if spec.ram_mb * 1024 > free_kb:
            raise SimError(
                f"cannot start {name!r} on {self.name}: {spec.ram_mb} MB needed, {free_kb // 1024} MB free"
            )
        busy_s = self._busy_s(name)
        now = self.advance()
        guest = _Guest(
            name, spec.ram_mb, busy_s, random.Random(self.rng.getrandbits(64))
        )
        guest.phase_ns = guest.rng.randrange(self.cycle_ns)
        guest.started_ns = now
        self._guests[name] = guest
        self._begin_cycle(guest, now - guest.phase_ns, now)
        return guest

    def state(self, name: str) -> defer.Deferred:
        """RUNNING, or fails with UnknownDomain."""
        try:
            self._guest(name)
        except SimError:
            return defer.fail()
        return defer.succeed(RUNNING)

    def cpu_time_ns(self, name: str) -> defer.Deferred:
        """CPU time the guest received since its start, ns; fails with UnknownDomain."""
        try:
            return defer.succeed(self.cpu_time_now_ns(name))
        except SimError:
            return defer.fail()

    def cpu_wait_ns(self, name: str) -> defer.Deferred:
        """Time the guest wanted a core but waited for one, since its start, ns (what
        libvirt reports as ``vcpu.<n>.wait`` on Xen and ``vcpu.<n>.delay`` on KVM, the
        guest's steal time); fails with UnknownDomain."""
        try:
            guest = self._guest(name)
        except SimError:
            return defer.fail()
        self.advance()
        wanted = guest.busy_ns + (self._t - guest.busy_since if guest.busy else 0)
        return defer.succeed(max(0, wanted - self._cpu_ns(guest)))

    def shutdown(self, name: str, timeout_s: float) -> defer.Deferred:
        """Stops the guest at once: a simulated guest always shuts down cleanly. Fires True
        (also when nothing ran)."""
        if self._remove(name):
            self._notify(name, SHUTOFF)
        return defer.succeed(True)

    def destroy(self, name: str) -> defer.Deferred:
        """Fires True if the guest was running, False if there was nothing to stop."""
        removed = self._remove(name)
        if removed:
            self._notify(name, SHUTOFF)
        return defer.succeed(removed)

    def watch(self, callback: Callable[[str, int], object]) -> defer.Deferred:
        """Call ``callback(name, state)`` on every start (RUNNING) and stop (SHUTOFF),
        synchronously. Fires True: events are always available."""
        self._watchers.append(callback)
        return defer.succeed(True)

    # -- for the simulator and tests (plain values, no Deferreds) ---------------------------

    def cpu_time_now_ns(self, name: str) -> int:
        """``cpu_time_ns`` as a plain int; raises UnknownDomain."""
        guest = self._guest(name)
        self.advance()
        return self._cpu_ns(guest)

    def crash(self, name: str) -> bool:
        """The guest dies by itself (watchers see SHUTOFF); False if it was not running."""
        removed = self._remove(name)
        if removed:
            self._notify(name, SHUTOFF)
        return removed

    def power_off(self) -> list[str]:
        """The host goes down: every guest is gone at once, without events (nobody is left
        to send them). Returns the names of the guests it ran."""
        names = list(self._guests)
        for name in names:
            self._remove(name)
        return names

    def theoretical_load(self) -> float:
        """Sum over its guests of busy_s / cycle_s, divided by cpus (the scenarios' metric)."""
        return sum(g.busy_s for g in self._guests.values()) / self.cycle_s / self.cpus

    def guests(self) -> dict[str, float]:
        """{name: busy_s} of every guest."""
        return {g.name: g.busy_s for g in self._guests.values()}

    def ram_used_mb(self) -> int:
        """Sum of the guests' RAM (their DomainSpec.ram_mb); the overhead is not included."""
        return sum(g.ram_mb for g in self._guests.values())

    def phase_ns(self, name: str) -> int:
        """How far into its first cycle the guest was at its start, ns."""
        return self._guest(name).phase_ns

    def busy_guests(self) -> int:
        """How many guests are busy now."""
        self.advance()
        return self._busy
