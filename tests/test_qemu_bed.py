"""Real guests on three QEMU hosts with shared NBD disks (xenpool.tools.qemubed).

Every verdict comes from what the guests and the storage wrote, not from the daemons:
each guest's serial console (``found N`` at boot, ``synced N`` after each fsynced write),
its disk image, and nbdkit's log of connections to its export (``limit=1``: one client at
a time). The keeper's status page only says where to look.

One bed for the module (about 15 s to bring up here); the scenarios run in file order and
each leaves the bed whole again (a host powered off is powered on).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from xenpool.tools import qemubed
from xenpool.tools.qemubed import (
    QemuBed,
    disk_number,
    lives,
    max_writers,
    nbd_events,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bed():
    reason = qemubed.missing()
    if reason:
        pytest.skip(f"QEMU bed: {reason}")
    root = Path(tempfile.mkdtemp(prefix="xq-"))  # libvirtd and QEMU run as nobody:
    root.chmod(0o755)  # pytest's own tmp dirs are root's alone
    try:
        with QemuBed(root) as bed:
            bed.wait_all_writing(180)
            yield bed
    finally:
        shutil.rmtree(root, ignore_errors=True)


def busiest(bed: QemuBed):
    placed = bed.where()
    host = max(bed.hosts.values(), key=lambda h: sum(p is h for p in placed.values()))
    return host, sorted(vm for vm, p in placed.items() if p is host)


def last_synced(bed: QemuBed, vm: str) -> int:
    return lives(bed.console(vm))[-1].synced[-1]


def wait_new_lives(bed: QemuBed, vms: list[str], boots: dict[str, int], timeout=180):
    """Until each guest of ``vms`` booted again and synced a write in its new life."""

    def back():
        return all(
            len(ls := lives(bed.console(vm))) > boots[vm] and ls[-1].synced
            for vm in vms
        )

    wait_until(back, timeout, f"{vms} booted again and writing", 0.1)


def check_disks(bed: QemuBed, vms: list[str], before: dict[str, int], off_at: float):
    """Each guest found at least what it had synced before; the old QEMU's connection
    ended before the new one connected, and the export never had two clients."""
    for vm in vms:
        new = lives(bed.console(vm))[-1]
        assert new.found is not None and new.found >= before[vm], (vm, new, before)
        assert new.synced[0] == new.found + 1
        events = nbd_events(bed.nbd_log(vm))
        assert max_writers(events) == 1, events
        connects = [e for e in events if e.kind == "connect" and e.at > off_at]
        assert connects, f"{vm}: no connection after the fault"
        # the disconnect of every earlier connection precedes the new one's connect
        earlier = {
            e.connection for e in events if e.kind == "connect" and e.at < off_at
        }
        gone_at = {e.connection: e.at for e in events if e.kind == "disconnect"}
        assert earlier <= set(gone_at), (vm, earlier, gone_at)
        assert all(gone_at[c] <= connects[0].at for c in earlier)


def test_a_keeper_restart_restarts_no_guest(bed):
    placed = bed.where()
    pids = {h.name: sorted(bed.qemu_pids(h)) for h in bed.hosts.values()}
    boots = {vm: len(lives(bed.console(vm))) for vm in bed.vm_names}
    bed.stop_keeper(qemubed.signal.SIGKILL)
    marks = {vm: last_synced(bed, vm) for vm in bed.vm_names}
    bed.start_keeper()
    wait_until(
        lambda: bed.where() == placed, 60, "the keeper holding every guest again", 0.1
    )
    wait_until(
        lambda: all(last_synced(bed, vm) >= marks[vm] + 5 for vm in bed.vm_names),
        60,
        "every guest still writing",
        0.1,
    )
    assert {vm: len(lives(bed.console(vm))) for vm in bed.vm_names} == boots
    assert {h.name: sorted(bed.qemu_pids(h)) for h in bed.hosts.values()} == pids
    for vm in bed.vm_names:
        assert max_writers(nbd_events(bed.nbd_log(vm))) == 1
        synced = [n for life in lives(bed.console(vm)) for n in life.synced]
        assert synced == list(range(synced[0], synced[-1] + 1))  # no gap, no repeat


def test_the_storage_refuses_a_second_qemu_on_a_disk_in_use(bed):
    import libvirt

    placed = bed.where()
    vm = bed.vm_names[0]
    owner = placed[vm]
    other = next(h for h in bed.hosts.values() if h is not owner)
    conn = libvirt.open(owner.uri)
    xml = conn.lookupByName(vm).XMLDesc(0)
    conn.close()
    xml = re.sub(r"<name>[^<]*</name>", "<name>intruder</name>", xml, count=1)
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml, count=1)
    xml = re.sub(r"<serial.*?</serial>|<console.*?</console>", "", xml, flags=re.S)
    refused_before = sum(e.kind == "refused" for e in nbd_events(bed.nbd_log(vm)))
    mark = last_synced(bed, vm)
    conn = libvirt.open(other.uri)
    try:
        # QEMU cannot open its disk ("Failed to read initial magic", or only "qemu
        # unexpectedly closed the monitor"): nbdkit's log below says why
        with pytest.raises(libvirt.libvirtError):
            conn.createXML(xml, 0)
        assert "intruder" not in bed.running(other)
    finally:
        conn.close()
    refused = sum(e.kind == "refused" for e in nbd_events(bed.nbd_log(vm)))
    assert refused > refused_before  # nbdkit's limit filter turned it away
    assert max_writers(nbd_events(bed.nbd_log(vm))) == 1
    wait_until(lambda: last_synced(bed, vm) > mark + 2, 30, f"{vm} writing on", 0.1)
    assert len(lives(bed.console(vm))) == 1


def test_a_powered_off_hosts_guests_boot_elsewhere_with_every_synced_write(bed):
    host, moved = busiest(bed)
    assert moved
    boots = {vm: len(lives(bed.console(vm))) for vm in moved}
    off_at = time.time()
    qemus = bed.qemu_pids(host)
    assert len(qemus) == len(moved)
    bed.power_off(host)  # returns once every process of the host is gone
    before = {vm: last_synced(bed, vm) for vm in moved}
    wait_new_lives(bed, moved, boots)
    placed = bed.where()
    for vm in moved:
        assert placed[vm] is not None and placed[vm] is not host
        assert vm in bed.running(placed[vm])
    check_disks(bed, moved, before, off_at)
    bed.power_on(host)
    assert bed.running(host) == set()
    wait_until(
        lambda: all(disk_number(bed.image(vm)) > before[vm] for vm in moved),
        30,
        "the disks moving on",
    )


def test_a_frozen_host_is_fenced_and_its_guests_run_once_elsewhere(bed):
    bed.wait_all_writing(120)
    host, moved = busiest(bed)
    boots = {vm: len(lives(bed.console(vm))) for vm in moved}
    frozen = bed.freeze(host)  # PE, libvirtd and QEMU stopped: silent, nothing reset
    off_at = time.time()
    before = {vm: last_synced(bed, vm) for vm in moved}
    wait_new_lives(bed, moved, boots)
    # fenced through the PEs' --stonith command: every frozen process is gone
    assert all(qemubed._gone(pid) for pid in frozen)
    check_disks(bed, moved, before, off_at)
    bed.power_on(host)
    assert bed.running(host) == set()  # its old guests do not come back with it
    for vm in moved:
        owners = [h for h in bed.hosts.values() if vm in bed.running(h)]
        assert len(owners) == 1, (vm, owners)


def test_a_host_cut_off_the_network_is_fenced_and_its_disks_freed_at_the_storage(bed):
    """No FIN ever reaches nbdkit from a host whose link is cut: its QEMUs' connections stay
    open there, and limit=1 would refuse every new QEMU. The fence (power off, then the
    host's connections dropped at the storage) frees the exports."""
    bed.wait_all_writing(120)
    host, moved = busiest(bed)
    boots = {vm: len(lives(bed.console(vm))) for vm in moved}
    cut_at = time.time()
    bed.cut_link(host)
    wait_new_lives(bed, moved, boots)
    assert not [p for p in qemubed.netns_pids(host.netns) if not qemubed._gone(p)]
    before = {vm: lives(bed.console(vm))[boots[vm] - 1].synced[-1] for vm in moved}
    check_disks(bed, moved, before, cut_at)
    for vm in moved:  # the old connections ended at the fence, not at the cut
        events = nbd_events(bed.nbd_log(vm))
        old = {e.connection for e in events if e.kind == "connect" and e.at < cut_at}
        ends = [e.at for e in events if e.kind == "disconnect" and e.connection in old]
        assert max(ends) - cut_at >= bed.heartbeat[1] * 0.5, (vm, max(ends) - cut_at)
    bed.power_on(host)
    assert bed.running(host) == set()
