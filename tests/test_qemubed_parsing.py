"""What the QEMU bed reads back: guest consoles, disk images, nbdkit's log (no root)."""

from __future__ import annotations

from xenpool.tools import qemubed
from xenpool.tools.bench_failover_qemu import summarize
from xenpool.tools.qemubed import (
    Life,
    NbdEvent,
    disk_number,
    initramfs,
    lives,
    max_writers,
    nbd_events,
)


def test_a_console_splits_into_boots_with_what_each_found_and_synced(tmp_path):
    console = tmp_path / "vm1.log"
    console.write_text(
        "[    0.000000] ACPI BIOS Error\r\nxenpool-guest booted\r\nfound 0\r\nsynced 1\r\n"
        "synced 2\r\nsynced 3\r\nxenpool-guest booted\r\nfound 3\r\nsynced 4\r\nsyn"
    )
    assert lives(console) == [Life(0, [1, 2, 3]), Life(3, [4])]
    assert lives(tmp_path / "none.log") == []


def test_the_disk_number_is_read_from_the_first_bytes_of_the_image(tmp_path):
    image = tmp_path / "vm1.img"
    image.write_bytes(bytes(1024))
    assert disk_number(image) == 0
    image.write_bytes(b"xenpool-seq 42\n" + bytes(497))
    assert disk_number(image) == 42


def test_nbdkit_log_events_and_the_most_clients_at_once(tmp_path):
    log = tmp_path / "vm1.nbd.log"
    log.write_text(
        "2026-12-05 17:40:55.940484 Ready thread_model=3\n"
        "2026-12-05 17:40:57.055650 Preconnect id=1 readonly=0 ...\n"
        "2026-12-05 17:40:57.055675 ...Preconnect id=1 return=0\n"
        "2026-12-05 17:40:57.786895 connection=1 Connect export=vm1 tls=0 size=0x100000\n"
        "2026-12-05 17:40:58.000000 connection=1 Write id=1 offset=0x0 count=0x200 ...\n"
        "2026-12-05 17:41:10.790638 ...Preconnect id=2 return=-1 error=EINVAL\n"
        "2026-12-05 17:41:10.797731 connection=1 Disconnect transactions=1\n"
        "2026-12-05 17:41:11.000000 connection=2 Connect export=vm1 tls=0\n"
    )
    events = nbd_events(log)
    assert [(e.kind, e.connection) for e in events] == [
        ("connect", 1),
        ("refused", None),
        ("disconnect", 1),
        ("connect", 2),
    ]
    assert events[0].at == 1796492457.786895  # UTC, as the bed runs nbdkit
    assert max_writers(events) == 1
    overlapping = [
        NbdEvent(1.0, "connect", 1),
        NbdEvent(2.0, "connect", 2),
        NbdEvent(3.0, "disconnect", 1),
    ]
    assert max_writers(overlapping) == 2


def test_the_initramfs_is_a_newc_archive_the_kernel_unpacks(tmp_path):
    import gzip

    data = gzip.decompress(initramfs({"init": (0o100755, b"#!/bin/sh\n")}))
    assert data.startswith(b"070701") and b"init\0" in data and b"TRAILER!!!" in data


def test_the_fence_command_refuses_an_unknown_namespace(capsys):
    assert qemubed.main(["fence", "xq-no-such-netns"]) == 1
    assert qemubed.main(["off"]) == 2


def test_the_bench_summary_gives_medians_maxima_and_lost_writes():
    sample = {
        "detect_s": 0.1,
        "fence_s": 0.5,
        "start_s": 1.0,
        "guest_up_s": 10.0,
        "first_write_s": 10.5,
        "lost_writes": 0,
        "max_clients": 1,
        "old_closed_s": 0.01,
    }
    summary = summarize([sample, {**sample, "guest_up_s": 20.0, "fence_s": None}], 2)
    assert summary["trials"] == 2 and summary["guest_up_s"] == 15.0
    assert summary["fence_s"] == 0.5 and summary["max"]["guest_up_s"] == 20.0
    assert summary["lost_writes_total"] == 0
    assert summary["exports_with_two_clients"] == 0
