"""Three registrars as real processes: ENRP sync, takeover after kill -9, resync on restart."""

from __future__ import annotations

import json
import urllib.request

import pytest

from xenpool.protocol import messages as M
from xenpool.tools.processes import wait_for_any

from .daemons import AsapClient, Daemon, element, free_port, poll, resolvable

pytestmark = pytest.mark.slow
IDS = {1: 0x11111111, 2: 0x22222222, 3: 0x33333333}
TIMERS = ["--peer-heartbeat-interval=0.2", "--peer-timeout=1.0"]
ALL = {1, 2, 3, 4, 5}  # the PEs registered at the first registrar


def start(n: int, ports: dict, cwd) -> Daemon:
    peers = [f"--peer=tcp:host=127.0.0.1:port={ports[m]['enrp']}" for m in IDS if m < n]
    daemon = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{ports[n]['asap']}:interface=127.0.0.1",
        f"--enrp=tcp:{ports[n]['enrp']}:interface=127.0.0.1",
        f"--status=tcp:{ports[n]['status']}:interface=127.0.0.1",
        f"--registrar-id={IDS[n]:#x}",
        *TIMERS,
        *peers,
        ready=f"registrar {IDS[n]:#010x} started",
        cwd=cwd,
    )
    daemon.ports = ports[n]
    return daemon


def pool_view(daemon: Daemon) -> dict[int, int]:
    """PE identifier -> home registrar, from the registrar's /handlespace."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{daemon.ports['status']}/handlespace", timeout=10
    ) as response:
        state = json.load(response)
    return {
        pe["identifier"]: pe["home_registrar"]
        for pool in state["pools"]
        for pe in pool["pool_elements"]
    }


def test_three_registrars(tmp_path):
    ports = {
        n: {"asap": free_port(), "enrp": free_port(), "status": free_port()}
        for n in IDS
    }
    registrars = {n: start(n, ports, tmp_path) for n in IDS}
    pes = []
    try:
        for n in (2, 3):  # both see the first (and each other)
            registrars[n].wait_for(f"ENRP peer {IDS[1]:#010x} is up")
        for i in range(1, 6):
            client = AsapClient(ports[1]["asap"])
            assert client.request(M.Registration(b"Xen", element(i))).reject is False
            pes.append(client)
        # Registered at the first, resolvable at the second and third.
        for n in (2, 3):
            assert (
                poll(lambda n=n: resolvable(registrars[n]), lambda pes: pes == ALL)
                == ALL
            )
            assert set(pool_view(registrars[n]).values()) == {IDS[1]}

        # kill -9 the first: one of the others takes its PEs over, none is lost.
        registrars[1].kill()
        winner = wait_for_any(
            [registrars[2], registrars[3]],
            f"took over 5 PEs of ENRP peer {IDS[1]:#010x}",
        )
        views = poll(
            lambda: [set(pool_view(registrars[n]).values()) for n in (2, 3)],
            lambda views: (
                views[0] == views[1] and len(views[0]) == 1 and IDS[1] not in views[0]
            ),
        )
        (new_home,) = views[0]
        assert (
            views == [{new_home}, {new_home}]
            and new_home == IDS[2 if winner is registrars[2] else 3]
        )
        for n in (2, 3):
            assert resolvable(registrars[n]) == {1, 2, 3, 4, 5}
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{winner.ports['status']}/metrics", timeout=10
        ).read()
        assert b"xenpool_takeovers_total 1.0" in metrics

        # The first comes back with the same identity and resyncs from its peers.
        registrars[1] = start(1, ports, tmp_path)
        for n in (2, 3):
            registrars[1].wait_for(f"ENRP peer {IDS[n]:#010x} is up")
        assert poll(lambda: resolvable(registrars[1]), lambda pes: pes == ALL) == ALL
        assert set(pool_view(registrars[1]).values()) == {new_home}
    finally:
        for client in pes:
            client.close()
        for daemon in registrars.values():
            daemon.stop()


def test_a_pe_moves_to_another_registrar_when_its_home_dies(tmp_path):
    """PE issue: 'registers at another registrar when its home registrar is gone'."""
    from pathlib import Path as _Path

    etc = _Path(__file__).resolve().parents[1] / "etc" / "xenpool"
    ports = {
        n: {"asap": free_port(), "enrp": free_port(), "status": free_port()}
        for n in (1, 2)
    }
    registrars = {n: start(n, ports, tmp_path) for n in (1, 2)}
    pe = None
    try:
        pe = Daemon(
            "xenpool-pe",
            f"--registrar=tcp:host=127.0.0.1:port={ports[1]['asap']}",
            f"--registrar=tcp:host=127.0.0.1:port={ports[2]['asap']}",
            "--pe-id=0x77",
            f"--port={free_port()}",
            "--bind=127.0.0.1",
            f"--libvirt-uri=test://{etc / 'node-host1.xml'}",
            "--load-interval=0.5",
            ready="registered in pool Xen",
            cwd=tmp_path,
        )
        assert pool_view(registrars[1]) == {0x77: IDS[1]}
        since = pe.mark()
        registrars[1].kill()
        pe.wait_for(
            "registered in pool Xen", since=since
        )  # now at the second registrar
        assert poll(
            lambda: pool_view(registrars[2]), lambda view: view.get(0x77) == IDS[2]
        ) == {0x77: IDS[2]}  # its new home
        assert 0x77 in resolvable(registrars[2])
    finally:
        for daemon in (pe, *registrars.values()):
            if daemon is not None:
                daemon.stop()
