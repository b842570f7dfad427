"""End to end: a planned move by live migration between two real QEMU hypervisors.

Two libvirtd, each a separate hypervisor (its own sockets, state and QEMU processes: an
unprivileged "session" daemon run as nobody, with its own XDG directories), a registrar,
two PE daemons, a keeper. A tiny guest (Debian's kernel, a busybox initramfs, QEMU's
software CPU) boots on PE 1 and writes its uptime to a console file every second. The
test, acting as the rebalancing leader, takes PE 2's VmReport (with its migration URI)
and asks PE 1 to move the VM there. PE 1 live-migrates it; the keeper follows and PE 2
re-adopts it: the same domain, never restarted (one boot, uptime going on), nothing fenced.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from xenpool.protocol import session as S

from .daemons import Daemon, SessionClient, free_port

NOBODY = 65534
GUEST_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "xenpool-guest booted"
while true; do read up idle < /proc/uptime; echo "uptime $up"; /bin/busybox sleep 1; done
"""


def _missing() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root (runs each libvirtd as nobody)"
    for tool in ("libvirtd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/bootstrap.sh installs it as root)"
    busybox = Path("/bin/busybox")
    if (
        not busybox.is_file() or b"ld-linux" in busybox.read_bytes()[:8192]
    ):  # a dynamic one needs its libraries
        return "no static busybox (busybox-static)"
    if not _kernel():
        return "no kernel in /boot (linux-image-amd64)"
    return None


def _kernel() -> str | None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    return kernels[-1] if kernels else None


def initramfs(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A gzipped newc cpio archive of ``files`` ({path: (mode, content)}), what the kernel unpacks."""
    out = io.BytesIO()
    for ino, (name, (mode, data)) in enumerate(
        [*files.items(), ("TRAILER!!!", (0, b""))], start=1
    ):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))
    return gzip.compress(out.getvalue())


def wait_until(predicate, timeout: float, what: str):
    """Poll an outside process's state (a socket appearing, a console line)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        threading.Event().wait(0.1)
    return result


class Hypervisor:
    """One libvirtd in session mode, as nobody, under ``root``."""

    def __init__(self, root: Path) -> None:
        dirs = {key: root / key for key in ("run", "config", "cache", "home")}
        for path in dirs.values():
            path.mkdir(parents=True)
            os.chown(path, NOBODY, NOBODY)
        self.socket = dirs["run"] / "libvirt" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(dirs["home"]),
            "XDG_RUNTIME_DIR": str(dirs["run"]),
            "XDG_CONFIG_HOME": str(dirs["config"]),
            "XDG_CACHE_HOME": str(dirs["cache"]),
        }
        self.log = open(root / "libvirtd.log", "wb")
        self.process = subprocess.Popen(
            ["libvirtd"],
            env=env,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd=root,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self.socket.exists, 20, f"libvirtd socket {self.socket}")

    def stop(self) -> None:
        import libvirt

        try:
            conn = libvirt.open(self.uri)
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                dom.destroy()  # its QEMU process would outlive the daemon
            conn.close()
        except libvirt.libvirtError:
            pass
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def hypervisors():
    reason = _missing()
    if reason:
        pytest.skip(f"live migration end to end: {reason}")
    root = Path(
        tempfile.mkdtemp(prefix="xp-lm-")
    )  # short: the sockets' paths must fit 108 bytes
    root.chmod(0o755)
    shutil.copy(_kernel(), root / "vmlinuz")
    init = GUEST_INIT.encode()
    (root / "initrd.gz").write_bytes(
        initramfs(
            {
                "bin": (0o040755, b""),
                "proc": (0o040755, b""),
                "dev": (0o040755, b""),
                "bin/busybox": (0o100755, Path("/bin/busybox").read_bytes()),
                "init": (0o100755, init),
            }
        )
    )
    console = (
        root / "console.log"
    )  # both hosts append to it: one boot and the uptime going on
    console.touch()
    os.chown(console, NOBODY, NOBODY)
    template = (
        Path(__file__)
        .with_name("domain-tcg-guest.xml")
        .read_text()
        .replace("@ROOT@", str(root))
        .replace("@CONSOLE@", str(console))
    )
    (root / "domain.xml").write_text(template)
    started = []
    try:
        for name in ("hv1", "hv2"):
            started.append(Hypervisor(root / name))
        started[0].root, started[0].console = root, console
        yield started
    finally:
        for hv in started:
            hv.stop()
        shutil.rmtree(root, ignore_errors=True)


def uptimes(console: Path) -> list[float]:
    return [
        float(u)
        for u in re.findall(r"uptime ([0-9.]+)", console.read_text(errors="replace"))
    ]


@pytest.mark.slow
def test_a_planned_move_live_migrates_a_running_guest_and_the_keeper_follows(
    hypervisors, tmp_path
):
    import libvirt

    from xenpool_plugins.hypervisor_libvirt import stable_uuid

    hv1, hv2 = hypervisors
    root, console = hv1.root, hv1.console
    (tmp_path / "vms.conf").write_text("[vm vm1]\nram = 96\n")
    asap = free_port()
    daemons = [
        Daemon(
            "xenpool-registrar",
            f"--asap=tcp:{asap}:interface=127.0.0.1",
            ready="started",
            cwd=tmp_path,
        )
    ]

    def start_pe(n: int, hv: Hypervisor) -> Daemon:
        pe = Daemon(
            "xenpool-pe",
            f"--registrar=tcp:host=127.0.0.1:port={asap}",
            f"--pe-id={n}",
            f"--port={free_port()}",
            "--bind=127.0.0.1",
            f"--host=host{n}",
            f"--libvirt-uri={hv.uri}",
            f"--migration-uri={hv.uri}",
            f"--domain-template={root / 'domain.xml'}",
            f"--status=tcp:{free_port()}:interface=127.0.0.1",
            "--load-plugin=max",
            ready="registered in pool Xen",
            cwd=tmp_path,
        )
        pe.port = int(next(a for a in pe.argv if a.startswith("--port=")).split("=")[1])
        pe.status = next(a for a in pe.argv if a.startswith("--status=")).split(":")[1]
        daemons.append(pe)
        return pe

    def domains(pe: Daemon) -> set[str]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{pe.status}/status", timeout=10
        ) as response:
            return set(json.load(response)["domains"])

    def ask(pe: Daemon, message):
        client = SessionClient(pe.port, timeout=60)
        try:
            client.send(message)
            return client.receive()
        finally:
            client.close()

    try:
        first = start_pe(1, hv1)
        keeper = Daemon(
            "xenpool-pu",
            f"--keep={tmp_path / 'vms.conf'}",
            f"--registrar=127.0.0.1:{asap}",
            f"--state-dir={tmp_path / 'keeper'}",
            "--heartbeat-interval=0.2",
            ready="vm1: running: on PE 0x00000001",
            cwd=tmp_path,
            timeout=30,
        )
        daemons.append(keeper)
        second = start_pe(2, hv2)
        wait_until(
            lambda: len(uptimes(console)) >= 2, 30, "the guest's console"
        )  # it booted and ticks
        before = libvirt.open(hv1.uri).lookupByName("vm1")
        assert before.UUIDString() == stable_uuid("vm1")

        # What the leader does: PE 2's report names where to migrate to; PE 1 is asked to move.
        report = ask(second, S.VmQuery(1))
        assert report.migration == S.MigrationTarget("host2", hv2.uri)
        moved_at = time.monotonic()
        answer = ask(first, S.MoveRequest(1, "vm1", 2, b"", report.migration))
        migration_s = time.monotonic() - moved_at
        assert answer.moved and answer.reason.startswith(
            "live-migrated from host1 to host2"
        ), answer
        ticks_before = uptimes(console)

        keeper.wait_for("vm1: running: on PE 0x00000002", timeout=30)
        assert "moved off PE 0x00000001 to PE 0x00000002: live-migrated" in keeper.log
        second.wait_for("vm1 re-adopted by its keeper")
        assert domains(first) == set() and domains(second) == {"vm1"}
        after = libvirt.open(hv2.uri).lookupByName("vm1")
        assert after.UUIDString() == stable_uuid("vm1") and after.isActive()
        wait_until(
            lambda: len(uptimes(console)) > len(ticks_before) + 1,
            30,
            "the guest ticking on host 2",
        )
        log = console.read_text()
        assert log.count("xenpool-guest booted") == 1  # never restarted
        ticks = uptimes(console)
        assert (
            ticks == sorted(ticks) and ticks[-1] > ticks_before[-1]
        )  # its uptime goes on
        second_log, first_log = second.drain(), first.drain()
        assert (
            "fenced" not in second_log and "started vm1" not in second_log
        )  # re-adopted, not started
        assert "stopping and restarting" not in first_log
        print(f"live migration took {migration_s:.1f} s")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
