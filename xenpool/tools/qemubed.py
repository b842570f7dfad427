"""A test bed of real hypervisor hosts: QEMU guests on shared NBD disks. Root only.

Every host is its own network namespace with its own address (a veth to a bridge in the
root namespace), its own libvirt daemon (session mode, run as nobody, its own sockets and
state) driving QEMU with software emulation, and its own ``twistd -n xenpool-pe``. A
storage namespace ("san") runs one ``nbdkit`` per guest, exporting that guest's disk
image (file plugin) through the ``limit`` filter (``limit=1``: one client at a time, the
storage's own refusal of a second writer) and the ``log`` filter (every connect,
disconnect and refused connection, with its time). A registrar and a keeper share the
"pool" namespace.

Each guest is Debian's kernel with a busybox initramfs whose init reads the sequence
number last written to its disk (``/dev/vda``, the NBD export as libvirt's network disk),
prints ``found N`` on its serial console, then writes N+1, N+2, ... with an fsync several
times a second and prints ``synced N`` after each. All hosts append a guest's console to
one file, so the file is the guest's whole life across failovers.

Fencing is the PEs' ordinary ``--stonith command`` with
``python -m xenpool.tools.qemubed fence NETNS``: SIGKILL of every process of the host (found
by its network namespace: libvirtd, QEMU, the PE), confirmed gone, then its link down, the
way a power switch would leave it. ``QemuBed.power_off`` does the same from outside.

``with QemuBed(workdir) as bed:`` tears everything down on any exit.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .netbed import BridgedNamespaces, TornDownOnExit, free_subnet, sh
from .processes import TWISTD_ARGV

NOBODY = 65534
ASAP, PE_PORT, STATUS, NBD_BASE = 3863, 5001, 8080, 10809
VIRTIO_MODULES = (  # load order: each after what it depends on
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
)
DISK_BYTES = 1 << 20

GUEST_INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in @MODULES@; do $B insmod /lib/modules/$m.ko; done
echo "xenpool-guest booted"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do i=$((i+1)); $B sleep 0.05; done
set -- $($B dd if=/dev/vda bs=64 count=1 2>/dev/null | $B tr -d '\\000')
n=0
[ "$1" = xenpool-seq ] && n=$2
echo "found $n"
while true; do
  n=$((n+1))
  if echo "xenpool-seq $n" | $B dd of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null
  then echo "synced $n"
  else echo "write $n failed"
  fi
  $B sleep @PERIOD@
done
"""

DOMAIN_TEMPLATE = """<domain type='qemu'>
  <name>${name}</name>
  <uuid>${uuid}</uuid>
  <description>${description}</description>
  <metadata>
    ${metadata}
  </metadata>
  <memory unit='KiB'>${ram_kb}</memory>
  <currentMemory unit='KiB'>${ram_kb}</currentMemory>
  <vcpu placement='static'>${vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>@ROOT@/vmlinuz</kernel>
    <initrd>@ROOT@/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    ${disk_xml}
    <serial type='file'><source path='@ROOT@/console/${name}.log' append='on'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def kernel() -> str | None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    return str(kernels[-1]) if kernels else None


def module_dir() -> Path | None:
    k = kernel()
    return Path("/lib/modules") / k.split("vmlinuz-", 1)[1] if k else None


def missing() -> str | None:
    """Why this machine cannot run the bed, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, libvirtd as nobody)"
    for tool in ("libvirtd", "qemu-system-x86_64", "nbdkit", "setpriv", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/bootstrap.sh installs it as root)"
    busybox = Path("/bin/busybox")
    if not busybox.is_file() or b"ld-linux" in busybox.read_bytes()[:8192]:
        return "no static busybox (busybox-static)"
    modules = module_dir()  # None exactly when there is no kernel
    if modules is None:
        return "no kernel in /boot (linux-image-amd64)"
    for m in VIRTIO_MODULES:
        if not (modules / "kernel" / f"{m}.ko").is_file():
            return f"kernel module {m}.ko missing (an uncompressed one is needed)"
    if (
        Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists()
        and shutil.which("iptables") is None
    ):
        return "iptables not installed (bridged frames pass the FORWARD chain here)"
    filters = sh("nbdkit", "--dump-config", check=False).stdout
    libdir = re.search(r"^filterdir=(.*)$", filters, re.M)
    if libdir and not Path(libdir.group(1), "nbdkit-limit-filter.so").exists():
        return "nbdkit has no limit filter"
    return None


def initramfs(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A gzipped newc cpio archive of ``files`` ({path: (mode, content)})."""
    out = io.BytesIO()
    for ino, (name, (mode, data)) in enumerate(
        [*files.items(), ("TRAILER!!!", (0, b""))], start=1
    ):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))
    return gzip.compress(out.getvalue(), compresslevel=1)


def build_guest(root: Path, period_s: float = 0.2) -> None:
    """``root/vmlinuz`` and ``root/initrd.gz``: the guest that writes its sequence."""
    vmlinuz, modules = kernel(), module_dir()
    if vmlinuz is None or modules is None:
        raise RuntimeError("no kernel in /boot (linux-image-amd64)")
    shutil.copy(vmlinuz, root / "vmlinuz")
    (root / "vmlinuz").chmod(0o644)
    names = [m.rsplit("/", 1)[1] for m in VIRTIO_MODULES]
    init = GUEST_INIT.replace("@MODULES@", " ".join(names)).replace(
        "@PERIOD@", f"{period_s:g}"
    )
    files = {
        "bin": (0o040755, b""),
        "proc": (0o040755, b""),
        "dev": (0o040755, b""),
        "lib": (0o040755, b""),
        "lib/modules": (0o040755, b""),
        "bin/busybox": (0o100755, Path("/bin/busybox").read_bytes()),
        "init": (0o100755, init.encode()),
    }
    for m in VIRTIO_MODULES:
        files[f"lib/modules/{m.rsplit('/', 1)[1]}.ko"] = (
            0o100644,
            (modules / "kernel" / f"{m}.ko").read_bytes(),
        )
    (root / "initrd.gz").write_bytes(initramfs(files))
    (root / "initrd.gz").chmod(0o644)


# -- fencing: a host's power switch ------------------------------------------------------------


def netns_pids(netns: str) -> list[int]:
    """Every process in the named network namespace."""
    try:
        target = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        # every thread: a leader that exited has no namespaces left while its other
        # threads (QEMU's) still run and hold its sockets
        try:
            tasks = os.listdir(f"/proc/{entry}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                st = os.stat(f"/proc/{entry}/task/{tid}/ns/net")
            except OSError:
                continue
            if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                pids.append(int(entry))
                break
    return pids


def _gone(pid: int) -> bool:
    """The process runs no more and holds no file (its sockets are closed). A zombie
    thread group leader is not enough: QEMU's other threads may still run and hold its
    sockets, and a link set down before they close them leaves the storage a half-open
    connection (and ``limit=1`` refusing the next QEMU)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1 and not os.listdir(
            f"/proc/{pid}/fd"
        )
    except OSError:
        return True


def power_off(netns: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process of the host, wait until none runs, then its link down.
    Returns the pids killed; raises RuntimeError if one survives."""
    killed = []
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in netns_pids(netns) if not _gone(p)]
        if not alive:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{netns}: processes {alive} survive SIGKILL")
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    sh("ip", "-n", netns, "link", "set", "eth0", "down", check=False)
    return sorted(set(killed))


def cut_storage(storage_netns: str, address: str, timeout: float = 5.0) -> None:
    """Drop every TCP connection from ``address`` at the storage server (``ss -K``), the
    way fabric fencing cuts a host off its storage; raises RuntimeError if one stays.

    A client that vanished without closing its connection (power lost, link cut: no FIN
    ever comes) holds an NBD export until the server notices, and nbdkit sets no TCP
    keepalive: an idle connection stays forever, and with ``limit=1`` the export refuses
    every later client. Seen here even after SIGKILL with the link still up."""
    deadline = time.monotonic() + timeout
    while True:
        sh(
            "ip",
            "netns",
            "exec",
            storage_netns,
            "ss",
            "-K",
            "dst",
            address,
            check=False,
        )
        left = sh("ip", "netns", "exec", storage_netns, "ss", "-Htn", "dst", address)
        if not left.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"connections from {address} stay: {left.stdout.strip()}"
            )
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    """``python -m xenpool.tools.qemubed fence NETNS [STORAGE_NETNS ADDRESS]``: the fence
    command of the bed: the host's power off, then (if given) its connections to the
    storage dropped."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 4) or args[0] != "fence":
        print(
            "usage: python -m xenpool.tools.qemubed fence NETNS [STORAGE_NETNS ADDRESS]",
            file=sys.stderr,
        )
        return 2
    for netns in args[1:3] if len(args) == 4 else args[1:2]:
        if not Path(f"/run/netns/{netns}").exists():
            print(f"no network namespace {netns}", file=sys.stderr)
            return 1
    try:
        killed = power_off(args[1])
        if len(args) == 4:
            cut_storage(args[2], args[3])
    except RuntimeError as err:
        print(str(err), file=sys.stderr)
        return 1
    cut = f"; its storage connections dropped at {args[2]}" if len(args) == 4 else ""
    print(f"{args[1]} is off (killed {killed or 'nothing'}){cut}")
    return 0


# -- what the guests and the storage say --------------------------------------------------------

_LINE = re.compile(r"(xenpool-guest booted|found (\d+)|synced (\d+))")


@dataclass
class Life:
    """One boot of a guest, read from its console file."""

    found: int | None = None
    synced: list[int] = field(default_factory=list)


def lives(console: Path) -> list[Life]:
    """Each boot of the guest in order: the number it found on its disk and what it synced."""
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return []
    boots: list[Life] = []
    for m in _LINE.finditer(text):
        if m.group(1) == "xenpool-guest booted":
            boots.append(Life())
        elif not boots:
            continue
        elif m.group(2) is not None:
            boots[-1].found = int(m.group(2))
        else:
            boots[-1].synced.append(int(m.group(3)))
    return boots


def disk_number(image: Path) -> int:
    """The sequence number on a guest's disk image (0 if none yet)."""
    with open(image, "rb") as f:
        head = f.read(64).split(b"\0", 1)[0].split()
    return int(head[1]) if len(head) == 2 and head[0] == b"xenpool-seq" else 0


_NBD_EVENT = re.compile(
    r"^(\S+ \S+) (?:connection=(\d+) (Connect|Disconnect)|\.\.\.Preconnect id=\d+ "
    r"return=(-1))",
    re.M,
)


@dataclass
class NbdEvent:
    at: float  # wall clock
    kind: str  # connect, disconnect, refused
    connection: int | None


def nbd_events(log: Path) -> list[NbdEvent]:
    """nbdkit's log filter: each client connect, disconnect and refused connection."""
    from datetime import UTC, datetime

    events = []
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for m in _NBD_EVENT.finditer(text):
        at = (
            datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
            .replace(tzinfo=UTC)
            .timestamp()
        )
        if m.group(4):
            events.append(NbdEvent(at, "refused", None))
        else:
            events.append(NbdEvent(at, m.group(3).lower(), int(m.group(2))))
    return events


def max_writers(events: list[NbdEvent]) -> int:
    """The most clients an export had at once (its log's connects and disconnects)."""
    open_, most = set(), 0
    for e in events:
        if e.kind == "connect":
            open_.add(e.connection)
            most = max(most, len(open_))
        elif e.kind == "disconnect":
            open_.discard(e.connection)
    return most


# -- the bed ------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One program in one namespace."""

    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self, netns: str, env: dict | None = None) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *self.argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class Host:
    name: str
    netns: str
    address: str
    n: int = 0  # PE id
    # set by QemuBed._configure; read through the properties below
    _libvirtd: Proc | None = None
    _pe: Proc | None = None
    _root: Path | None = None
    frozen: list[int] = field(default_factory=list)

    @property
    def libvirtd(self) -> Proc:
        assert self._libvirtd is not None, f"{self.name}: no libvirtd configured"
        return self._libvirtd

    @libvirtd.setter
    def libvirtd(self, proc: Proc) -> None:
        self._libvirtd = proc

    @property
    def pe(self) -> Proc:
        assert self._pe is not None, f"{self.name}: no PE configured"
        return self._pe

    @pe.setter
    def pe(self, proc: Proc) -> None:
        self._pe = proc

    @property
    def root(self) -> Path:
        assert self._root is not None, f"{self.name}: no root directory configured"
        return self._root

    @root.setter
    def root(self, path: Path) -> None:
        self._root = path

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///session?socket={self.socket}"

    @property
    def pe_id(self) -> str:
        return f"0x{self.n:08x}"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll observed state (a socket, a console line, a status page) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class QemuBed(TornDownOnExit):
    """Three (``hosts``) QEMU hypervisor hosts, a SAN, a registrar and a keeper of
    ``vms`` guests. Guests are placed by the pool; ``where()`` says where they run."""

    __test__ = False

    def __init__(
        self,
        workdir: Path,
        hosts: int = 3,
        vms: int = 3,
        ram_mb: int = 96,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 1.5,
        write_period_s: float = 0.2,
        live: tuple[str, ...] = (),
        console: bool = False,
        rebalance: bool = False,
        later: tuple[str, ...] = (),
    ) -> None:
        reason = missing()
        if reason:
            raise RuntimeError(f"the QEMU bed cannot run here: {reason}")
        self.dir = Path(workdir)
        self.n_hosts = hosts
        self.vm_names = [f"vm{i}" for i in range(1, vms + 1)]
        self.ram_mb = ram_mb
        self.heartbeat = (heartbeat_interval_s, heartbeat_timeout_s)
        self.write_period_s = write_period_s
        # guests that may live-migrate: their exports take two clients (both QEMUs hold
        # the disk during a migration), and every PE offers its libvirtd as a target
        self.live = set(live)
        # the operator's console: the registrar joins the PEs' and the keeper's status
        # pages (--console-pe, --console-keeper) and the keeper takes signed commands,
        # so that ``xenpool`` (``bed.xenpool(...)``) can drive the pool
        self.console_on = console
        # the pool's own planned moves: every PE runs ``--rebalance plan`` (the lowest
        # PE identifier leads) every second; the bed's hosts share one machine, whose
        # /proc/stat is no host's own, so each PE counts only its guests' CPU
        # (``--host-cpu no``)
        self.rebalance = rebalance
        # hosts whose PE ``start`` leaves to ``start_pe`` (their libvirtd runs)
        self.later = set(later)
        self.tag = secrets.token_hex(2)
        self.net = BridgedNamespaces(f"xq{self.tag}")
        self.hosts: dict[str, Host] = {}
        # set by _network and _configure; read through the properties below
        self._pool: Host | None = None
        self._san: Host | None = None
        self._registrar: Proc | None = None
        self._keeper: Proc | None = None
        self.nbd: dict[str, Proc] = {}
        self._old_handlers: dict = {}

    @property
    def pool(self) -> Host:
        """The registrar's and the keeper's host."""
        assert self._pool is not None, "the bed's network is not set up"
        return self._pool

    @property
    def san(self) -> Host:
        """The storage host (nbdkit)."""
        assert self._san is not None, "the bed's network is not set up"
        return self._san

    @property
    def registrar(self) -> Proc:
        assert self._registrar is not None, "the bed is not configured"
        return self._registrar

    @property
    def keeper(self) -> Proc:
        assert self._keeper is not None, "the bed is not configured"
        return self._keeper

    # ------------------------------------------------------------ paths
    def console(self, vm: str) -> Path:
        return self.dir / "console" / f"{vm}.log"

    def image(self, vm: str) -> Path:
        return self.dir / "disks" / f"{vm}.img"

    def nbd_log(self, vm: str) -> Path:
        return self.dir / "disks" / f"{vm}.nbd.log"

    def nbd_port(self, vm: str) -> int:
        return NBD_BASE + 1 + self.vm_names.index(vm)

    def pe_log(self, host: Host) -> Path:
        """The PE's structured log (JSON lines, every event with its time)."""
        return self.dir / f"{host.name}.jsonl"

    @property
    def keeper_log(self) -> Path:
        return self.dir / "keeper.jsonl"

    # ------------------------------------------------------------ lifecycle
    def set_up(self) -> None:
        self.start()

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        for sub in ("console", "disks"):
            (self.dir / sub).mkdir(exist_ok=True)
        os.chown(self.dir / "console", NOBODY, NOBODY)
        build_guest(self.dir, self.write_period_s)
        (self.dir / "domain.xml").write_text(
            DOMAIN_TEMPLATE.replace("@ROOT@", str(self.dir))
        )
        self._network()
        self._configure()
        for vm in self.vm_names:
            self._start_nbd(vm)
        for vm in self.vm_names:
            self._wait_listening(self.san.address, self.nbd_port(vm), 10)
        self.registrar.start(self.pool.netns)
        self._wait_status(self.pool.address, "/handlespace", self.registrar, 30)
        for host in self.hosts.values():
            self._start_libvirtd(host)
        for host in self.hosts.values():
            self._wait_libvirtd(host)
            if host.name not in self.later:
                host.pe.start(host.netns)
        for host in self.hosts.values():
            if host.name not in self.later:
                self.wait_registered(host)
        self.start_keeper()

    def start_pe(self, host: Host) -> None:
        """Start a host's PE (one of ``later``) and wait until it is registered."""
        host.pe.start(host.netns)
        self.wait_registered(host)

    def _network(self) -> None:
        names = [*(f"host{i}" for i in range(1, self.n_hosts + 1)), "pool", "san"]
        made = self.net.create(
            free_subnet("10.214.", range(10, 250), "the QEMU bed"), names
        )
        for i, (name, (netns, address)) in enumerate(zip(names, made, strict=True)):
            host = Host(name, netns, address, n=i + 1)
            if name == "pool":
                self._pool = host
            elif name == "san":
                self._san = host
            else:
                self.hosts[name] = host

    def _configure(self) -> None:
        d = self.dir
        (d / "secret").write_text("the QEMU bed's pool secret\n")
        (d / "vms.conf").write_text(
            "".join(
                f"[vm {vm}]\nram = {self.ram_mb}\n"
                f"disk = nbd://{self.san.address}:{self.nbd_port(vm)}/{vm}\n"
                for vm in self.vm_names
            )
        )
        (d / "fence-map.ini").write_text(
            "".join(
                f"[{h.name}]\nnetns = {h.netns}\nstorage = {self.san.netns}\n"
                f"address = {h.address}\n"
                for h in self.hosts.values()
            )
        )
        twistd = [*TWISTD_ARGV, "-n", "--pidfile="]
        self._registrar = Proc(
            [
                *twistd,
                f"--logfile={d / 'registrar.log'}",
                "xenpool-registrar",
                f"--asap=tcp:{ASAP}:interface={self.pool.address}",
                f"--status=tcp:{STATUS}:interface={self.pool.address}",
                "--keep-alive-interval=1",
                "--keep-alive-timeout=1",
                f"--state-dir={d / 'registrar'}",
                f"--pool-secret=Xen:{d / 'secret'}",
                *(
                    (
                        *(
                            f"--console-pe=http://{h.address}:{STATUS}"
                            for h in self.hosts.values()
                        ),
                        f"--console-keeper=http://{self.pool.address}:{STATUS + 1}",
                    )
                    if self.console_on
                    else ()
                ),
            ],
            d / "registrar.out",
        )
        fence = (
            f"command={sys.executable} -m xenpool.tools.qemubed fence {{netns}} "
            "{storage} {address}"
        )
        for host in self.hosts.values():
            host.root = d / host.name
            host.libvirtd = Proc(
                [
                    "env",
                    "-i",
                    f"PATH={os.environ['PATH']}",
                    f"HOME={host.root / 'home'}",
                    f"XDG_RUNTIME_DIR={host.root / 'run'}",
                    f"XDG_CONFIG_HOME={host.root / 'config'}",
                    f"XDG_CACHE_HOME={host.root / 'cache'}",
                    "setpriv",
                    f"--reuid={NOBODY}",
                    f"--regid={NOBODY}",
                    "--clear-groups",
                    "libvirtd",
                ],
                d / f"{host.name}-libvirtd.log",
            )
            host.pe = Proc(
                [
                    *twistd,
                    f"--logfile={d / f'{host.name}.log'}",
                    "xenpool-pe",
                    f"--logfile={self.pe_log(host)}",
                    f"--registrar=tcp:host={self.pool.address}:port={ASAP}",
                    f"--pe-id={host.n}",
                    f"--port={PE_PORT}",
                    f"--bind={host.address}",
                    f"--address={host.address}",
                    f"--host={host.name}",
                    f"--libvirt-uri={host.uri}",
                    f"--domain-template={d / 'domain.xml'}",
                    f"--status=tcp:{STATUS}:interface={host.address}",
                    f"--pool-secret-file={d / 'secret'}",
                    "--load-plugin=max",
                    "--stonith=command",
                    f"--stonith-option={fence}",
                    f"--fence-map={d / 'fence-map.ini'}",
                    "--load-interval=1",
                    "--lease=30",
                    "--shutdown-timeout=2",
                    *((f"--migration-uri={host.uri}",) if self.live else ()),
                    *(
                        (
                            "--rebalance=plan",
                            "--rebalance-interval=1",
                            "--host-cpu=no",
                        )
                        if self.rebalance
                        else ()
                    ),
                ],
                d / f"{host.name}.out",
            )
        self._keeper = Proc(
            [
                *twistd,
                f"--logfile={d / 'keeper.log'}",
                "xenpool-pu",
                f"--logfile={self.keeper_log}",
                f"--keep={d / 'vms.conf'}",
                f"--registrar={self.pool.address}:{ASAP}",
                f"--state-dir={d / 'keeper-state'}",
                f"--status=tcp:{STATUS + 1}:interface={self.pool.address}",
                f"--heartbeat-interval={self.heartbeat[0]}",
                f"--heartbeat-timeout={self.heartbeat[1]}",
                *((f"--pool-secret-file={d / 'secret'}",) if self.console_on else ()),
            ],
            d / "keeper.out",
        )

    def _start_nbd(self, vm: str) -> None:
        image = self.image(vm)
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(DISK_BYTES)
        nbdkit = shutil.which("nbdkit")
        if nbdkit is None:
            raise RuntimeError("nbdkit not installed")
        proc = Proc(
            [
                nbdkit,
                "--foreground",
                "--exit-with-parent",
                "-i",
                self.san.address,
                "-p",
                str(self.nbd_port(vm)),
                "--filter=log",
                *(() if vm in self.live else ("--filter=limit",)),
                "file",
                str(image),
                f"logfile={self.nbd_log(vm)}",
                *(() if vm in self.live else ("limit=1",)),
            ],
            self.dir / "disks" / f"{vm}.nbdkit.out",
        )
        proc.start(self.san.netns, env={"TZ": "UTC"})  # its log's times
        self.nbd[vm] = proc

    def _start_libvirtd(self, host: Host) -> None:
        shutil.rmtree(host.root / "run", ignore_errors=True)  # a boot clears /run
        for key in ("run", "config", "cache", "home"):
            (host.root / key).mkdir(parents=True, exist_ok=True)
            os.chown(host.root / key, NOBODY, NOBODY)
        host.root.chmod(0o755)
        # a migration's data goes to this address (the host's own, not its hostname's)
        conf = host.root / "config" / "libvirt"
        conf.mkdir(exist_ok=True)
        (conf / "qemu.conf").write_text(f'migration_host = "{host.address}"\n')
        os.chown(conf, NOBODY, NOBODY)
        host.libvirtd.start(host.netns)

    def _wait_libvirtd(self, host: Host) -> None:
        def up():
            if not host.libvirtd.alive():
                raise RuntimeError(
                    f"{host.name}'s libvirtd exited; see {host.libvirtd.log} (the bed's "
                    "directory must be reachable by nobody)"
                )
            return host.socket.exists()

        wait_until(up, 30, f"{host.name}'s libvirtd socket")

    def start_keeper(self) -> None:
        self.keeper.start(self.pool.netns)
        self._wait_status(self.pool.address, "/vms", self.keeper, 30, port=STATUS + 1)

    def stop_keeper(self, sig: int = signal.SIGTERM) -> None:
        keeper = self.keeper
        if keeper.alive():
            assert keeper.proc is not None  # alive() means started
            keeper.proc.send_signal(sig)
            keeper.reap()

    def wait_registered(self, host: Host, timeout: float = 60) -> None:
        def registered():
            if not host.pe.alive():
                raise RuntimeError(f"{host.name}'s PE exited; see {host.pe.log}")
            try:
                return self.status(host.address, "/status").get("registered")
            except OSError:
                return False

        wait_until(registered, timeout, f"{host.name}'s PE registered", 0.1)

    def _wait_status(self, address, path, proc: Proc, timeout, port=STATUS) -> None:
        def up():
            if not proc.alive():
                raise RuntimeError(f"{proc.argv[-1]} exited; see {proc.log}")
            try:
                self.status(address, path, port=port)
                return True
            except OSError:
                return False

        wait_until(up, timeout, f"{path} at {address}:{port}", 0.1)

    def _wait_listening(self, address: str, port: int, timeout: float) -> None:
        def listening():
            try:
                socket.create_connection((address, port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_until(listening, timeout, f"{address}:{port} listening")

    @staticmethod
    def status(address: str, path: str, port: int = STATUS, timeout: float = 2.0):
        with urllib.request.urlopen(
            f"http://{address}:{port}{path}", timeout=timeout
        ) as response:
            return json.load(response)

    def xenpool(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The operator's ``xenpool`` command, run on the pool's host (its namespace)
        against the registrar's status port, with the pool secret (``console=True``)."""
        command = Path(sys.executable).with_name("xenpool")
        return subprocess.run(
            ["ip", "netns", "exec", self.pool.netns, str(command), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                **os.environ,
                "XENPOOL_STATUS": f"{self.pool.address}:{STATUS}",
                "XENPOOL_POOL_SECRET_FILE": str(self.dir / "secret"),
            },
        )

    # ------------------------------------------------------------ observing
    def vms(self) -> dict[str, dict]:
        """The keeper's view (only for *where* to look; results are read from disks)."""
        return {
            v["server_id"]: v
            for v in self.status(self.pool.address, "/vms", port=STATUS + 1)
        }

    def where(self) -> dict[str, Host | None]:
        by_id = {h.pe_id: h for h in self.hosts.values()}
        return {
            name: by_id.get(v["pe"]) if v["state"] == "running" else None
            for name, v in self.vms().items()
        }

    def running(self, host: Host) -> set[str]:
        """The guests the host's libvirtd runs (asked directly, not through the PE)."""
        import libvirt

        conn = libvirt.open(host.uri)
        try:
            return {
                d.name()
                for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            }
        finally:
            conn.close()

    def qemu_pids(self, host: Host) -> list[int]:
        return [
            p
            for p in netns_pids(host.netns)
            if not _gone(p) and "qemu-system" in _comm(p)
        ]

    def wait_all_writing(self, timeout: float = 120) -> None:
        """Until every guest runs (keeper) and its current life synced a write (console)."""

        def writing():
            placed = self.where()
            return all(placed.get(vm) for vm in self.vm_names) and all(
                (ls := lives(self.console(vm))) and ls[-1].synced
                for vm in self.vm_names
            )

        wait_until(writing, timeout, "every guest running and writing", 0.1)

    # ------------------------------------------------------------ faults
    def power_off(self, host: Host) -> list[int]:
        """The host's power switch: every process SIGKILLed, then its link down."""
        return power_off(host.netns)

    def freeze(self, host: Host) -> list[int]:
        """SIGSTOP of the host's PE and QEMU processes (its libvirtd too)."""
        host.frozen = [p for p in netns_pids(host.netns) if not _gone(p)]
        for pid in host.frozen:
            os.kill(pid, signal.SIGSTOP)
        return host.frozen

    def cut_link(self, host: Host) -> None:
        """The host's network cable pulled: everything in it runs on, reaching nothing
        (its connections stay half-open at their peers)."""
        sh("ip", "-n", host.netns, "link", "set", "eth0", "down")

    def power_on(self, host: Host) -> None:
        """Boot the host again: link up, a fresh libvirtd (its /run cleared), its PE."""
        power_off(host.netns)  # whatever is left (a frozen host not fenced yet)
        host.libvirtd.reap()
        host.pe.reap()
        host.frozen = []
        sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        self._start_libvirtd(host)
        self._wait_libvirtd(host)
        host.pe.start(host.netns)
        self.wait_registered(host)

    def stop_processes(self) -> None:
        """Every host powered off, every process of the bed killed and reaped (the
        network goes after them: ``teardown``)."""
        for host in self.hosts.values():
            try:
                power_off(host.netns)
            except RuntimeError:
                pass
        for netns in self.net.namespaces:
            for pid in netns_pids(netns):
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in [
            *self.nbd.values(),
            self._registrar,
            self._keeper,
            *(h._libvirtd for h in self.hosts.values()),
            *(h._pe for h in self.hosts.values()),
        ]:
            if proc is not None and proc.proc is not None:
                if proc.alive():
                    proc.proc.kill()
                proc.reap()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
