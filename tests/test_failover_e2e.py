"""The whole point: registrar + 3 PEs + a keeper with 6 VMs; a PE is killed, its VMs are
fenced and restarted elsewhere exactly once; the keeper restarts and re-adopts. Real
processes, libvirt's test driver (each PE process is a host: killing it is a power-off).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from .daemons import Daemon, free_port

pytestmark = pytest.mark.slow
ETC = Path(__file__).parents[1] / "etc" / "xenpool"
VMS = [f"web{i}" for i in range(1, 7)]


def get_json(port: int, path: str):
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}{path}", timeout=10
    ) as response:
        return json.load(response)


def start_keeper(cwd: Path, asap: int, status: int) -> Daemon:
    return Daemon(
        "xenpool-pu",
        f"--keep={cwd / 'vms.conf'}",
        f"--registrar=127.0.0.1:{asap}",
        f"--state-dir={cwd / 'keeper'}",
        f"--status=tcp:{status}:interface=127.0.0.1",
        "--heartbeat-interval=0.5",
        "--heartbeat-timeout=1.5",
        ready="web6: running",
        cwd=cwd,
        timeout=20,
    )


@pytest.fixture
def cluster(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("the failover test's pool secret\n")
    fence_map = tmp_path / "fence-map.ini"
    fence_map.write_text(
        "".join(f"[host{n}]\npidfile = {tmp_path / f'pe{n}.pid'}\n" for n in (1, 2, 3))
    )
    (tmp_path / "vms.conf").write_text(
        "".join(
            f"[vm {name}]\nram = 100\nips = 10.0.5.{i}\n"
            for i, name in enumerate(VMS, 1)
        )
    )
    asap, status = free_port(), free_port()
    registrar = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--status=tcp:{status}:interface=127.0.0.1",
        "--registrar-id=0x0a0a0a0a",
        ready="registrar 0x0a0a0a0a started",
        cwd=tmp_path,
    )
    pes = {}
    for n in (1, 2, 3):
        pes[n] = Daemon(
            "xenpool-pe",
            f"--registrar=tcp:host=127.0.0.1:port={asap}",
            f"--pe-id={n}",
            f"--port={free_port()}",
            "--bind=127.0.0.1",
            f"--host=host{n}",
            f"--libvirt-uri=test://{ETC / f'node-host{n}.xml'}",
            f"--status=tcp:{free_port()}:interface=127.0.0.1",
            f"--pool-secret-file={secret}",
            "--lease=30",
            "--stonith=command",
            f"--stonith-option=command={sys.executable} -m xenpool.tools.fence_process {{pidfile}}",
            f"--fence-map={fence_map}",
            "--load-interval=1",
            "--shutdown-timeout=2",
            ready="registered in pool Xen",
            cwd=tmp_path,
        )
        pes[n].status_port = int(
            next(a for a in pes[n].argv if a.startswith("--status=")).split(":")[1]
        )
        (tmp_path / f"pe{n}.pid").write_text(str(pes[n].proc.pid))
    keeper_status = free_port()
    keeper = start_keeper(tmp_path, asap, keeper_status)
    yield tmp_path, registrar, pes, keeper, asap, keeper_status
    for daemon in (keeper, *pes.values(), registrar):
        daemon.stop()


def domains(pe: Daemon) -> set[str]:
    return set(get_json(pe.status_port, "/status")["domains"])


def where(keeper_status: int) -> dict[str, str]:
    return {vm["server_id"]: vm["pe"] for vm in get_json(keeper_status, "/vms")}


def test_kill_a_pe_then_restart_the_keeper(cluster):
    cwd, _registrar, pes, keeper, asap, keeper_status = cluster
    for name in VMS:
        keeper.wait_for(f"{name}: running")
    placement = where(keeper_status)
    running = {n: domains(pe) for n, pe in pes.items()}
    assert (
        sorted(v for names in running.values() for v in names) == VMS
    )  # each exactly once
    victim = max(running, key=lambda n: len(running[n]))
    moved = sorted(running[victim])
    assert moved and all(placement[name] == f"0x{victim:08x}" for name in moved)

    since = keeper.mark()
    pes[victim].kill()  # kill -9: the host is gone
    for name in moved:
        keeper.wait_for(f"{name}: running: on PE", since=since)
    survivors = {n: domains(pe) for n, pe in pes.items() if n != victim}
    assert (
        sorted(v for names in survivors.values() for v in names) == VMS
    )  # all, exactly once
    for n, pe in pes.items():
        if n == victim:
            continue
        log = pe.drain()
        for name in running_here(survivors[n], moved):
            fenced = log.find(f"fenced host{victim} before starting {name}")
            assert fenced != -1, log
            assert log.find(f"started {name}", fenced) > fenced  # the fence came first

    # The keeper goes away: its VMs keep running on their PEs for the lease ...
    marks = {n: pe.mark() for n, pe in pes.items() if n != victim}
    keeper.stop()
    for n, names in survivors.items():
        for name in names:
            pes[n].wait_for(f"{name}: its PU is gone; kept for 30.0 s", since=marks[n])
        assert domains(pes[n]) == names
    # ... and a new keeper with the same state re-adopts them, starting none twice.
    keeper2 = start_keeper(cwd, asap, free_port())
    try:
        for name in VMS:
            keeper2.wait_for(f"{name}: running")
        after = {n: domains(pe) for n, pe in pes.items() if n != victim}
        assert after == survivors
        readopted = sum(
            pe.drain().count("re-adopted by its keeper")
            for n, pe in pes.items()
            if n != victim
        )
        assert readopted == len(VMS)
    finally:
        keeper2.stop()


def running_here(names: set[str], moved: list[str]) -> list[str]:
    return [name for name in moved if name in names]
