"""The SCTP interop guest: an initramfs with a static busybox, the SCTP kernel modules, this
checkout's Python (interpreter, standard library, the virtualenv's packages xenpool needs) and
rsplib's rspregistrar, rspserver and rspterminal and Debian's tcpdump (when installed) with
every shared library they load; all at their host paths, so the same commands run inside.
Booted with QEMU (KVM when /dev/kvm works, software emulation otherwise), it runs
``scenarios.py`` and reports on the serial console.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
MODULES = (
    "crypto/crc32c_generic",
    "lib/libcrc32c",
    "net/ipv4/udp_tunnel",
    "net/ipv6/ip6_udp_tunnel",
    "net/sctp/sctp",
)
RSPLIB = ("/usr/bin/rspregistrar", "/usr/bin/rspserver", "/usr/bin/rspterminal")
TCPDUMP = "/usr/bin/tcpdump"  # captures the scenarios' SCTP traffic (Debian's tcpdump)
GUEST_ADDRESS = "10.0.2.15"
# virtualenv packages the daemons never import (plotting, packaging, test tools): left out;
# and TLS (pyOpenSSL, cryptography, service_identity): the scenarios use none, and Twisted,
# which imports them at start-up where they are installed, takes tens of seconds per process
# for that under software emulation (without them it leaves ssl: endpoints out, as before).
SKIP_PACKAGES = re.compile(
    r"^(matplotlib|numpy|fontTools|PIL|pillow|pip|setuptools|hypothesis|contourpy|kiwisolver|"
    r"pyparsing|cycler|_pytest|pytest|coverage|pygments|wheel|"
    r"OpenSSL|pyOpenSSL|cryptography|service_identity|pyasn1)",
    re.I,
)
SKIP_STDLIB = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "site-packages",
}  # unittest stays: the daemons import it

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev  # /tmp stays: the checkout may live there
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs shm /dev/shm
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "GUEST insmod $m failed"; done
ip link set lo up
ip addr add @ADDRESS@/24 dev lo
hostname guest
echo "GUEST booted $(uname -r)"
cd @ROOT@
HOME=/tmp PYTHONDONTWRITEBYTECODE=1 @PYTHON@ -u tests/guest/scenarios.py @ARGS@ 2>&1
echo "GUEST DONE"
poweroff -f
"""


def missing() -> str | None:
    """Why this machine cannot build or boot the guest, or None."""
    if os.geteuid() != 0:
        return "needs root (reads the kernel and its modules, boots QEMU)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (scripts/bootstrap.sh installs qemu-system-x86 as root)"
    busybox = Path("/bin/busybox")
    if not busybox.is_file() or b"ld-linux" in busybox.read_bytes()[:8192]:
        return "no static busybox (busybox-static)"
    if not kernel():
        return "no kernel in /boot (linux-image-amd64)"
    for module in MODULES:
        if not Path(f"/lib/modules/{kernel_version()}/kernel/{module}.ko").is_file():
            return f"kernel module {module}.ko missing for {kernel_version()}"
    for tool in RSPLIB:
        if not Path(tool).is_file():
            return f"{tool} not installed (rsplib-registrar, rsplib-tools)"
    return None


def kernel() -> str | None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    return kernels[-1] if kernels else None


def kernel_version() -> str:
    return Path(kernel() or "vmlinuz-").name.removeprefix("vmlinuz-")


class Archive:
    """A newc cpio archive built from host paths (directories made as needed)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.names: set[str] = set()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        parent = os.path.dirname(name)
        if parent and parent not in self.names:
            self.directory(parent)
        self.names.add(name)
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        self.ino += 1
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self.out.write(
            b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4)
        )

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int = 0o100644) -> None:
        self._entry(name, mode, data)

    def host(self, path: str) -> None:
        """A host file (or symlink, followed to its target too) at its own path."""
        path = os.path.normpath(path)
        if path.lstrip("/") in self.names:
            return
        if os.path.islink(path):
            target = os.readlink(path)
            self._entry(path, 0o120777, target.encode())
            self.host(os.path.join(os.path.dirname(path), target))
        elif os.path.isdir(path):
            self.directory(path)
        elif os.path.isfile(path):
            self._entry(
                path,
                0o100000 | (os.stat(path).st_mode & 0o7777),
                Path(path).read_bytes(),
            )

    def tree(self, top: str, skip=lambda path: False) -> None:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if not skip(os.path.join(dirpath, d))]
            self.host(dirpath)
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not skip(path):
                    self.host(path)
            for name in dirnames:
                if os.path.islink(os.path.join(dirpath, name)):
                    self.host(os.path.join(dirpath, name))

    def close(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.out.getvalue()


def shared_libraries(paths: list[str]) -> set[str]:
    """Every library the ELF files in ``paths`` load (ldd), with the loader."""
    found: set[str] = set()
    for chunk in range(0, len(paths), 200):
        out = subprocess.run(
            ["ldd", *paths[chunk : chunk + 200]], capture_output=True, text=True
        ).stdout
        found.update(re.findall(r"(/\S+\.so[^\s:]*) \(0x", out))
    return found


def build(python: str, args: str = "") -> bytes:
    """The gzipped initramfs that runs ``scenarios.py ARGS`` with ``python`` (the venv's)."""
    archive = Archive()
    for name in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "etc",
        "root",
        "var/run",
        "run",
    ):
        archive.directory(name)
    archive.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o100755)
    version = kernel_version()
    for module in MODULES:
        archive.file(
            f"lib/modules/{module}.ko",
            Path(f"/lib/modules/{version}/kernel/{module}.ko").read_bytes(),
        )
    archive.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    archive.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    archive.file("etc/hosts", f"127.0.0.1 localhost\n{GUEST_ADDRESS} guest\n".encode())
    # Python: the venv, its interpreter and standard library, the packages xenpool imports
    venv = Path(python).parent.parent
    stdlib = sysconfig.get_paths()["stdlib"]
    base = sys.base_prefix
    archive.tree(
        str(venv),
        skip=lambda p: (
            bool(SKIP_PACKAGES.match(os.path.basename(p)))
            or p.endswith(".pyc")
            and "__pycache__" not in p
        ),
    )
    archive.host(os.path.realpath(python))
    archive.host(python)
    archive.tree(
        stdlib,
        skip=lambda p: (
            os.path.dirname(p) == stdlib and os.path.basename(p) in SKIP_STDLIB
        ),
    )
    for extra in glob.glob(os.path.join(base, "lib", "libpython*")):
        archive.host(extra)
    for part in ("xenpool", "plugins", "twisted", "etc", "tests", "setup.cfg"):
        archive.tree(str(ROOT / part), skip=lambda p: "__pycache__" in p) if (
            ROOT / part
        ).is_dir() else archive.host(str(ROOT / part))
    programs = [*RSPLIB, *([TCPDUMP] if Path(TCPDUMP).is_file() else [])]
    for tool in programs:
        archive.host(tool)
    elves = [
        p.lstrip("/")
        for p in archive.names
        if p.endswith(".so") or ".so." in p or "/" + p in programs
    ]
    elves += [os.path.realpath(python).lstrip("/")]
    for library in sorted(shared_libraries(["/" + p for p in elves])):
        archive.host(library)
        archive.host(os.path.realpath(library))
    init = (
        INIT.replace("@MODULES@", " ".join(MODULES))
        .replace("@ADDRESS@", GUEST_ADDRESS)
        .replace("@ROOT@", str(ROOT))
        .replace("@PYTHON@", python)
        .replace("@ARGS@", args)
    )
    archive.file("init", init.encode(), 0o100755)
    return gzip.compress(archive.close(), compresslevel=1)


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def qemu_command(initrd: Path, console: Path, memory_mb: int = 3072) -> list[str]:
    kvm = kvm_usable() and os.environ.get("XENPOOL_GUEST_ACCEL", "tcg") == "kvm"
    accel = ["-enable-kvm", "-cpu", "host"] if kvm else ["-accel", "tcg", "-cpu", "max"]
    return [
        "qemu-system-x86_64",
        *accel,
        "-m",
        str(memory_mb),
        "-smp",
        "2",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-monitor",
        "none",
        "-kernel",
        kernel(),
        "-initrd",
        str(initrd),
        "-nic",
        "none",
        "-append",
        "console=ttyS0 panic=-1 rdinit=/init",
    ]


def boot(python: str, scenarios: list[int], workdir: Path, timeout_s: float) -> str:
    """Build the initramfs that runs ``scenarios``, boot it and return the serial console's
    text once the guest says GUEST DONE (or at ``timeout_s``)."""
    import threading
    import time

    initrd, log = workdir / "initrd.gz", workdir / "console.log"
    initrd.write_bytes(build(python, " ".join(str(n) for n in scenarios)))
    qemu = subprocess.Popen(
        qemu_command(initrd, log),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while qemu.poll() is None and time.monotonic() < deadline:
            if log.exists() and "GUEST DONE" in log.read_text(errors="replace"):
                break
            threading.Event().wait(1)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
    return log.read_text(errors="replace") if log.exists() else ""


if __name__ == "__main__":
    # By hand, as root: .venv/bin/python tests/guest/image.py [N ...]  (default: all four
    # scenarios); prints the console's GUEST, SCENARIO and REFUSAL lines.
    import tempfile

    reason = missing()
    if reason:
        sys.exit(f"SCTP interop guest: {reason}")
    with tempfile.TemporaryDirectory(prefix="xp-sctp-") as tmp:
        console = boot(
            sys.executable,
            [int(n) for n in sys.argv[1:]] or [1, 2, 3, 4],
            Path(tmp),
            1200,
        )
    print(
        console[console.find("GUEST booted") :]
        if "GUEST booted" in console
        else console[-4000:]
    )
