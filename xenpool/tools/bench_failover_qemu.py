"""``xenpool bench failover --qemu``: a host's power-off with real guests (root only).

One QEMU bed (xenpool.tools.qemubed: three hosts, three guests writing a sequence number
to their NBD disks). Each trial powers off the host running most guests (SIGKILL of all
its processes, then its link down) and times, from that moment, for each of its guests:

- ``detect_s``: the keeper reports the PE lost (its JSON log);
- ``fence_s``: the PE that takes the guest over has fenced the old host (its JSON log);
- ``start_s``: that PE has started the domain (libvirt's create returned; its JSON log);
- ``guest_up_s``: the guest's console shows it booted again (polled every 50 ms);
- ``first_write_s``: the console shows its first synced write after the boot;
- ``lost_writes``: synced writes before the power-off that the new boot did not find on
  the disk (the last ``synced N`` on the console minus the ``found M`` after the boot).

Each key is the median over all guests moved in all trials; the maxima and the number of
exports that ever had two clients at once (nbdkit's log) are reported too. The host is
powered on again before the next trial. The prototype took 64-167 s, guest boot included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .qemubed import QemuBed, lives, max_writers, missing, nbd_events, wait_until

PROTOTYPE_S = (64, 167)
KEYS = ("detect_s", "fence_s", "start_s", "guest_up_s", "first_write_s")


def _events(path: Path, since: float) -> list[tuple[float, str]]:
    from twisted.logger import eventsFromJSONLogFile, formatEvent

    try:
        with open(path, encoding="utf-8") as f:
            return [
                (e["log_time"], formatEvent(e))
                for e in eventsFromJSONLogFile(f)
                if e.get("log_time", 0) >= since
            ]
    except FileNotFoundError:
        return []


def _first(events: list[tuple[float, str]], text: str) -> float | None:
    return next((t for t, message in events if text in message), None)


def trial(bed: QemuBed, timeout: float = 300) -> list[dict]:
    """One power-off; a sample per guest moved."""
    bed.wait_all_writing(180)
    placed = bed.where()
    host = max(bed.hosts.values(), key=lambda h: sum(p is h for p in placed.values()))
    moved = sorted(vm for vm, p in placed.items() if p is host)
    boots = {vm: len(lives(bed.console(vm))) for vm in moved}
    down_at = time.time()
    bed.power_off(host)
    last = {vm: lives(bed.console(vm))[-1].synced[-1] for vm in moved}
    up: dict[str, float] = {}
    wrote: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(wrote) < len(moved):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{moved} not back within {timeout:.0f} s")
        now = time.time()
        for vm in moved:
            ls = lives(bed.console(vm))
            if len(ls) > boots[vm]:
                up.setdefault(vm, now)
                if ls[-1].synced:
                    wrote.setdefault(vm, now)
        time.sleep(0.05)
    keeper = _events(bed.keeper_log, down_at)
    samples = []
    for vm in moved:
        now_on = wait_until(lambda vm=vm: bed.where().get(vm), 30, f"{vm} placed")
        pe = _events(bed.pe_log(now_on), down_at)
        new = lives(bed.console(vm))[-1]
        samples.append(
            {
                "vm": vm,
                "from": host.name,
                "to": now_on.name,
                "detect_s": _rel(_first(keeper, f"{vm}: failing over"), down_at),
                "fence_s": _rel(_first(pe, f"before starting {vm}"), down_at),
                "start_s": _rel(_first(pe, f"started {vm} "), down_at),
                "guest_up_s": up[vm] - down_at,
                "first_write_s": wrote[vm] - down_at,
                "last_synced": last[vm],
                "found": new.found,
                "lost_writes": max(0, last[vm] - (new.found or 0)),
                "max_clients": max_writers(events := nbd_events(bed.nbd_log(vm))),
                "old_closed_s": _old_closed(events, down_at),
            }
        )
    bed.power_on(host)
    return samples


def _old_closed(events, down_at: float) -> float | None:
    """When the storage saw the powered-off QEMU's connection end (after ``down_at``):
    about 0 when the kernel closed it as QEMU died, about ``fence_s`` when the fence's
    storage cut had to drop it."""
    opened = {e.connection for e in events if e.kind == "connect" and e.at < down_at}
    closed = [
        e.at - down_at
        for e in events
        if e.kind == "disconnect" and e.connection in opened and e.at >= down_at
    ]
    return max(closed) if closed else None


def _rel(at: float | None, since: float) -> float | None:
    return None if at is None else at - since


def _f(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f} s"


def summarize(samples: list[dict], trials: int) -> dict:
    def median(key):
        values = [s[key] for s in samples if s[key] is not None]
        return round(statistics.median(values), 3) if values else None

    def most(key):
        values = [s[key] for s in samples if s[key] is not None]
        return round(max(values), 3) if values else None

    return {
        "trials": trials,
        **{key: median(key) for key in KEYS},
        "lost_writes": median("lost_writes"),
        "lost_writes_total": sum(s["lost_writes"] for s in samples),
        "max": {key: most(key) for key in KEYS},
        "guest_failovers": len(samples),
        "exports_with_two_clients": sum(s["max_clients"] > 1 for s in samples),
        "old_connection_closed_s": median("old_closed_s"),
        "prototype_s": list(PROTOTYPE_S),
    }


def run(args: argparse.Namespace) -> int:
    reason = missing()
    if reason:
        print(
            f"xenpool bench failover --qemu cannot run here: {reason}", file=sys.stderr
        )
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="xq-bench-"))
    workdir.chmod(0o755)  # libvirtd and QEMU run as nobody
    samples: list[dict] = []
    ok = False
    try:
        with QemuBed(
            workdir,
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_timeout_s=args.heartbeat_timeout,
        ) as bed:
            for n in range(1, args.trials + 1):
                got = trial(bed)
                samples += got
                for s in got:  # progress on stderr: --json keeps stdout one line
                    print(
                        f"trial {n}: {s['vm']} {s['from']} -> {s['to']}: detected "
                        f"{_f(s['detect_s'])}, fenced {_f(s['fence_s'])}, started "
                        f"{_f(s['start_s'])}, booted {_f(s['guest_up_s'])}, first "
                        f"write {_f(s['first_write_s'])}; synced {s['last_synced']}, "
                        f"found {s['found']}; old NBD connection closed "
                        f"{_f(s['old_closed_s'])}",
                        file=sys.stderr,
                        flush=True,
                    )
        ok = True
    finally:
        if ok or not args.keep_failed:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"the bed's files (logs, consoles, disks) are kept in {workdir}")
    summary = summarize(samples, args.trials)
    if args.json:
        print(json.dumps(summary))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"failover of real guests: {args.trials} host power-offs, "
        f"{len(samples)} guests moved (median / max, seconds after the power-off)"
    )
    for column in ("detected", "fenced", "started", "guest up", "first write"):
        table.add_column(column)
    table.add_row(*(f"{_f(summary[key])} / {_f(summary['max'][key])}" for key in KEYS))
    Console().print(table)
    print(
        f"synced writes lost: {summary['lost_writes_total']}; exports that had two "
        f"clients at once: {summary['exports_with_two_clients']}; the prototype took "
        f"{PROTOTYPE_S[0]}-{PROTOTYPE_S[1]} s"
    )
    return 0
