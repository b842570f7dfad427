"""Planned moves of a real guest by live migration over its shared NBD disk (QEMU bed,
two hosts, one guest whose export takes two clients), asked for with the operator's
``xenpool`` command: ``vm move`` sends the guest's PE a MoveRequest (signed with the pool
secret) naming the target's migration URI, ``host drain`` does the same for every guest of
the host. Checked on the console: one boot, the sequence goes on without a gap; on the
hypervisors: the guest runs on the target only, the source runs no QEMU; on the storage:
both QEMUs held the disk during each handover, one since; and the keeper follows."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from xenpool.tools import qemubed
from xenpool.tools.qemubed import (
    Host,
    QemuBed,
    lives,
    max_writers,
    nbd_events,
    wait_until,
)


def _moved_live(bed: QemuBed, to: Host, off: Host, before: int) -> None:
    """vm1 runs on ``to`` in its first life, writing on past ``before`` without a gap;
    ``off`` runs no guest and no QEMU; the keeper follows."""
    wait_until(lambda: bed.where().get("vm1") is to, 60, "the keeper following")
    wait_until(
        lambda: lives(bed.console("vm1"))[-1].synced[-1] > before + 5,
        60,
        f"vm1 writing on {to.name}",
        0.1,
    )
    assert len(lives(bed.console("vm1"))) == 1  # never booted again
    assert lives(bed.console("vm1"))[0].found == 0
    synced = lives(bed.console("vm1"))[0].synced
    assert synced == list(range(1, synced[-1] + 1))  # no gap, no repeat
    assert bed.running(to) == {"vm1"} and bed.running(off) == set()
    assert bed.qemu_pids(off) == []


@pytest.mark.slow
def test_the_operators_move_and_drain_live_migrate_a_guest_over_its_nbd_disk():
    """``xenpool vm move vm1 --to HOST``, then ``xenpool host drain HOST`` (vm1 back),
    as an operator runs them on the pool's host against the registrar's status port:
    both are planned moves the PE does by live migration to the target's
    ``--migration-uri``."""
    reason = qemubed.missing()
    if reason:
        pytest.skip(f"QEMU bed: {reason}")
    root = Path(tempfile.mkdtemp(prefix="xq-mv-"))
    root.chmod(0o755)
    try:
        with QemuBed(root, hosts=2, vms=1, live=("vm1",), console=True) as bed:
            bed.wait_all_writing(180)
            source = bed.where()["vm1"]
            assert source is not None
            target = next(h for h in bed.hosts.values() if h is not source)

            before = lives(bed.console("vm1"))[-1].synced[-1]
            done = bed.xenpool("vm", "move", "vm1", "--to", target.name)
            assert done.returncode == 0, done.stderr
            assert f"vm1 moved to {target.name}: " in done.stdout, done.stdout
            assert "live-migrated" in done.stdout, done.stdout
            _moved_live(bed, target, source, before)

            before = lives(bed.console("vm1"))[-1].synced[-1]
            done = bed.xenpool("host", "drain", target.name)
            assert done.returncode == 0, done.stderr
            assert f"vm1 -> {source.name}: " in done.stdout, done.stdout
            assert "live-migrated" in done.stdout, done.stdout
            assert f"{target.name} is in maintenance" in done.stdout, done.stdout
            _moved_live(bed, source, target, before)
            hosts = {
                h["name"]: h for h in bed.status(bed.pool.address, "/pool")["hosts"]
            }
            assert hosts[target.name]["state"] == "maintenance", hosts

            # the same disk throughout: held by both QEMUs during each handover, by one
            # since; the guest read it once
            events = nbd_events(bed.nbd_log("vm1"))
            assert max_writers(events) == 2
            assert (
                sum(e.kind == "connect" for e in events)
                - sum(e.kind == "disconnect" for e in events)
                == 1
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
