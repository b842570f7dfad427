"""The registrar as a real `twistd` process on loopback, spoken to over real TCP."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import urllib.request

import pytest

from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol.errors import Cause

from .daemons import TWISTD, AsapClient, Daemon, free_port
from .daemons import loaded_element as pe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registrar(tmp_path_factory):
    asap, status = free_port(), free_port()
    config = tmp_path_factory.mktemp("registrar") / "registrar.conf"
    secret = config.parent / "secret"
    secret.write_bytes(b"the e2e pool secret\n")
    config.write_text(
        "[registrar]\nkeep-alive-interval = 30\nmax-resolution-items = 2\nidle-timeout = 30\n"
        f"pool-secret = secret-pool:{secret}\n"
    )
    daemon = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--status=tcp:{status}:interface=127.0.0.1",
        "--registrar-id=0x0a0a0a0a",
        f"--config={config}",
        "--max-resolution-items=3",
        f"--logfile={config.parent / 'registrar.json'}",
        ready="registrar 0x0a0a0a0a started",
        cwd=config.parent,
    )
    daemon.asap, daemon.status = asap, status
    yield daemon
    daemon.stop()


def handlespace(registrar) -> dict:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{registrar.status}/handlespace", timeout=10
    ) as response:
        return json.load(response)


def test_register_resolve_and_lose_pes(registrar):
    pes = {i: AsapClient(registrar.asap) for i in (1, 2, 3, 4)}
    loads = {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.9}
    for i, client in pes.items():
        answer = client.request(M.Registration(b"e2e", pe(i, 5000 + i, loads[i])))
        assert answer == M.RegistrationResponse(b"e2e", i)

    pu = AsapClient(registrar.asap)
    answer = pu.request(M.HandleResolution(b"e2e"))
    # LeastUsed, at most 3 per answer (the command line overrides the config file's 2)
    assert [e.identifier for e in answer.pool_elements] == [2, 3, 1]
    assert answer.pool_elements[0].home_registrar == 0x0A0A0A0A
    answer = pu.request(M.HandleResolution(b"e2e", items=10))
    assert [e.identifier for e in answer.pool_elements] == [2, 3, 1, 4]

    # a re-registration carries a new load
    assert pes[2].request(M.Registration(b"e2e", pe(2, 5002, 0.95))).reject is False
    answer = pu.request(M.HandleResolution(b"e2e"))
    assert [e.identifier for e in answer.pool_elements] == [3, 1, 4]

    # a PE whose connection is gone is gone from the pool at once
    pes.pop(3).close()
    for _ in range(50):  # the registrar sees the close asynchronously; ask until it has
        answer = pu.request(M.HandleResolution(b"e2e", items=10))
        if 3 not in [e.identifier for e in answer.pool_elements]:
            break
    assert sorted(e.identifier for e in answer.pool_elements) == [1, 2, 4]
    assert sorted(
        p["identifier"] for p in handlespace(registrar)["pools"][0]["pool_elements"]
    ) == [1, 2, 4]

    # deregistration, then an unknown pool
    assert pes[4].request(M.Deregistration(b"e2e", 4)) == M.DeregistrationResponse(
        b"e2e", 4
    )
    refused = pu.request(M.HandleResolution(b"nothing"))
    assert (
        refused.pool_elements == ()
        and refused.error.causes[0].code == Cause.UNKNOWN_POOL_HANDLE
    )
    for client in (*pes.values(), pu):
        client.close()


def test_registration_rules(registrar):
    first, second = AsapClient(registrar.asap), AsapClient(registrar.asap)
    assert first.request(M.Registration(b"rules", pe(7, 6007, 0.2))).reject is False
    other_policy = second.request(
        M.Registration(b"rules", pe(8, 6008, 0.2, P.PolicyType.LEAST_USED_DEGRADATION))
    )
    assert (
        other_policy.reject
        and other_policy.error.causes[0].code == Cause.INCONSISTENT_POLICY
    )
    same_id_elsewhere = second.request(M.Registration(b"rules", pe(7, 6999, 0.2)))
    assert (
        same_id_elsewhere.reject
        and same_id_elsewhere.error.causes[0].code == Cause.NON_UNIQUE_PE_IDENTIFIER
    )
    sctp = P.PoolElement(
        9,
        0,
        60_000,
        P.SctpTransport(6009, ("127.0.0.1",)),
        P.PoolPolicy.make(P.PolicyType.LEAST_USED),
    )
    other_transport = second.request(M.Registration(b"rules", sctp))
    assert (
        other_transport.reject
        and other_transport.error.causes[0].code == Cause.INCONSISTENT_TRANSPORT
    )
    unknown = second.request(M.Deregistration(b"no such pool", 1))
    assert unknown.error.causes[0].code == Cause.UNKNOWN_POOL_HANDLE
    first.close()
    second.close()


def test_pool_secret_from_the_config_file(registrar):
    client = AsapClient(registrar.asap)
    refused = client.request(M.Registration(b"secret-pool", pe(1, 5001, 0.1)))
    assert refused.reject and refused.error.causes[0].code == Cause.SECURITY_REJECTION
    proof = P.registration_mac(b"the e2e pool secret", b"secret-pool", pe(1, 5001, 0.1))
    assert (
        client.request(M.Registration(b"secret-pool", pe(1, 5001, 0.1), proof)).reject
        is False
    )
    client.close()


def test_garbage_gets_an_error_and_the_daemon_keeps_serving(registrar):
    client = AsapClient(registrar.asap)
    answer = client.request(b"\x42\x00\x00\x08junk")
    assert (
        isinstance(answer, M.AsapError)
        and answer.error.causes[0].code == Cause.UNRECOGNIZED_MESSAGE
    )
    # a mandatory parameter missing: Invalid Values, and the connection stays usable
    answer = client.request(b"\x05\x00\x00\x04")
    assert (
        isinstance(answer, M.AsapError)
        and answer.error.causes[0].code == Cause.INVALID_VALUES
    )
    assert b"pool_handle" in answer.error.causes[0].info
    # a length that cannot be trusted: ERROR, then the connection is closed
    answer = client.request(b"\x05\x00\x00\x02")
    assert answer.error.causes[0].code == Cause.INVALID_VALUES
    assert client.closed_by_peer()
    client.close()
    # the daemon still serves others
    fresh = AsapClient(registrar.asap)
    assert isinstance(
        fresh.request(M.HandleResolution(b"x")), M.HandleResolutionResponse
    )
    fresh.close()
    assert registrar.alive()


def test_status_metrics_and_table(registrar):
    client = AsapClient(registrar.asap)
    client.request(M.Registration(b"status", pe(0x55, 7055, 0.42)))
    with urllib.request.urlopen(
        f"http://127.0.0.1:{registrar.status}/metrics", timeout=10
    ) as response:
        metrics = response.read().decode()
    assert 'xenpool_pool_elements{pool="status"} 1.0' in metrics
    assert "xenpool_registrations_total" in metrics
    assert 'xenpool_errors_total{cause="unrecognized_message"}' in metrics
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpool.cli",
            "status",
            "--status",
            f"127.0.0.1:{registrar.status}",
        ],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": ""},
        check=True,
    ).stdout
    assert "0x00000055" in table and "tcp 127.0.0.1:7055" in table and "42%" in table
    client.close()


def test_structured_json_log(registrar, tmp_path_factory):
    from twisted.logger import eventsFromJSONLogFile

    client = AsapClient(registrar.asap)
    client.request(M.Registration(b"logged", pe(0x77, 7077, 0.1)))
    client.request(M.Deregistration(b"logged", 0x77))
    client.close()
    path = next(
        p for p in tmp_path_factory.getbasetemp().glob("registrar*/registrar.json")
    )
    with open(path) as f:
        events = list(eventsFromJSONLogFile(f))
    assert any(
        e.get("log_format") == "registrar {id} started" and e["id"] == "0x0a0a0a0a"
        for e in events
    )
    removed = [
        e
        for e in events
        if e.get("pe") == "0x00000077" and e.get("why") == "deregistered"
    ]
    assert removed and removed[0]["pool"] == "logged"


def test_bad_command_line_and_config_are_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    for args, expected in (
        ([f"--state-dir={tmp_path / 'a-file' / 'leases'}"], "--state-dir"),
        (["--keep-alive-interval=-1"], "--keep-alive-interval: must be > 0"),
        (["--registrar-id=0"], "--registrar-id: must be a 32-bit number"),
        ([f"--config={tmp_path}/missing.conf"], "--config: cannot read"),
        (["--pool-secret=Xen"], "--pool-secret: expected POOL:FILE"),
    ):
        result = subprocess.run(
            [TWISTD, "-n", "xenpool-registrar", *args], capture_output=True, text=True
        )
        assert result.returncode != 0
        assert expected in result.stdout + result.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("[registrar]\nkeep-alive-intervall = 5\n")
    result = subprocess.run(
        [TWISTD, "-n", "xenpool-registrar", f"--config={bad}"],
        capture_output=True,
        text=True,
    )
    assert "unknown key 'keep-alive-intervall'" in result.stdout + result.stderr


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_client_that_never_reads_cannot_pin_memory(registrar):
    owner = AsapClient(registrar.asap)
    for i in range(20):  # a pool whose answers are big
        owner.request(M.Registration(b"flood", pe(0x1000 + i, 8000 + i, i / 20)))
    before = rss_kb(registrar.proc.pid)
    greedy = AsapClient(registrar.asap)
    greedy.sock.setblocking(False)
    request = M.encode(M.HandleResolution(b"flood", items=20)) * 1000
    sent = 0
    while (
        sent < 8 * 1024 * 1024
    ):  # ~500,000 requests for ~450 MB of answers, never read
        if not select.select([], [greedy.sock], [], 2.0)[1]:
            break
        sent += greedy.sock.send(request)
    # Meanwhile the registrar keeps serving others; were it still reading the greedy
    # client, answers would pile up in its memory while these run.
    polite = AsapClient(registrar.asap)
    for _ in range(100):
        assert (
            len(polite.request(M.HandleResolution(b"flood", items=20)).pool_elements)
            == 20
        )
    assert rss_kb(registrar.proc.pid) - before < 64 * 1024
    for client in (owner, greedy, polite):
        client.close()


def test_the_example_config_is_valid(tmp_path):
    from pathlib import Path

    from xenpool.registrar.tap import Options

    secret = tmp_path / "pool.secret"  # it names /etc/xenpool/pool.secret
    secret.write_text("sixteen bytes or more of secret\n")
    options = Options()
    options.parseOptions(
        [
            f"--config={Path(__file__).parents[1] / 'etc/xenpool/registrar.conf'}",
            "--peer=tcp:host=h:port=1",
            f"--pool-secret=Xen:{secret}",
            f"--state-dir={tmp_path}",
        ]
    )
    assert options.settings["asap"] == ["tcp:3863"] and options.settings["enrp"] == [
        "tcp:9901"
    ]
    assert options.settings["peer"] == ["tcp:host=h:port=1"]  # the command line wins
    assert options.settings["keep-alive-timeout"] == 5.0
