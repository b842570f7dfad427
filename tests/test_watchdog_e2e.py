"""Self-fencing with the ``watchdog`` stonith, end to end: a real registrar and two real
PEs (``twistd -n xenpool-pe --stonith watchdog``) whose watchdog device is a FIFO this
test reads, recording when each feed arrives. Small timings: lost-after 1 s, timeout 1 s,
margin 0.5 s, so a watchdog fence waits 1 + 2 x 1 + 0.5 = 3.5 s. Nothing sleeps: every
wait is a log line or a poll with a deadline."""

from __future__ import annotations

import json
import os
import re
import select
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from .daemons import Daemon, free_port

pytestmark = pytest.mark.slow
ETC = Path(__file__).parents[1] / "etc" / "xenpool"
LOST, TIMEOUT, MARGIN = 1.0, 1.0, 0.5
WAIT = LOST + 2 * TIMEOUT + MARGIN
#: How late the reader may see a feed after it was written (scheduling on a busy machine).
SLACK = 0.5


class Feeds(threading.Thread):
    """Reads a FIFO standing in for /dev/watchdog; ``times``: when each byte came."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(
            path, os.O_RDONLY | os.O_NONBLOCK
        )  # before the PE opens it for writing
        self.times: list[float] = []
        self.stopping = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except BlockingIOError:
                    continue
                if not data:  # the PE closed it (or died)
                    return
                now = time.monotonic()
                self.times.extend([now] * len(data))

    def between(self, start: float, end: float) -> list[float]:
        return [t for t in list(self.times) if start < t < end]

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        os.close(self.fd)


def start_registrar(cwd: Path, asap: int, status: int) -> Daemon:
    return Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--status=tcp:{status}:interface=127.0.0.1",
        "--registrar-id=0x0b0b0b0b",
        ready="registrar 0x0b0b0b0b started",
        cwd=cwd,
    )


@pytest.fixture
def pool(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("the watchdog test's pool secret\n")
    asap, status = free_port(), free_port()
    daemons = {"registrar": start_registrar(tmp_path, asap, status)}
    feeds, pes = {}, {}
    try:
        for n in (1, 2):
            feeds[n] = Feeds(tmp_path / f"watchdog{n}")
            pes[n] = daemons[f"pe{n}"] = Daemon(
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
                "--stonith=watchdog",
                f"--stonith-option=device={feeds[n].path},lost-after={LOST:g},timeout={TIMEOUT:g},margin={MARGIN:g}",
                "--load-interval=1",
                "--shutdown-timeout=2",
                ready="registered in pool Xen",
                cwd=tmp_path,
            )
            pes[n].wait_for("a registrar confirmed this PE; feeding")
        yield tmp_path, daemons, pes, feeds, asap, status
    finally:
        for daemon in reversed(list(daemons.values())):
            daemon.stop()
        for reader in feeds.values():
            reader.close()


def test_feeding_stops_without_a_registrar_and_resumes_with_one(pool):
    cwd, daemons, pes, feeds, asap, status = pool
    marks = {n: pe.mark() for n, pe in pes.items()}
    stopped_at = time.monotonic()
    daemons["registrar"].stop()  # no registrar: no registration is confirmed any more
    for n, pe in pes.items():
        pe.wait_for(
            "WATCHDOG STARVED: no registrar confirmed this PE for 1s",
            timeout=10,
            since=marks[n],
        )
    starved_seen = time.monotonic()
    for n in pes:
        before = feeds[n].between(0, starved_seen)
        assert before, f"PE {n} never fed"
        # its last confirmed registration was sent before the registrar stopped, so it
        # fed at most lost-after after that
        assert before[-1] <= stopped_at + LOST + SLACK, (
            before[-1] - stopped_at,
            pes[n].log,
        )
    marks = {n: pe.mark() for n, pe in pes.items()}
    restarted_at = time.monotonic()
    daemons["registrar"] = start_registrar(cwd, asap, status)
    for n, pe in pes.items():
        pe.wait_for(
            "a registrar confirmed this PE; feeding", timeout=15, since=marks[n]
        )
    resumed_seen = time.monotonic()
    for n in pes:
        assert (
            feeds[n].between(starved_seen, restarted_at) == []
        )  # nothing while starving
        after = feeds[n].between(restarted_at, time.monotonic() + 1)
        deadline = time.monotonic() + 10
        while (
            not after and time.monotonic() < deadline
        ):  # the first feed may still be in the pipe
            select.select([], [], [], 0.05)
            after = feeds[n].between(restarted_at, time.monotonic() + 1)
        assert after, pes[n].log
    assert resumed_seen > restarted_at


def get_json(port: int, path: str):
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}{path}", timeout=10
    ) as response:
        return json.load(response)


def test_takeover_waits_for_the_dead_hosts_watchdog(pool):
    cwd, daemons, pes, feeds, asap, status = pool
    (cwd / "vms.conf").write_text("[vm web1]\nram = 100\nips = 10.0.5.1\n")
    keeper_status = free_port()
    keeper = daemons["keeper"] = Daemon(
        "xenpool-pu",
        f"--keep={cwd / 'vms.conf'}",
        f"--registrar=127.0.0.1:{asap}",
        f"--state-dir={cwd / 'keeper'}",
        f"--status=tcp:{keeper_status}:interface=127.0.0.1",
        "--heartbeat-interval=0.5",
        "--heartbeat-timeout=1.5",
        ready="web1: running",
        cwd=cwd,
        timeout=20,
    )
    where = {vm["server_id"]: vm["pe"] for vm in get_json(keeper_status, "/vms")}[
        "web1"
    ]
    victim = int(where, 16)
    survivor = pes[3 - victim]
    mark, since = survivor.mark(), keeper.mark()
    pes[victim].kill()  # kill -9: the host is gone, and so is its registration
    keeper.wait_for("web1: running: on PE", timeout=30, since=since)
    log = survivor.drain()[mark:]
    waiting = log.find(
        f"fencing host{victim}: its PE 0x{victim:08x} is not registered with the pool; waiting {WAIT:g}s"
    )
    fenced = re.search(
        rf"fenced host{victim}: off confirmed \(watchdog: PE 0x{victim:08x} unregistered for ([0-9.]+)s",
        log,
    )
    assert waiting != -1 and fenced, log
    assert float(fenced.group(1)) >= WAIT  # the whole wait, on the survivor's own clock
    started = log.find("started web1")
    assert (
        waiting
        < fenced.start()
        < log.find(f"fenced host{victim} before starting web1")
        < started
    ), log
    assert "registered with the pool again" not in log and "FENCING" not in log
