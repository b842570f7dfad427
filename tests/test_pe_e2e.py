"""A registrar and two PE daemons on libvirt's test driver, with a test PU: real processes."""

from __future__ import annotations

import json
import struct
import urllib.request
from pathlib import Path

import pytest

from xenpool.protocol import framing
from xenpool.protocol import messages as M
from xenpool.protocol import session as S

from .daemons import AsapClient, Daemon, SessionClient, free_port

pytestmark = pytest.mark.slow
ETC = Path(__file__).parents[1] / "etc" / "xenpool"
RUNNING = 1


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}{path}", timeout=10
    ) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pool")
    secret = cwd / "secret"
    secret.write_text("a pool secret for the e2e test\n")
    asap, status = free_port(), free_port()
    registrar = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--status=tcp:{status}:interface=127.0.0.1",
        "--registrar-id=0x0a0a0a0a",
        ready="registrar 0x0a0a0a0a started",
        cwd=cwd,
    )
    registrar.asap, registrar.status = asap, status
    pes = {}
    for n in (1, 2):
        port, pe_status = free_port(), free_port()
        pes[n] = Daemon(
            "xenpool-pe",
            f"--registrar=tcp:host=127.0.0.1:port={asap}",
            f"--pe-id={n}",
            f"--port={port}",
            "--bind=127.0.0.1",
            f"--host=host{n}",
            f"--libvirt-uri=test://{ETC / f'node-host{n}.xml'}",
            f"--status=tcp:{pe_status}:interface=127.0.0.1",
            f"--pool-secret-file={secret}",
            "--load-interval=3600",
            "--shutdown-timeout=2",
            "--load-plugin=weighted",
            "--load-weight=cpu=0.5,ram=0.5",
            "--lease=0",
            ready="registered in pool Xen",
            cwd=cwd,
        )
        pes[n].port, pes[n].status = port, pe_status
    yield registrar, pes
    for daemon in (*pes.values(), registrar):
        daemon.stop()


def raw_create(server_id: bytes, ram: int = 64) -> bytes:
    """A CreateServer frame built by hand, for what the encoder refuses to make."""
    text = lambda b: struct.pack("!H", len(b)) + b  # noqa: E731
    body = text(server_id) + text(b"") + text(b"") + struct.pack("!IH2x", ram, 1)
    return framing.shim_frame(
        S.XENPOOL_PPID, struct.pack("!BBHHH", 1, 0, 8 + len(body), 1, 0) + body
    )


def create(pe: Daemon, server_id: str, ram: int) -> tuple[SessionClient, list]:
    pu = SessionClient(pe.port)
    pu.send(S.CreateServer(server_id, "", ("10.0.5.1",), ram))
    return pu, pu.receive_until(S.CreateResult)


def loads(registrar: Daemon) -> dict[int, float]:
    state = get_json(registrar.status, "/handlespace")
    return {
        pe["identifier"]: pe["load"]
        for pool in state["pools"]
        for pe in pool["pool_elements"]
    }


def test_both_pes_registered(pool):
    registrar, pes = pool
    for pe in pes.values():  # the test driver has lifecycle events: the PEs use them
        pe.wait_for("lifecycle events on")
    client = AsapClient(registrar.asap)
    answer = client.request(M.HandleResolution(b"Xen", items=10))
    assert sorted(e.identifier for e in answer.pool_elements) == [1, 2]
    ports = {e.identifier: e.user_transport.port for e in answer.pool_elements}
    assert ports == {1: pes[1].port, 2: pes[2].port}
    client.close()


def test_create_heartbeat_and_disconnect(pool):
    registrar, pes = pool
    before = get_json(pes[1].status, "/status")
    pu, received = create(pes[1], "web1", 300)
    cookies = [m for m in received if isinstance(m, M.Cookie)]
    assert len(cookies) == 2 and received[-1].code == S.ResultCode.STARTED, received
    status = get_json(pes[1].status, "/status")
    assert status["domains"]["web1"]["state"] == RUNNING  # in that PE's libvirt
    assert status["domains"]["web1"]["ram_kb"] == 300 * 1024
    assert "web1" not in get_json(pes[2].status, "/status")["domains"]
    assert status["free_ram_kb"] == before["free_ram_kb"] - 300 * 1024
    for _ in range(3):
        pu.send(S.CheckRunning("web1", 1))
        assert pu.receive() == S.CheckRunningResponse("web1", RUNNING)
    # the early load update after the start reached the registrar
    assert loads(registrar)[1] > loads(registrar)[2]
    pu.close()  # the PU goes away: the VM is shut down, its RAM returned
    pes[1].wait_for("web1 stopped, 300 MB returned")
    status = get_json(pes[1].status, "/status")
    assert (
        "web1" not in status["domains"]
        and status["free_ram_kb"] == before["free_ram_kb"]
    )


def test_ram_exhausted_is_code_11_and_raises_the_load(pool):
    registrar, pes = pool
    pu, received = create(pes[2], "huge", 4000)
    assert received[-1].code == S.ResultCode.NO_RAM and "KB free" in received[-1].reason
    assert pu.closed_by_peer()
    for _ in range(100):  # the raised load goes out as an early update
        if loads(registrar)[2] == 1.0:
            break
    assert loads(registrar)[2] == 1.0
    assert get_json(pes[2].status, "/status")["refusals"] == {"no_ram": 1}


@pytest.mark.parametrize(
    "frame, expected",
    [
        (framing.frame_message(S.CreateServer("", "", (), 64)), "server_id"),
        (raw_create(b"x" * 40), "server_id"),
        (framing.frame_message(S.CreateServer("web2", "", (), 0)), "ram_mb"),
        (framing.frame_message(S.CreateServer("web2", "", ("10.0.0.300",), 64)), "ips"),
        (
            framing.shim_frame(0x58504C31, struct.pack("!BBHHH", 0x7F, 0, 8, 1, 0)),
            "unknown message type",
        ),
        (framing.frame_message(S.CreateServer("web2", "", (), 10**6)), "KB free"),
    ],
)
def test_invalid_requests_get_their_errors(pool, frame, expected):
    _registrar, pes = pool
    pu = SessionClient(pes[1].port)
    pu.send_raw(frame)
    (answer,) = [
        m for m in pu.receive_until(S.CreateResult) if isinstance(m, S.CreateResult)
    ]
    assert (
        answer.code in (S.ResultCode.INVALID_REQUEST, S.ResultCode.NO_RAM)
        and expected in answer.reason
    )
    pu.close()
    assert pes[1].alive()
    # still serving
    name = f"after-bad-input-{len(pes[1].log)}"  # unique: the log only grows
    again, received = create(pes[1], name, 64)
    assert received[-1].code == S.ResultCode.STARTED
    again.close()
    pes[1].wait_for(f"{name} stopped")


def test_status_metrics(pool):
    _registrar, pes = pool
    with urllib.request.urlopen(
        f"http://127.0.0.1:{pes[2].status}/metrics", timeout=10
    ) as response:
        metrics = response.read().decode()
    assert (
        "xenpool_pe_load" in metrics
        and 'xenpool_pe_load_component{component="ram"}' in metrics
    )
    assert 'xenpool_pe_refusals_total{code="no_ram"}' in metrics


def test_unknown_load_plugin_stops_with_the_installed_names(tmp_path):
    import subprocess

    from .daemons import TWISTD

    result = subprocess.run(
        [TWISTD, "-n", "xenpool-pe", "--load-plugin=nosuch"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "--load-plugin: no load metric named 'nosuch'; installed: cpu, max, weighted"
        in output
    )


def test_a_negative_load_window_is_refused_by_name(tmp_path):
    import subprocess

    from .daemons import TWISTD

    result = subprocess.run(
        [TWISTD, "-n", "xenpool-pe", "--load-window=-5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "--load-window: must be >= 0, got -5" in result.stdout + result.stderr


def test_disks_are_checked_before_the_start(pool, tmp_path):
    _registrar, pes = pool
    disk = tmp_path / "web-disk.img"
    disk.write_bytes(b"\0" * 4096)
    pu = SessionClient(pes[2].port)
    pu.send(S.CreateServer("with-disk", str(disk), (), 64))
    assert pu.receive_until(S.CreateResult)[-1].code == S.ResultCode.STARTED
    pu.close()
    pes[2].wait_for("with-disk stopped")
    unreachable, invalid = S.ResultCode.DISK_UNREACHABLE, S.ResultCode.INVALID_REQUEST
    for spec, code, expected in (
        (str(tmp_path / "missing.img"), unreachable, "missing.img"),
        ("nbd://127.0.0.1:1/web1", unreachable, "cannot connect"),
        ("gopher://x/y", invalid, "supported schemes"),  # no plugin takes it: invalid
    ):
        pu = SessionClient(pes[2].port)
        pu.send(S.CreateServer("bad-disk", spec, (), 64))
        result = pu.receive_until(S.CreateResult)[-1]
        assert result.code == code and expected in result.reason, result
        pu.close()


def test_the_example_configs_are_valid(tmp_path):
    from xenpool.pe.access import PuRule
    from xenpool.pe.tap import Options as PeOptions
    from xenpool.pu.tap import Options as KeeperOptions

    # PU access control is on in the shipped configs, with secrets in /etc/xenpool that
    # this machine has not made: the same files, with a secret here.
    assert "\npu-access = /etc/xenpool/pu-access.conf" in (ETC / "pe.conf").read_text()
    access = tmp_path / "pu-access.conf"
    access.write_text((ETC / "pu-access.conf").read_text())
    (tmp_path / "keeper.secret").write_text("a keeper secret for the test\n")
    pe = PeOptions()
    pe.parseOptions(
        [
            f"--config={ETC / 'pe.conf'}",
            "--libvirt-uri=test:///default",
            f"--pu-access={access}",
        ]
    )
    assert (
        pe.settings["load-weight"] == {"cpu": 0.75, "ram": 0.25}
        and pe.settings["libvirt-uri"] == "test:///default"
    )
    assert pe.access_rules == [
        PuRule("keeper", b"a keeper secret for the test", ("*",))
    ]
    vms = (ETC / "vms.conf").read_text()
    assert "\npu-name = keeper\npu-secret-file = /etc/xenpool/keeper.secret" in vms
    keeper = KeeperOptions()
    keeper.parseOptions(
        [f"--keep={ETC / 'vms.conf'}", f"--pu-secret-file={tmp_path / 'keeper.secret'}"]
    )
    assert keeper.settings["pu-name"] == "keeper"
    assert [vm.server_id for vm in keeper.vms] == ["web1", "db1"] and keeper.settings[
        "heartbeat-timeout"
    ] == 3.0


def test_pool_wide_uniqueness_and_cookie_refusals(pool, tmp_path):
    """Whatever a PU sends: a second ServerID, disk or IP anywhere in the pool is code 13
    naming the host that holds it; a forged, altered or replayed cookie is refused."""
    from xenpool.protocol import cookie as C

    _registrar, pes = pool
    disk = tmp_path / "unique.img"
    disk.write_bytes(b"\0" * 512)
    holder, received = create_with(
        pes[1], S.CreateServer("unique1", str(disk), ("10.7.0.1",), 64)
    )
    assert received[-1].code == S.ResultCode.STARTED
    cookie = [m for m in received if isinstance(m, M.Cookie)][-1].cookie
    for request, expected in (
        # the voters refuse the lease to host2; host1, which holds it, answers that it runs it
        (S.CreateServer("unique1", "", (), 64), "unique1 runs on host1"),
        (
            S.CreateServer("unique2", str(disk), (), 64),
            f"disk {disk} is used by unique1 on host1",
        ),
        (
            S.CreateServer("unique3", "", ("10.7.0.9", "10.7.0.1"), 64),
            "IP 10.7.0.1 is used by unique1 on host1",
        ),
    ):
        pu, answers = create_with(pes[2], request)
        assert (
            answers[-1].code == S.ResultCode.ALREADY_RUNNING
            and expected in answers[-1].reason
        ), answers[-1]
        pu.close()
    forged = C.seal(C.peek(cookie), b"not the pool's secret")
    altered = cookie[:20] + bytes([cookie[20] ^ 1]) + cookie[21:]
    for bad, expected in ((forged, "bad MAC"), (altered, "bad MAC")):
        pu = SessionClient(pes[2].port)
        pu.send(M.CookieEcho(bad))
        result = pu.receive_until(S.CreateResult)[-1]
        assert result.code == S.ResultCode.COOKIE_REJECTED and expected in result.reason
        pu.close()
    replay = SessionClient(pes[2].port)  # a genuine cookie, but host1 runs the VM
    replay.send(M.CookieEcho(cookie))
    result = replay.receive_until(S.CreateResult)[-1]
    assert (
        result.code == S.ResultCode.ALREADY_RUNNING
        and "unique1 runs on host1" in result.reason
    )
    replay.close()
    assert "unique1" not in get_json(pes[2].status, "/status")["domains"]
    holder.close()
    pes[1].wait_for("unique1 stopped")


def create_with(pe: Daemon, request: S.CreateServer) -> tuple[SessionClient, list]:
    pu = SessionClient(pe.port)
    pu.send(request)
    return pu, pu.receive_until(S.CreateResult)


def test_xenpool_pu_create_keeps_the_vm_and_ctrl_c_stops_it(pool):
    """The PU command as an operator runs it, against the real registrar and PEs."""
    import signal
    import subprocess
    import sys

    from xenpool.tools import processes

    registrar, pes = pool
    pu = processes.Process(
        [
            str(Path(sys.executable).with_name("xenpool-pu")),
            "create",
            "--server-id",
            "cli1",
            "--ram",
            "64",
            "--ip",
            "10.8.0.1",
            "--registrar",
            f"127.0.0.1:{registrar.asap}",
            "--heartbeat-interval",
            "0.2",
        ],
    )
    proc = pu.proc
    try:
        pu.wait_for("cli1: running: on PE")
        pu.wait_for("cli1: running: domain running")
        host = next(
            n
            for n, pe in pes.items()
            if "cli1" in get_json(pe.status, "/status")["domains"]
        )
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the VM is stopped cleanly
        assert proc.wait(30) == 0
        pes[host].wait_for("cli1 stopped")
        assert "cli1" not in get_json(pes[host].status, "/status")["domains"]
        pu.drain()
        assert "stopping the VM" in pu.log and "cli1: stopped" in pu.log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # a request the pool refuses for good exits 3; a bad command line exits 2
    holder, _ = create_with(pes[1], S.CreateServer("cli2", "", (), 64))
    refused = subprocess.run(
        [
            str(Path(sys.executable).with_name("xenpool-pu")),
            "create",
            "--server-id",
            "cli2",
            "--ram",
            "64",
            "--registrar",
            f"127.0.0.1:{registrar.asap}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        refused.returncode == 3
        and "code 13, cli2 runs" in refused.stdout
        and "host1" in refused.stdout
    )
    holder.close()
    bad = subprocess.run(
        [
            str(Path(sys.executable).with_name("xenpool-pu")),
            "create",
            "--server-id",
            "x y",
            "--ram",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--server-id" in bad.stderr
