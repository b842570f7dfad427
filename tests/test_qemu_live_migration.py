"""Planned moves of real guests by live migration over their shared NBD disks (QEMU
bed, two hosts, guests whose exports take two clients). Asked for with the operator's
``xenpool`` command: ``vm move`` sends the guest's PE a MoveRequest (signed with the pool
secret) naming the target's migration URI, ``host drain`` does the same for every guest
of the host. Planned by the pool itself: the ``--rebalance plan`` leader moves a guest to
a host that joined empty. Checked on the console: one boot, the sequence goes on without
a gap; on the hypervisors: the guest runs on the target only, the source runs no QEMU for
it; on the storage: both QEMUs held the disk during each handover, one since; and the
keeper follows."""

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


def _log(path: Path) -> list[str]:
    from twisted.logger import eventsFromJSONLogFile, formatEvent

    with open(path, encoding="utf-8") as f:
        return [formatEvent(e) for e in eventsFromJSONLogFile(f)]


@pytest.mark.slow
def test_the_leaders_plan_live_migrates_a_guest_to_an_empty_host():
    """Every PE runs ``--rebalance plan``; both guests are placed on host1 while host2's
    PE is not started. Once host2 joins, the leader (host1, the lowest PE identifier)
    gathers the VmReports, plans one move to host2 (by the guests' measured CPU) and
    makes it by live migration to host2's ``--migration-uri``; the other guest stays."""
    reason = qemubed.missing()
    if reason:
        pytest.skip(f"QEMU bed: {reason}")
    root = Path(tempfile.mkdtemp(prefix="xq-rb-"))
    root.chmod(0o755)
    try:
        with QemuBed(
            root,
            hosts=2,
            vms=2,
            live=("vm1", "vm2"),
            rebalance=True,
            later=("host2",),
        ) as bed:
            host1, host2 = bed.hosts["host1"], bed.hosts["host2"]
            bed.wait_all_writing(180)
            assert all(h is host1 for h in bed.where().values())
            before = {
                vm: lives(bed.console(vm))[-1].synced[-1] for vm in ("vm1", "vm2")
            }

            bed.start_pe(host2)

            def one_on_host2():
                placed = bed.where()
                return placed if any(h is host2 for h in placed.values()) else None

            placed = wait_until(
                one_on_host2, 60, "the leader's planned move to host2", 0.1
            )
            moved = next(vm for vm, h in placed.items() if h is host2)
            stays = next(vm for vm, h in placed.items() if h is not host2)
            assert placed[stays] is host1
            for vm in ("vm1", "vm2"):
                wait_until(
                    lambda vm=vm: (
                        lives(bed.console(vm))[-1].synced[-1] > before[vm] + 5
                    ),
                    60,
                    f"{vm} writing on",
                    0.1,
                )
                assert len(lives(bed.console(vm))) == 1  # never booted again
                synced = lives(bed.console(vm))[0].synced
                assert synced == list(range(1, synced[-1] + 1))  # no gap, no repeat
            assert bed.running(host2) == {moved} and bed.running(host1) == {stays}
            assert len(bed.qemu_pids(host1)) == 1
            leader = _log(bed.pe_log(host1))
            assert any(
                f"moving {moved} from PE {host1.pe_id} to PE {host2.pe_id} (planned)"
                in line
                for line in leader
            ), leader
            assert any(f"{moved} live-migrated to host2" in line for line in leader)
            events = nbd_events(bed.nbd_log(moved))
            assert max_writers(events) == 2
            assert (
                sum(e.kind == "connect" for e in events)
                - sum(e.kind == "disconnect" for e in events)
                == 1
            )
            assert max_writers(nbd_events(bed.nbd_log(stays))) == 1
            assert bed.where() == placed  # one move: the plan settled
    finally:
        shutil.rmtree(root, ignore_errors=True)
