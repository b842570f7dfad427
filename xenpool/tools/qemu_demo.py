"""``xenpool demo --qemu``: the demo with real guests (root; a few minutes here).

Three QEMU hosts, three tiny guests each writing a sequence number to its NBD disk
(xenpool.tools.qemubed). Shows every guest's host and last synced number once a second,
powers off the host running most guests, and shows them boot elsewhere and carry on from
the number they find on their disks.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .qemubed import QemuBed, lives, missing


def _line(bed: QemuBed, t0: float) -> str:
    placed = bed.where()
    cells = []
    for vm in bed.vm_names:
        ls = lives(bed.console(vm))
        last = ls[-1].synced[-1] if ls and ls[-1].synced else "-"
        host = placed.get(vm)
        cells.append(
            f"{vm}@{host.name if host else '(moving)'} boot {len(ls)} last synced {last}"
        )
    return f"{time.monotonic() - t0:6.1f} s  " + " | ".join(cells)


def run(watch_s: float = 5.0) -> int:
    reason = missing()
    if reason:
        print(f"xenpool demo --qemu cannot run here: {reason}")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="xq-demo-"))
    workdir.chmod(0o755)  # libvirtd and QEMU run as nobody
    t0 = time.monotonic()
    try:
        print(
            "starting 3 hypervisor hosts (network namespace, libvirtd, QEMU without KVM, "
            "xenpool-pe each), nbdkit with one export per guest (one client at a time), "
            "a registrar and a keeper of 3 guests ..."
        )
        with QemuBed(workdir) as bed:
            print(f"bed up in {time.monotonic() - t0:.1f} s; the guests boot ...")
            bed.wait_all_writing(240)
            print("every guest writes (its number, fsync, then the console line):")
            end = time.monotonic() + watch_s
            while time.monotonic() < end:
                print(_line(bed, t0), flush=True)
                time.sleep(1)
            placed = bed.where()
            host = max(
                bed.hosts.values(), key=lambda h: sum(p is h for p in placed.values())
            )
            moved = sorted(vm for vm, p in placed.items() if p is host)
            boots = {vm: len(lives(bed.console(vm))) for vm in moved}
            off = time.monotonic()
            bed.power_off(host)
            last = {vm: lives(bed.console(vm))[-1].synced[-1] for vm in moved}
            print(
                f"POWER OFF {host.name} (every process killed, link down): its guests "
                + ", ".join(f"{vm} had synced {last[vm]}" for vm in moved)
            )
            back: dict[str, float] = {}
            deadline = time.monotonic() + 300
            while len(back) < len(moved) and time.monotonic() < deadline:
                print(_line(bed, t0), flush=True)
                for vm in moved:
                    ls = lives(bed.console(vm))
                    if len(ls) > boots[vm] and ls[-1].synced and vm not in back:
                        back[vm] = time.monotonic() - off
                time.sleep(1)
            placed = bed.where()
            for vm in moved:
                if vm not in back:
                    print(f"{vm}: NOT back within 300 s")
                    continue
                new = lives(bed.console(vm))[-1]
                assert new.found is not None  # a guest prints found before synced
                verdict = "nothing lost" if new.found >= last[vm] else "WRITES LOST"
                now = placed.get(vm)
                where = now.name if now else "?"
                print(
                    f"{vm}: booted on {where}, found {new.found} on its disk "
                    f"(had synced {last[vm]}): {verdict}; writing again "
                    f"{back[vm]:.1f} s after the power-off"
                )
            for _ in range(3):
                print(_line(bed, t0), flush=True)
                time.sleep(1)
            print("stopping everything")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0
