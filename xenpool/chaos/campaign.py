"""The campaign: a seeded schedule of trials against one :class:`TestBed`.

Each trial: bring the pool to steady state (every VM running on one host and heartbeated,
both registrars knowing every PE), inject the fault, hold it for the trial's random
duration, heal it (flush the partitions, continue stopped PEs, power on every host whose
PE is gone), and wait up to ``--recovery-bound`` seconds for invariants (b) and (d) to
hold again: the recovery time is from the heal to the first round in which they hold.
Invariant (a) is checked in every round throughout (a monitor thread polls every
daemon's status port every ``--poll`` seconds), invariant (c) on the PEs' logs after the
trial.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .bed import TestBed
from .faults import FAULTS, Fault
from .model import (
    KINDS,
    RUNNING_STATES_EXCLUDED,
    Checker,
    HostView,
    LogReader,
    Report,
    Round,
    Trial,
    check_attempts,
    schedule,
)


class Monitor(threading.Thread):
    """Polls every status port each ``interval`` seconds; feeds the checker."""

    def __init__(self, bed: TestBed, checker: Checker, interval: float = 0.3) -> None:
        super().__init__(daemon=True, name="chaos-monitor")
        self.bed, self.checker, self.interval = bed, checker, interval
        self.lock = threading.Lock()
        self.latest: Round | None = None
        self.found: list[str] = []
        self._halt = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=len(bed.nodes) + 2)

    def _pe(self, node):
        try:
            status = node.status("/status", timeout=1.0)
        except (OSError, ValueError):
            return None
        domains = {
            name
            for name, d in status.get("domains", {}).items()
            if d.get("state") not in RUNNING_STATES_EXCLUDED
        }
        return domains, bool(status.get("registered"))

    def _json(self, node, path):
        try:
            return node.status(path, timeout=1.0)
        except (OSError, ValueError):
            return None

    def poll(self) -> Round:
        bed = self.bed
        t = time.monotonic()
        pes = {pe.name: self.pool.submit(self._pe, pe) for pe in bed.pes}
        keeper = self.pool.submit(self._json, bed.keeper, "/vms")
        regs = {
            r.name: self.pool.submit(self._json, r, "/handlespace")
            for r in bed.registrars
        }
        hosts = {}
        for pe in bed.pes:
            answer = pes[pe.name].result()
            alive = pe.alive()  # after the answer: a host fenced meanwhile runs nothing
            process = pe.proc.pid if pe.proc is not None else 0
            hosts[pe.name] = HostView(
                alive,
                answer[0] if answer else None,
                bool(answer and answer[1]),
                pe.extra["pe_id"],
                process,
            )
        registrars = {}
        for name, future in regs.items():
            state = future.result()
            registrars[name] = (
                None
                if state is None
                else {
                    f"{pe['identifier']:#010x}"
                    for pool in state["pools"]
                    for pe in pool["pool_elements"]
                }
            )
        return Round(t, hosts, keeper.result(), registrars)

    def run(self) -> None:
        while not self._halt.is_set():
            rnd = self.poll()
            with self.lock:
                self.found += self.checker.feed(rnd)
                self.latest = rnd
            self._halt.wait(self.interval)

    def take(self) -> list[str]:
        with self.lock:
            found, self.found = self.found, []
        return found

    def round_after(self, t: float, timeout: float = 10.0) -> Round:
        """The first round polled after monotonic time ``t``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.latest is not None and self.latest.t > t:
                    return self.latest
            time.sleep(0.05)
        raise RuntimeError("the monitor is stuck")

    def where(self) -> dict[str, list[str]]:
        with self.lock:
            return self.checker.where(self.latest) if self.latest else {}

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.pool.shutdown(wait=False, cancel_futures=True)


def settle(
    bed: TestBed, monitor: Monitor, timeout: float, whole: bool = False
) -> tuple[float | None, list[str]]:
    """Wait until (b) and (d) hold, powering on dead hosts meanwhile; (seconds, last problems).
    ``whole``: also until every host is up and known to every registrar (before a trial)."""
    start = time.monotonic()
    problems = ["not polled yet"]
    while time.monotonic() - start < timeout:
        bed.power_on_dead()
        rnd = monitor.round_after(time.monotonic())
        with monitor.lock:
            problems = monitor.checker.settled(rnd)
        every_pe = {pe.extra["pe_id"] for pe in bed.pes}
        if (
            not problems
            and all(v.registered for v in rnd.hosts.values() if v.alive or whole)
            and (
                not whole
                or all(
                    known is not None and every_pe <= known
                    for known in rnd.registrars.values()
                )
            )
        ):  # (whole: every host up and known to every registrar, a whole pool)
            return rnd.t - start, []
    return None, problems


def steady(bed: TestBed, monitor: Monitor, args, say) -> list[str]:
    """Bring the bed to steady state before a trial; what kept it from getting there
    (violations of the trial before, which left it so)."""
    violations: list[str] = []
    took, problems = settle(bed, monitor, args.steady_timeout, whole=True)
    if took is None:
        # What the last trial left broken would fail every later one: start over from a
        # first placement (keeper state wiped, every host power-cycled).
        violations.append(
            f"still broken {args.steady_timeout:.0f} s later, before the next trial: {'; '.join(problems[:5])}"
        )
        say(f"no steady state ({'; '.join(problems[:3])}): resetting the bed")
        bed.reset()
        took, problems = settle(bed, monitor, args.steady_timeout, whole=True)
        if took is None:
            violations.append(
                f"no steady state even after a reset of the bed: {'; '.join(problems[:5])}"
            )
    return violations + monitor.take()


def run_trial(
    bed: TestBed, monitor: Monitor, trial, args, say, logs: dict[str, LogReader]
) -> tuple[float | None, list[str]]:
    violations: list[str] = []
    for reader in logs.values():
        reader.read()  # skip what came before this trial
    t0 = time.time()
    fault = Fault(
        bed, random.Random(trial.seed), trial.hold_s, monitor.where, monitor.round_after
    )
    heal = FAULTS[trial.kind](fault)
    time.sleep(trial.hold_s)
    heal()
    bed.heal_network()
    recovery, problems = settle(bed, monitor, args.recovery_bound)
    if recovery is None:
        violations.append(
            f"not recovered {args.recovery_bound:.0f} s after the fault ended: {'; '.join(problems[:6])}"
        )
    violations += fault.violations
    violations += monitor.take()
    events = [e for reader in logs.values() for e in reader.read(since=t0 - 0.5)]
    violations += check_attempts(
        events,
        backoff_s=args.backoff,
        fence_tolerance=args.fence_tolerance,
        unnamed=trial.kind != "garbage",
    )
    say(
        f"{trial.kind} #{trial.index} seed {trial.seed} ({', '.join(fault.notes) or '-'}; held {trial.hold_s:.1f} s): "
        + (
            f"recovered in {recovery:.2f} s"
            if recovery is not None
            else "NOT recovered"
        )
        + (f", {len(violations)} violations" if violations else "")
    )
    for v in violations:
        say(f"    violation: {v}")
    return recovery, violations


def run(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console

    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    try:
        plan = schedule(args.seed, kinds, args.trials)
    except ValueError as err:
        print(f"xenpool chaos: --kinds: {err}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            "xenpool chaos: needs root (network namespaces, veth pairs, iptables)",
            file=sys.stderr,
        )
        return 2
    console = Console(stderr=True)
    say = console.print if not args.quiet else (lambda *a, **k: None)
    report = Report()
    started = time.monotonic()
    workdir = (
        Path(args.workdir)
        if args.workdir
        else Path(tempfile.mkdtemp(prefix="xenpool-chaos-"))
    )
    say(
        f"xenpool chaos: seed {args.seed}, {len(plan)} trials of {len(kinds)} kinds, workdir {workdir}"
    )
    bed = TestBed(
        workdir,
        pes=args.pes,
        vms=args.vms,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout,
    )
    with bed:
        monitor = Monitor(bed, Checker(bed.vm_names), interval=args.poll)
        monitor.start()
        logs = {pe.name: LogReader(pe.name, bed.pe_log(pe.name)) for pe in bed.pes}
        try:
            took, problems = settle(bed, monitor, args.steady_timeout, whole=True)
            say(
                f"bed up on {bed.prefix}0/24: 2 registrars, {args.pes} PEs, a keeper of {args.vms} VMs; "
                + (
                    f"steady after {took:.1f} s"
                    if took is not None
                    else f"NOT steady: {problems[:3]}"
                )
            )
            previous = None
            for trial in plan:
                if args.budget and time.monotonic() - started > args.budget:
                    say(f"budget of {args.budget:.0f} s used up: no more trials")
                    break
                before = steady(bed, monitor, args, say)
                for what in before:
                    say(
                        f"    violation ({previous.kind if previous else 'bed start'}): {what}"
                    )
                    # a broken bed is the fault of the trial before (kind "bed": it never got steady)
                    report.add_violation(
                        previous or Trial("bed", 0, args.seed, 0.0), what
                    )
                if any("even after a reset" in what for what in before):
                    break
                recovery, violations = run_trial(bed, monitor, trial, args, say, logs)
                report.add_trial(trial, recovery, violations)
                previous = trial
        finally:
            monitor.stop()
    if args.json:
        print(json.dumps(report.as_json(), indent=1))
    else:
        Console().print(report.table())
        for v in report.violations:
            Console().print(f"[red]{v['kind']}[/red] seed {v['seed']}: {v['what']}")
    return 1 if report.violations else 0


def add_parser(sub) -> None:
    c = sub.add_parser(
        "chaos",
        help="fault-injection campaign against a real pool in network namespaces (root)",
    )
    c.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the schedule and every fault's choices",
    )
    c.add_argument("--trials", type=int, default=1, help="trials per kind (default 1)")
    c.add_argument(
        "--kinds",
        default="",
        help=f"comma-separated fault kinds (default all): {', '.join(KINDS)}",
    )
    c.add_argument(
        "--budget",
        type=float,
        default=0.0,
        metavar="S",
        help="start no trial after S seconds (0: no limit)",
    )
    c.add_argument("--pes", type=int, default=4, help="PE hosts (default 4)")
    c.add_argument(
        "--vms", type=int, default=8, help="VMs the keeper keeps (default 8)"
    )
    c.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="S")
    c.add_argument("--heartbeat-timeout", type=float, default=1.5, metavar="S")
    c.add_argument(
        "--recovery-bound",
        type=float,
        default=30.0,
        metavar="S",
        help="invariants (b) and (d) must hold this long after a fault ends (default 30)",
    )
    c.add_argument(
        "--steady-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="time for steady state before a trial; then the bed is reset (default 30)",
    )
    c.add_argument(
        "--poll",
        type=float,
        default=0.3,
        metavar="S",
        help="seconds between the monitor's rounds",
    )
    c.add_argument(
        "--backoff",
        type=float,
        default=0.5,
        metavar="S",
        help="the keeper's back-off for invariant (c) (its initial retry delay, default 0.5)",
    )
    c.add_argument(
        "--fence-tolerance",
        type=int,
        default=0,
        help="fences of one host by one PE beyond the first allowed within 2 s (default 0)",
    )
    c.add_argument(
        "--workdir",
        default=None,
        help="where logs and state go (default: a new temporary directory, kept)",
    )
    c.add_argument(
        "--json", action="store_true", help="print the result as one JSON object"
    )
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c.set_defaults(func=run)
