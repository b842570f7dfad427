"""The chaos test bed: two registrars (ENRP peers), N PE hosts and one keeper, each in its
own network namespace with its own address on a shared bridge, each a real ``twistd -n``
process with a ``--status`` port that the controller (the root namespace, the bridge's
first address) reaches. Root only.

Fencing is ``--stonith command`` with ``python -m xenpool.tools.fence_process PIDFILE``: kill -9
of the target host's PE process (with libvirt's test driver its VMs live in that
process: a power-off). Every host's pidfile is rewritten when its PE is (re)started.

``with TestBed(...) as bed:`` tears everything down (processes, namespaces, the bridge,
the one iptables rule in the root namespace) on any exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
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

from ..tools.netbed import BridgedNamespaces, TornDownOnExit, free_subnet, sh
from ..tools.processes import TWISTD_ARGV

# A host for libvirt's test driver: 2 cores, 1024 MB (etc/xenpool/node-host1.xml, inline
# so that an installed xenpool needs no source tree).
NODE_XML = """<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>2</active><nodes>1</nodes><sockets>1</sockets>
    <cores>2</cores><threads>1</threads></cpu>
  <memory>1048576</memory>
</node>
"""
ASAP, ENRP, PE_PORT, STATUS = 3863, 9901, 5001, 8080
NBD = 10809


def get_json(address: str, path: str, timeout: float = 1.0):
    with urllib.request.urlopen(
        f"http://{address}:{STATUS}{path}", timeout=timeout
    ) as response:
        return json.load(response)


@dataclass
class Node:
    """One namespace with one daemon in it."""

    name: str  # r1, r2, host1.., keeper
    netns: str
    address: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    stopped: bool = False  # SIGSTOPped by a fault
    pidfile: Path | None = None
    extra: dict = field(default_factory=dict)
    command: list[str] | None = (
        None  # a plain program instead of a twistd daemon (the NBD server)
    )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive():
            return
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    *(
                        self.command
                        or [*TWISTD_ARGV, "-n", "--pidfile=", f"--logfile={self.log}"]
                    ),
                    *self.argv,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.stopped = False
        if self.pidfile is not None:  # ip netns exec execs: this pid is twistd's
            self.pidfile.write_text(str(self.proc.pid))

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.alive():
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGSTOP:
                self.stopped = True
            elif sig == signal.SIGCONT:
                self.stopped = False

    def kill(self) -> None:
        if self.proc is not None and self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.extra["off_since"] = time.monotonic()
        self.stopped = False

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL after 10 s."""
        if self.proc is not None and self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stopped = False

    def status(self, path: str, timeout: float = 1.0):
        return get_json(self.address, path, timeout)


class TestBed(TornDownOnExit):
    __test__ = False  # not a pytest class

    def __init__(
        self,
        workdir: Path,
        pes: int = 4,
        vms: int = 8,
        vm_ram_mb: int = 128,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 1.5,
        lease_s: float = 30.0,
    ) -> None:
        if os.geteuid() != 0:
            raise PermissionError(
                "the chaos bed needs root (network namespaces, veth, iptables)"
            )
        self.dir = Path(workdir)
        self.n_pes = pes
        self.vm_names = [f"vm{i}" for i in range(1, vms + 1)]
        self.vm_ram_mb = vm_ram_mb
        self.heartbeat = (heartbeat_interval_s, heartbeat_timeout_s)
        self.lease_s = lease_s
        self.tag = secrets.token_hex(2)
        self.net = BridgedNamespaces(f"xc{self.tag}")
        self.nodes: dict[str, Node] = {}
        self._old_handlers: dict = {}

    # ------------------------------------------------------------ properties
    @property
    def controller(self) -> str:
        """The root namespace's address on the bridge."""
        return self.net.controller if self.net.prefix else ""

    @property
    def registrars(self) -> list[Node]:
        return [n for k, n in self.nodes.items() if k.startswith("r")]

    @property
    def pes(self) -> list[Node]:
        return [n for k, n in self.nodes.items() if k.startswith("host")]

    @property
    def keeper(self) -> Node:
        return self.nodes["keeper"]

    @property
    def san(self) -> Node:
        """The storage host: nbdkit exporting every VM's disk (any export name)."""
        return self.nodes["san"]

    @property
    def daemons(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.command is None]

    @property
    def state_dir(self) -> Path:
        return self.dir / "keeper-state"

    def pe_log(self, host: str) -> Path:
        return self.dir / f"{host}.jsonl"

    # ------------------------------------------------------------ lifecycle
    def set_up(self) -> None:
        self.build_network()
        self.configure()
        self.start_all()

    def build_network(self) -> None:
        # which namespaces and links are this bed's (xc<tag>...), for whoever checks the
        # clean-up while other beds run beside it
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "netns-tag").write_text(f"xc{self.tag}\n")
        names = [
            "r1",
            "r2",
            *(f"host{i}" for i in range(1, self.n_pes + 1)),
            "keeper",
            "san",
        ]
        made = self.net.create(
            free_subnet("10.213.", range(200, 255), "the chaos bed"), names
        )
        for name, (netns, address) in zip(names, made, strict=True):
            self.nodes[name] = Node(name, netns, address, [], self.dir / f"{name}.log")

    def configure(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "secret").write_text("the chaos bed's pool secret\n")
        san = self.san
        san.command = [
            shutil.which("nbdkit") or "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "-i",
            san.address,
            "-p",
            str(NBD),
        ]
        san.argv = ["memory", "1M"]
        (d / "vms.conf").write_text(
            "".join(
                f"[vm {name}]\nram = {self.vm_ram_mb}\nips = 10.0.5.{i}\ndisk = nbd://{san.address}:{NBD}/{name}\n"
                for i, name in enumerate(self.vm_names, 1)
            )
        )
        (d / "fence-map.ini").write_text(
            "".join(
                f"[{pe.name}]\npidfile = {d / f'{pe.name}.pid'}\n" for pe in self.pes
            )
        )
        r = self.registrars
        for i, reg in enumerate(r):
            peers = [f"--peer=tcp:host={other.address}:port={ENRP}" for other in r[:i]]
            reg.argv = [
                "xenpool-registrar",
                f"--asap=tcp:{ASAP}:interface={reg.address}",
                f"--enrp=tcp:{ENRP}:interface={reg.address}",
                f"--status=tcp:{STATUS}:interface={reg.address}",
                f"--registrar-id={0x0A0A0A01 + i:#x}",
                "--peer-heartbeat-interval=0.5",
                "--peer-timeout=2",
                "--keep-alive-interval=1",
                "--keep-alive-timeout=1",
                f"--state-dir={d / reg.name}",
                f"--pool-secret=Xen:{d / 'secret'}",
                *peers,
            ]
        registrars = [f"--registrar=tcp:host={reg.address}:port={ASAP}" for reg in r]
        fence = f"command={sys.executable} -m xenpool.tools.fence_process {{pidfile}}"
        for n, pe in enumerate(self.pes, 1):
            node_xml = d / f"node-{pe.name}.xml"
            node_xml.write_text(NODE_XML)
            pe.pidfile = d / f"{pe.name}.pid"
            pe.extra["pe_id"] = f"{n:#010x}"
            pe.argv = [
                "xenpool-pe",
                *registrars,
                f"--pe-id={n}",
                f"--port={PE_PORT}",
                f"--bind={pe.address}",
                f"--address={pe.address}",
                f"--host={pe.name}",
                f"--libvirt-uri=test://{node_xml}",
                f"--status=tcp:{STATUS}:interface={pe.address}",
                f"--pool-secret-file={d / 'secret'}",
                "--stonith=command",
                f"--stonith-option={fence}",
                f"--fence-map={d / 'fence-map.ini'}",
                "--load-interval=1",
                f"--lease={self.lease_s}",
                "--shutdown-timeout=2",
                f"--logfile={self.pe_log(pe.name)}",
            ]
        k = self.keeper
        k.argv = [
            "xenpool-pu",
            f"--keep={d / 'vms.conf'}",
            *(f"--registrar={reg.address}:{ASAP}" for reg in r),
            f"--state-dir={self.state_dir}",
            f"--status=tcp:{STATUS}:interface={k.address}",
            f"--heartbeat-interval={self.heartbeat[0]}",
            f"--heartbeat-timeout={self.heartbeat[1]}",
        ]  # (no JSON log: a keeper retrying without back-off writes 100 MB a minute)

    def wait_up(self, node: Node, timeout: float = 30.0) -> None:
        """Until the daemon answers on its status port (a PE: and is registered; the NBD
        server: accepts connections)."""
        if node.command is not None:
            return self._wait_listening(node, NBD, timeout)
        path = (
            "/handlespace"
            if node.name.startswith("r")
            else "/vms"
            if node.name == "keeper"
            else "/status"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive():
                raise RuntimeError(
                    f"{node.name} exited ({node.proc and node.proc.returncode}); log:\n{self.tail(node)}"
                )
            try:
                answer = node.status(path)
                if path != "/status" or answer.get("registered"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"{node.name} not up within {timeout:.0f} s; log:\n{self.tail(node)}"
        )

    def _wait_listening(self, node: Node, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive():
                raise RuntimeError(
                    f"{node.name} exited ({node.proc and node.proc.returncode}); log:\n{self.tail(node)}"
                )
            try:
                socket.create_connection((node.address, port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            f"{node.name} not listening on {port} within {timeout:.0f} s; log:\n{self.tail(node)}"
        )

    def tail(self, node: Node, lines: int = 30) -> str:
        try:
            return "\n".join(node.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start_node(self, node: Node, wait: bool = True) -> None:
        node.start()
        if wait:
            self.wait_up(node)

    def start_all(self) -> None:
        self.start_node(self.san)
        for node in self.registrars:
            self.start_node(node)
        self.start_pes_and_keeper()

    def start_pes_and_keeper(self) -> None:
        """Every PE host (at once), then the keeper once they all registered."""
        for pe in self.pes:
            pe.start()
        for pe in self.pes:
            self.wait_up(pe)
        self.start_node(self.keeper)

    # A powered-off host takes this long to boot again: a fence still on its way when it
    # went down (a failover that began during the fault) then finds it off, as with real
    # hardware, instead of killing the freshly started PE.
    BOOT_S = 3.0

    def power_on(self, node: Node) -> None:
        """Boot a PE host that was powered off: once it has been off for BOOT_S."""
        if not node.alive():
            off_since = node.extra.setdefault("off_since", time.monotonic())
            time.sleep(max(0.0, self.BOOT_S - (time.monotonic() - off_since)))
        node.start()
        node.extra.pop("off_since", None)

    def power_on_dead(self) -> list[str]:
        """Restart every daemon whose process is gone (killed or fenced; a PE host once it
        has been off for BOOT_S); continue stopped ones."""
        started = []
        now = time.monotonic()
        for node in self.nodes.values():
            if node.stopped:
                node.signal(signal.SIGCONT)
            if node.alive():
                node.extra.pop("off_since", None)
                continue
            off_since = node.extra.setdefault("off_since", now)
            if node in self.pes and now - off_since < self.BOOT_S:
                continue
            node.start()
            node.extra.pop("off_since", None)
            started.append(node.name)
        return started

    def heal_network(self) -> None:
        for node in self.nodes.values():
            sh("ip", "netns", "exec", node.netns, "iptables", "-F", check=False)

    def drop(self, node: Node, sources: list[Node], direction: str = "both") -> None:
        """Drop traffic between ``node`` and ``sources`` inside ``node``'s namespace
        (``in``: what it receives from them, ``out``: what it sends them)."""
        for other in sources:
            if direction in ("both", "in"):
                sh(
                    "ip",
                    "netns",
                    "exec",
                    node.netns,
                    "iptables",
                    "-A",
                    "INPUT",
                    "-s",
                    other.address,
                    "-j",
                    "DROP",
                )
            if direction in ("both", "out"):
                sh(
                    "ip",
                    "netns",
                    "exec",
                    node.netns,
                    "iptables",
                    "-A",
                    "OUTPUT",
                    "-d",
                    other.address,
                    "-j",
                    "DROP",
                )

    def stop_processes(self) -> None:
        """Every daemon killed (the network goes after them: ``teardown``)."""
        for node in self.nodes.values():
            try:
                if node.proc is not None and node.alive():
                    os.kill(node.proc.pid, signal.SIGCONT)
                    node.proc.kill()
                    node.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def reset(self) -> None:
        """A fresh first placement: keeper killed and its state wiped, every host
        power-cycled, network healed, registrars started if gone, keeper started."""
        self.keeper.kill()
        self.reset_keeper_state()
        self.heal_network()
        if not self.san.alive():
            self.start_node(self.san)
        for pe in self.pes:
            pe.kill()
        for node in self.registrars:
            if node.stopped:
                node.signal(signal.SIGCONT)
            if not node.alive():
                self.start_node(node)
        self.start_pes_and_keeper()

    def reset_keeper_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)
