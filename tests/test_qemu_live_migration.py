"""A planned move of a real guest by live migration over its shared NBD disk (QEMU bed,
two hosts, one guest whose export takes two clients). The test acts as the rebalancing
leader (as in test_live_migration_e2e.py): it takes the target PE's VmReport with its
migration URI and asks the source PE to move the guest there. Checked on the console: one
boot, the sequence goes on without a gap; on the hypervisors: the guest runs on the target
only; and the keeper follows."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from xenpool.config import secret_file
from xenpool.protocol import framing
from xenpool.protocol import session as S
from xenpool.tools import qemubed
from xenpool.tools.qemubed import (
    PE_PORT,
    QemuBed,
    lives,
    max_writers,
    nbd_events,
    wait_until,
)


def ask(address: str, message, timeout: float = 90.0):
    with socket.create_connection((address, PE_PORT), timeout=timeout) as sock:
        sock.sendall(framing.frame_message(message))
        stream = framing.ShimStream()
        while (item := stream.next_message()) is None:
            data = sock.recv(65536)
            assert data, "the PE closed the session"
            stream.feed(data)
        return item[1]


@pytest.mark.slow
def test_a_planned_move_live_migrates_a_guest_over_its_nbd_disk():
    reason = qemubed.missing()
    if reason:
        pytest.skip(f"QEMU bed: {reason}")
    root = Path(tempfile.mkdtemp(prefix="xq-lm-"))
    root.chmod(0o755)
    try:
        with QemuBed(root, hosts=2, vms=1, live=("vm1",)) as bed:
            bed.wait_all_writing(180)
            source = bed.where()["vm1"]
            target = next(h for h in bed.hosts.values() if h is not source)
            report = ask(target.address, S.VmQuery(1))
            assert report.migration is not None, report
            issued = int(time.time())
            mac = S.move_request_mac(
                secret_file(str(bed.dir / "secret")),
                1,
                "vm1",
                target.n,
                report.migration,
                issued,
            )
            before = lives(bed.console("vm1"))[-1].synced[-1]
            answer = ask(
                source.address,
                S.MoveRequest(1, "vm1", target.n, mac, report.migration, issued),
            )
            assert answer.moved and "live-migrated" in answer.reason, answer
            wait_until(
                lambda: bed.where().get("vm1") is target, 60, "the keeper following"
            )
            wait_until(
                lambda: lives(bed.console("vm1"))[-1].synced[-1] > before + 5,
                60,
                "vm1 writing on the target",
                0.1,
            )
            assert len(lives(bed.console("vm1"))) == 1  # never booted again
            synced = lives(bed.console("vm1"))[0].synced
            assert synced == list(range(1, synced[-1] + 1))  # no gap, no repeat
            assert bed.running(target) == {"vm1"} and bed.running(source) == set()
            assert bed.qemu_pids(source) == []
            # the same disk, held by both QEMUs during the handover, by one since
            events = nbd_events(bed.nbd_log("vm1"))
            assert max_writers(events) == 2
            assert (
                sum(e.kind == "connect" for e in events)
                - sum(e.kind == "disconnect" for e in events)
                == 1
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
