"""``make demo``: a small xenpool cluster at work, shown live.

A registrar, three hypervisor hosts (PE daemons on libvirt's test driver, each a host
from its own node file), and a keeper holding six VMs. Then one host dies (kill -9 of
its PE: with the test driver its VMs live in that process, so this is a power loss);
its VMs are fenced and restarted on the other hosts, and the demo shows how long each
failover took. Everything runs as real processes on loopback and is stopped at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from .processes import Daemon, free_port

ETC = Path(__file__).resolve().parents[2] / "etc" / "xenpool"
VMS = {"web1": 256, "web2": 128, "db1": 384, "mail1": 128, "app1": 256, "app2": 192}
HOSTS = (1, 2, 3)


def _get(port: int, path: str):
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}{path}", timeout=5
    ) as response:
        return json.load(response)


class Cluster:
    """A registrar, three PE hosts and a keeper as real processes in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        vms: dict[str, int] = VMS,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 1.5,
        alerts: tuple[str, ...] = (),
    ) -> None:
        self.dir = workdir
        # alert commands every daemon runs (xenpool/console/events.py)
        self.alerts = alerts
        self.vm_ram = vms
        self.heartbeat = (heartbeat_interval_s, heartbeat_timeout_s)
        self.daemons: list[Daemon] = []
        self.pes: dict[int, Daemon] = {}

    def _start(self, *args, **kwargs) -> Daemon:
        daemon = Daemon(*args, cwd=self.dir, **kwargs)
        self.daemons.append(daemon)
        return daemon

    def start(self) -> None:
        d = self.dir
        (d / "secret").write_text("demo pool secret, keep it somewhere safe\n")
        # Who may ask the PEs: the keeper, proving itself with its own secret (as shipped
        # in etc/xenpool/pe.conf and vms.conf)
        (d / "keeper.secret").write_text("the demo keeper's secret, not the pool's\n")
        (d / "pu-access.conf").write_text(
            "[pu keeper]\nsecret-file = keeper.secret\nvms = *\n"
        )
        (d / "fence-map.ini").write_text(
            "".join(f"[host{n}]\npidfile = {d / f'host{n}.pid'}\n" for n in HOSTS)
        )
        (d / "vms.conf").write_text(
            "".join(
                f"[vm {name}]\nram = {ram}\nips = 10.0.5.{i}\n"
                for i, (name, ram) in enumerate(self.vm_ram.items(), 1)
            )
        )
        self.asap, self.registrar_status = free_port(), free_port()
        self.keeper_status = free_port()
        status_ports = {n: free_port() for n in HOSTS}
        alert = [f"--alert={command}" for command in self.alerts]
        self.registrar = self._start(
            "xenpool-registrar",
            f"--asap=tcp:{self.asap}:interface=127.0.0.1",
            f"--status=tcp:{self.registrar_status}:interface=127.0.0.1",
            "--registrar-id=0x0a0a0a0a",
            *(f"--console-pe=http://127.0.0.1:{status_ports[n]}" for n in HOSTS),
            f"--console-keeper=http://127.0.0.1:{self.keeper_status}",
            *alert,
            ready="registrar 0x0a0a0a0a started",
        )
        self.status_ports = status_ports
        for n in HOSTS:
            self.start_pe(n)
        self.keeper = self._start(
            "xenpool-pu",
            f"--keep={d / 'vms.conf'}",
            f"--registrar=127.0.0.1:{self.asap}",
            f"--state-dir={d / 'keeper'}",
            "--pu-name=keeper",
            f"--pu-secret-file={d / 'keeper.secret'}",
            f"--status=tcp:{self.keeper_status}:interface=127.0.0.1",
            f"--heartbeat-interval={self.heartbeat[0]}",
            f"--heartbeat-timeout={self.heartbeat[1]}",
            f"--pool-secret-file={d / 'secret'}",
            *alert,
            ready="resolving",
        )

    def start_pe(self, n: int) -> Daemon:
        """Host ``n``'s PE daemon (again, after it was stopped or killed)."""
        d = self.dir
        fence = f"command={sys.executable} -m xenpool.tools.fence_process {{pidfile}}"
        status = self.status_ports[n]
        pe = self._start(
            "xenpool-pe",
            f"--registrar=tcp:host=127.0.0.1:port={self.asap}",
            f"--pe-id={n}",
            f"--port={free_port()}",
            "--bind=127.0.0.1",
            f"--host=host{n}",
            f"--libvirt-uri=test://{ETC / f'node-host{n}.xml'}",
            f"--status=tcp:{status}:interface=127.0.0.1",
            f"--pool-secret-file={d / 'secret'}",
            f"--pu-access={d / 'pu-access.conf'}",
            "--stonith=command",
            f"--stonith-option={fence}",
            f"--fence-map={d / 'fence-map.ini'}",
            "--load-interval=2",
            "--lease=30",
            *(f"--alert={command}" for command in self.alerts),
            ready="registered in pool Xen",
        )
        pe.status_port = status
        (d / f"host{n}.pid").write_text(str(pe.proc.pid))
        self.pes[n] = pe
        return pe

    def vms(self) -> list[dict]:
        return _get(self.keeper_status, "/vms")

    def loads(self) -> dict[int, float]:
        state = _get(self.registrar_status, "/handlespace")
        return {
            pe["identifier"]: pe["load"]
            for pool in state["pools"]
            for pe in pool["pool_elements"]
        }

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


def _table(cluster: Cluster, title: str, dead: set[int]) -> Group:
    vms = Table(title=title, expand=False)
    for column in ("VM", "RAM", "state", "runs on", "failovers", "last failover"):
        vms.add_column(column)
    for vm in cluster.vms():
        host = f"host{int(vm['pe'], 16)}" if vm["pe"] else "-"
        took = (
            f"{vm['last_failover_s']:.2f} s"
            if vm["last_failover_s"] is not None
            else ""
        )
        style = "green" if vm["state"] == "running" else "yellow"
        vms.add_row(
            vm["server_id"],
            f"{vm['ram_mb']} MB",
            f"[{style}]{vm['state']}[/{style}]",
            host,
            str(vm["failovers"]),
            took,
        )
    hosts = Table(title="hosts (the registrar's view)")
    for column in ("host", "PE", "load reported"):
        hosts.add_column(column)
    loads = cluster.loads()
    for n in HOSTS:
        load = (
            "[red]dead (killed)[/red]"
            if n in dead
            else (f"{loads[n]:.0%}" if n in loads else "not registered")
        )
        hosts.add_row(f"host{n}", f"0x{n:08x}", load)
    return Group(vms, hosts)


def _wait(
    live: Live,
    cluster: Cluster,
    title: str,
    dead: set[int],
    done,
    timeout: float = 60.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live.update(_table(cluster, title, dead))
        if done(cluster.vms()):
            return
        time.sleep(0.25)  # the demo's screen refresh, not a test
    raise RuntimeError(f"{title}: not done within {timeout:.0f} s")


def run(console: Console | None = None) -> int:
    console = console or Console()
    started = time.monotonic()
    console.rule(
        "[bold]xenpool[/bold]: highly available VMs on a pool of hypervisor hosts"
    )
    console.print(
        "A registrar, three hosts running the PE daemon on libvirt's test driver, and a keeper (a pool\n"
        "user) that holds six VMs. Each PE registers in pool 'Xen' and reports its load; the keeper asks\n"
        "the pool for a host per VM (least used first) and heartbeats every VM twice a second.\n"
    )
    with tempfile.TemporaryDirectory(prefix="xenpool-demo-") as workdir:
        cluster = Cluster(Path(workdir))
        try:
            console.print("starting the registrar, host1-3 and the keeper ...")
            cluster.start()
            with Live(console=console, refresh_per_second=8, transient=False) as live:
                _wait(
                    live,
                    cluster,
                    "placing 6 VMs",
                    set(),
                    lambda vms: all(v["state"] == "running" for v in vms),
                )
            placed = {v["server_id"]: v["pe"] for v in cluster.vms()}
            counts = {
                n: sum(pe == f"0x{n:08x}" for pe in placed.values()) for n in HOSTS
            }
            victim = max(counts, key=lambda n: counts[n])
            moved = sorted(
                name for name, pe in placed.items() if pe == f"0x{victim:08x}"
            )
            console.print(
                f"\n[bold red]host{victim} dies now[/bold red] (kill -9 of its PE, taking {', '.join(moved)} with it). "
                "The keeper sees its sessions drop, reports the PE unreachable, asks the pool again and echoes\n"
                "each VM's last cookie to another host, which fences the dead host before starting the VM.\n"
            )
            cluster.pes[victim].kill()
            with Live(console=console, refresh_per_second=8, transient=False) as live:
                _wait(
                    live,
                    cluster,
                    f"after host{victim} died",
                    {victim},
                    lambda vms: all(
                        v["state"] == "running" and v["pe"] != f"0x{victim:08x}"
                        for v in vms
                    ),
                )
            console.print("\nWhat the surviving hosts logged:")
            for n, pe in cluster.pes.items():
                if n == victim:
                    continue
                for line in pe.drain().splitlines():
                    if "fenced host" in line or (
                        "started" in line
                        and "for a PU" in line
                        and any(m in line for m in moved)
                    ):
                        console.print(f"  host{n}: {line.split('] ', 1)[-1]}")
            times = [
                v["last_failover_s"] for v in cluster.vms() if v["server_id"] in moved
            ]
            console.print(
                f"\n{len(moved)} VMs moved, each started exactly once more, after its old host was fenced. "
                f"Failover took {min(times):.2f}-{max(times):.2f} s from the moment the keeper noticed the loss "
                f"(the prototype needed 64-167 s including detection and guest boot)."
            )
        finally:
            console.print("\nstopping everything ...")
            cluster.stop()
    console.print(f"done in {time.monotonic() - started:.0f} s.")
    return 0
