"""The pure parts of ``xenpool chaos``: no processes, no sockets, no clock of their own.

- :func:`schedule`: the trials of a campaign from a seed (deterministic).
- :class:`Checker`: the invariants, fed one *round* of snapshots at a time.
- :func:`log_events` / :func:`check_attempts`: the start and fence attempts read from the
  PEs' JSON-lines logs, and invariant (c).
- :class:`Report`: per-kind results, the ``--json`` document and the rich table.

Invariants (checked from every PE's own ``/status``, i.e. its hypervisor's domains,
never from the keeper's claims):

(a) no VM runs on two hosts at once. A SIGSTOPped or partitioned host counts as still
    running what it last reported; a killed host runs nothing. To keep snapshot skew
    (hosts are polled one after the other) from looking like a double start, a VM must
    be seen on two hosts in ``double_rounds`` (default 2) consecutive rounds.
(b) after a fault ends, within a bound, every VM of the keep file runs on exactly one
    host and the keeper's ``/vms`` says it is ``running`` on that very PE.
(c) start attempts ("started X", "refused X" in a PE's log) of one VM on one PE are at
    least ``backoff_s * (1 - tolerance)`` apart (the keeper tries each PE at most once
    per round and waits its back-off, initially 0.5 s, between rounds); fence operations
    ("fencing H: asking ...", one per real call of the stonith plugin: a PE shares one
    between the VMs of one failure) of one PE against one host: at most
    ``1 + fence_tolerance`` in any window of ``fence_window_s`` (a failed fence is held
    off at least 1 s). Several PEs each fencing a dead host once are allowed: each takes
    over VMs of its own.
(d) after a fault ends, within a bound, every registrar knows the same PE set, and it
    is the set of the hosts that run.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# Each kind: (min, max) seconds the fault is held before it is healed.
KINDS: dict[str, tuple[float, float]] = {
    "pe-kill": (0.5, 3.0),  # kill -9 of a PE, restarted on its host at heal
    "pe-stop": (2.0, 4.0),  # SIGSTOP beyond the heartbeat timeout, then SIGCONT
    "pe-stop-fence-fails": (2.0, 5.0),  # the same, and every fence of it fails
    "part-keeper": (2.0, 5.0),  # PE cut from the keeper only
    "part-keeper-pes": (2.0, 5.0),  # PE cut from the keeper and the other PEs
    "part-registrars": (2.0, 5.0),  # PE cut from the registrars only
    "part-all": (2.0, 5.0),  # PE cut from everyone (not from the controller)
    "part-asym": (2.0, 5.0),  # PE hears no one, but its packets still go out
    "registrar-kill": (1.0, 4.0),  # kill -9 of a registrar, restarted at heal
    "keeper-kill": (0.5, 3.0),  # kill -9 of the keeper, restarted at heal
    "keeper-kill-placement": (
        0.5,
        2.0,
    ),  # kill -9 of the keeper during a first placement
    "keeper-kill-pe-kill": (
        1.0,
        4.0,
    ),  # kill -9 of a PE, then of the keeper (restarted at once)
    "double": (2.0, 4.0),  # kill -9 of one PE, SIGSTOP of another 0.7 s later
    "corrupt-state": (0.2, 1.0),  # a keeper cookie file overwritten with garbage
    "garbage": (1.0, 3.0),  # random bytes and truncated frames on every port
    "nbd-away": (2.0, 5.0),  # the NBD server of the VMs' disks gone while a PE dies
}

# Not in the default campaign: faults that break xenpool on purpose, to show that the
# checker sees what it must (tests/test_chaos.py runs it).
SELFTEST_KINDS: dict[str, tuple[float, float]] = {
    "selftest-broken-fence": (
        6.0,
        8.0,
    ),  # a PE stopped, its fence "succeeds" without killing it: held long
    # enough for the failover (lease, the stopped host asked, the fence) and then several polls
}

RUNNING_STATES_EXCLUDED = {5, 6}  # libvirt VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_CRASHED


@dataclass(frozen=True)
class Trial:
    kind: str
    index: int  # n-th trial of its kind
    seed: int  # seeds the fault's own choices (victim, delays)
    hold_s: float


def schedule(seed: int, kinds: list[str], trials: int) -> list[Trial]:
    """``trials`` trials of every kind, in a seeded random order; the same seed gives the
    same schedule."""
    known = {**KINDS, **SELFTEST_KINDS}
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(
            f"unknown fault kind {unknown[0]!r}; known: {', '.join(known)}"
        )
    rng = random.Random(seed)
    plan = []
    for kind in kinds:
        lo, hi = known[kind]
        for index in range(trials):
            plan.append(
                Trial(kind, index, rng.randrange(2**32), round(rng.uniform(lo, hi), 3))
            )
    rng.shuffle(plan)
    return plan


# ------------------------------------------------------------------ snapshots


@dataclass
class HostView:
    """One host as the controller saw it in one round."""

    alive: bool  # its PE process exists (not killed or fenced)
    domains: set[str] | None  # what its /status listed; None: no answer this round
    registered: bool = False
    pe_id: str = ""  # "0x00000001"
    process: int = 0  # the PE process seen (its pid): a new one is a rebooted host


@dataclass
class Round:
    t: float
    hosts: dict[str, HostView]  # host name -> view
    keeper: list[dict] | None  # keeper /vms, None: no answer
    registrars: dict[
        str, set[str] | None
    ]  # registrar -> PE identifiers, None: no answer


@dataclass
class Checker:
    vms: list[str]
    double_rounds: int = 2
    last: dict[str, set[str]] = field(
        default_factory=dict
    )  # host -> last reported domains
    process: dict[str, int] = field(
        default_factory=dict
    )  # host -> the PE process that reported them
    _double_seen: dict[str, int] = field(default_factory=dict)
    _double_flagged: set[tuple[str, frozenset]] = field(default_factory=set)

    def running(self, rnd: Round) -> dict[str, set[str]]:
        """Host -> VMs it runs now, counting a silent host's last report."""
        out = {}
        for host, view in rnd.hosts.items():
            if self.process.get(host) != view.process:
                # Another PE process: the host rebooted, so what the old one ran is gone
                # (a silent new process must not keep the old one's VMs alive in this view).
                self.process[host] = view.process
                self.last[host] = set()
            if not view.alive:
                self.last[host] = set()
            elif view.domains is not None:
                self.last[host] = set(view.domains)
            out[host] = set(self.last.get(host, set()))
        return out

    def feed(self, rnd: Round) -> list[str]:
        """Invariant (a) on one round; the violations it found (each reported once)."""
        where = self.where(rnd)
        found = []
        for vm, hosts in where.items():
            if len(hosts) < 2:
                self._double_seen.pop(vm, None)
                continue
            self._double_seen[vm] = self._double_seen.get(vm, 0) + 1
            key = (vm, frozenset(hosts))
            if (
                self._double_seen[vm] >= self.double_rounds
                and key not in self._double_flagged
            ):
                self._double_flagged.add(key)
                found.append(f"double start: {vm} runs on {', '.join(sorted(hosts))}")
        return found

    def where(self, rnd: Round) -> dict[str, list[str]]:
        where: dict[str, list[str]] = {}
        for host, names in self.running(rnd).items():
            for name in names:
                where.setdefault(name, []).append(host)
        return where

    def settled(self, rnd: Round) -> list[str]:
        """What keeps invariants (b) and (d) from holding in this round ([] = they hold)."""
        problems = []
        where = self.where(rnd)
        host_pe = {host: v.pe_id for host, v in rnd.hosts.items()}
        keeper = (
            {vm["server_id"]: vm for vm in rnd.keeper}
            if rnd.keeper is not None
            else None
        )
        if keeper is None:
            problems.append("keeper does not answer")
        for vm in self.vms:
            hosts = where.get(vm, [])
            if len(hosts) != 1:
                problems.append(
                    f"{vm} runs on {len(hosts)} hosts ({', '.join(sorted(hosts)) or 'none'})"
                )
                continue
            if keeper is not None:
                k = keeper.get(vm)
                if k is None or k.get("state") != "running":
                    problems.append(
                        f"{vm}: keeper state {k.get('state') if k else 'missing'}"
                    )
                elif k.get("pe") != host_pe[hosts[0]]:
                    problems.append(
                        f"{vm}: keeper heartbeats PE {k.get('pe')} but it runs on {hosts[0]}"
                    )
        live = {v.pe_id for v in rnd.hosts.values() if v.alive}
        for name, pes in sorted(rnd.registrars.items()):
            if pes is None:
                problems.append(f"registrar {name} does not answer")
            elif pes != live:
                problems.append(
                    f"registrar {name} knows PEs {sorted(pes)}, running are {sorted(live)}"
                )
        return problems


# ------------------------------------------------------------------ logs, invariant (c)

_STARTED = re.compile(r"^started (\S+) \(")
_REFUSED = re.compile(r"^refused (\S*): ")
_FENCE_OPERATION = re.compile(
    r"^fencing (\S+): asking "
)  # one per real fence operation


@dataclass(frozen=True)
class LogEvent:
    t: float
    pe: str  # the host whose log it is
    what: str  # "start" | "fence"
    vm: str
    target: str = ""  # fenced host


def parse_line(host: str, event: dict) -> LogEvent | None:
    """One twisted.logger JSON event of a PE's ``--logfile`` -> a start or fence attempt."""
    try:
        from twisted.logger import formatEvent

        text = formatEvent(event)
    except Exception:
        return None
    t = float(event.get("log_time", 0.0))
    if m := _STARTED.match(text):
        return LogEvent(t, host, "start", m.group(1))
    if m := _REFUSED.match(text):
        return LogEvent(t, host, "start", m.group(1) or UNNAMED)
    if m := _FENCE_OPERATION.match(text):
        return LogEvent(t, host, "fence", "", m.group(1))
    return None


UNNAMED = (
    "(no ServerID)"  # a refusal before the PE knew which VM: a bad cookie, garbage
)


def log_events(
    host: str, path: Path, since: float = 0.0, until: float = float("inf")
) -> list[LogEvent]:
    return LogReader(host, path).read(since, until)


class LogReader:
    """Reads one PE's JSON-lines log incrementally: each ``read`` parses only what was
    appended since the last one (the log of a busy campaign grows to many MB)."""

    def __init__(self, host: str, path: Path) -> None:
        self.host, self.path, self.offset = host, path, 0

    def read(self, since: float = 0.0, until: float = float("inf")) -> list[LogEvent]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = (
            data.rfind(b"\n") + 1
        )  # a line still being written waits for the next read
        self.offset += end
        return self._parse(
            data[:end].decode(errors="replace").splitlines(), since, until
        )

    def _parse(self, lines: list[str], since: float, until: float) -> list[LogEvent]:
        events = []
        for line in lines:
            line = line.strip().lstrip(
                "\x1e"
            )  # jsonFileLogObserver separates records with RS
            if not line or (
                '"started ' not in line
                and '"refused ' not in line
                and "fenc" not in line.lower()
            ):
                continue  # most lines are neither: skip the JSON decoding
            try:
                event = json.loads(line)
            except ValueError:
                continue
            parsed = parse_line(self.host, event)
            if parsed is not None and since <= parsed.t <= until:
                events.append(parsed)
        return events


def check_attempts(
    events: list[LogEvent],
    backoff_s: float = 0.5,
    tolerance: float = 0.5,
    fence_window_s: float = 1.0,
    fence_tolerance: int = 0,
    unnamed: bool = True,
) -> list[str]:
    """Invariant (c) on the start and fence attempts of the PEs' logs. Refusals that name
    no VM (a cookie the PE could not read) count as attempts of one VM ``UNNAMED`` unless
    ``unnamed`` is false (the garbage kind sends such requests itself)."""
    found = []
    gap = backoff_s * (1 - tolerance)
    starts: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.what == "start" and (unnamed or e.vm != UNNAMED):
            starts.setdefault((e.vm, e.pe), []).append(e.t)
    hot: dict[
        str, dict[str, int]
    ] = {}  # VM -> PE -> attempts too close to the one before
    for (vm, pe), times in sorted(starts.items()):
        times.sort()
        close = sum(1 for a, b in zip(times, times[1:]) if b - a < gap)
        if close:
            hot.setdefault(vm, {})[pe] = close
    for vm, pes in hot.items():
        on = ", ".join(f"{pe} {n}" for pe, n in pes.items())
        found.append(
            f"start attempts: {vm}: {sum(pes.values())} less than {gap:.2f} s after the one before on the same PE ({on})"
        )
    per_pe: dict[
        tuple[str, str], list[float]
    ] = {}  # (PE, target host) -> fence operations
    for e in events:
        if e.what == "fence":
            per_pe.setdefault((e.pe, e.target), []).append(e.t)
    for (pe, target), times in sorted(per_pe.items()):
        operations = sorted(times)
        worst = max(
            sum(1 for u in operations if t <= u < t + fence_window_s)
            for t in operations
        )
        if worst > 1 + fence_tolerance:
            found.append(
                f"fence attempts: {pe} fenced {target} {worst} times within {fence_window_s:.1f} s"
            )
    return found


# ------------------------------------------------------------------ report


@dataclass
class Report:
    kinds: dict[str, dict] = field(default_factory=dict)
    violations: list[dict] = field(default_factory=list)

    def add_trial(
        self, trial: Trial, recovery_s: float | None, violations: list[str]
    ) -> None:
        entry = self.kinds.setdefault(
            trial.kind, {"trials": 0, "violations": 0, "recovery_s": []}
        )
        entry["trials"] += 1
        entry["violations"] += len(violations)
        if recovery_s is not None:
            entry["recovery_s"].append(round(recovery_s, 3))
        for what in violations:
            self.violations.append(
                {"kind": trial.kind, "seed": trial.seed, "what": what}
            )

    def add_violation(self, trial: Trial, what: str) -> None:
        """A violation found after ``trial`` was recorded (it left the bed broken)."""
        self.kinds.setdefault(
            trial.kind, {"trials": 0, "violations": 0, "recovery_s": []}
        )["violations"] += 1
        self.violations.append({"kind": trial.kind, "seed": trial.seed, "what": what})

    @property
    def trials(self) -> int:
        return sum(k["trials"] for k in self.kinds.values())

    def as_json(self) -> dict:
        return {
            "trials": self.trials,
            "kinds": self.kinds,
            "violations": self.violations,
        }

    def table(self):
        from rich.table import Table

        table = Table(
            title=f"xenpool chaos: {self.trials} trials, {len(self.violations)} violations"
        )
        for column in (
            "kind",
            "trials",
            "violations",
            "recovered",
            "recovery median",
            "recovery max",
        ):
            table.add_column(column, justify="left" if column == "kind" else "right")
        for kind, k in self.kinds.items():
            rec = k["recovery_s"]
            style = "red" if k["violations"] else "green"
            table.add_row(
                kind,
                str(k["trials"]),
                f"[{style}]{k['violations']}[/{style}]",
                f"{len(rec)}/{k['trials']}",
                f"{statistics.median(rec):.2f} s" if rec else "-",
                f"{max(rec):.2f} s" if rec else "-",
            )
        return table
