"""What an operator meets on day one (issue 15): one-line start-up errors, one endpoint
syntax, safe defaults that say so, quiet and shippable logs. Real twistd daemons, real
sockets, libvirt's test driver."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.protocol.errors import Cause
from xenpool.tools import processes

from .daemons import TWISTD, AsapClient, Daemon, SessionClient, free_port

pytestmark = pytest.mark.slow
ETC = Path(__file__).parents[1] / "etc" / "xenpool"
XENPOOL_PU = str(Path(sys.executable).with_name("xenpool-pu"))


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}{path}", timeout=10
    ) as response:
        return json.load(response)


def twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """Non-zero exit, one line on stderr naming the problem, no traceback, no help."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "Usage:" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], output


# -- one-line errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["xenpool-pe", "--bogus"], "xenpool-pe: option --bogus not recognized"),
        (
            ["xenpool-pe", "--registrar=pr1"],
            "xenpool-pe: --registrar: expected HOST:PORT",
        ),
        (["xenpool-pe", "--voter=tcp:nowhere=1"], "xenpool-pe: --voter:"),
        (
            ["xenpool-pe", "--log-level=loud"],
            "xenpool-pe: --log-level: expected one of",
        ),
        (["xenpool-registrar", "--keep-alive-interval=-1"], "--keep-alive-interval:"),
        (["xenpool-registrar", "--state-dir=a-file/x"], "--state-dir a-file/x:"),
        (
            ["xenpool-pu", "--keep=keep.conf", "--state-dir=a-file/x"],
            "xenpool-pu: --state-dir a-file/x:",
        ),
        (
            ["xenpool-pu", "--keep=keep.conf", "--registrar=pr1:port"],
            "xenpool-pu: --registrar: expected HOST:PORT",
        ),
    ],
)
def test_a_bad_command_line_is_one_line(tmp_path, args, expected):
    (tmp_path / "a-file").write_text("")
    # a keep file of its own: the shipped one needs /etc/xenpool/keeper.secret
    (tmp_path / "keep.conf").write_text("[vm web1]\nram = 256\n")
    assert_one_line(twistd(*args, cwd=tmp_path), expected)


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (
            ["xenpool-registrar", f"--asap=tcp:{port}:interface=127.0.0.1"],
            [
                "xenpool-pe",
                f"--port={port}",
                "--bind=127.0.0.1",
                "--libvirt-uri=test:///default",
            ],
        ):
            result = twistd(*args, cwd=tmp_path)
            assert_one_line(result, f"{args[0]}: cannot listen on 127.0.0.1:{port}")
            assert "Address already in use" in result.stderr


def test_xenpool_pu_create_names_ip_and_refuses_unknown_disk_schemes():
    for args, expected in (
        (["--ip", "10.0.0"], "xenpool-pu: --ip: '10.0.0' is not an IP address"),
        (
            ["--disk", "ftp://san/web1"],
            "xenpool-pu: --disk: no storage plugin handles 'ftp'",
        ),
    ):
        result = subprocess.run(
            [XENPOOL_PU, "create", "--server-id", "w", "--ram", "64", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
        assert result.stderr.startswith(expected), result.stderr


# -- a small pool: a registrar and two PEs, neither with a stonith ----------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("operator")
    asap, status = free_port(), free_port()
    registrar = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--status=tcp:{status}:interface=127.0.0.1",
        ready="started",
        cwd=cwd,
    )
    registrar.asap, registrar.status = asap, status
    pes = {}
    for n in (1, 2):
        port, pe_status = free_port(), free_port()
        log = cwd / f"pe{n}.json"
        pes[n] = Daemon(
            "xenpool-pe",
            f"--registrar=127.0.0.1:{asap}",  # HOST:PORT, as the PU takes it
            f"--port={port}",
            "--bind=127.0.0.1",
            f"--host=op-host{n}",  # no --pe-id: derived from the host name
            f"--libvirt-uri=test://{ETC / f'node-host{n}.xml'}",
            f"--status=tcp:{pe_status}:interface=127.0.0.1",
            f"--logfile={log}",
            "--log-format=json",
            "--load-interval=3600",
            "--shutdown-timeout=2",
            "--voter-timeout=0.5",
            "--lease=0",
            ready="registered in pool Xen",
            cwd=cwd,
        )
        pes[n].port, pes[n].status, pes[n].json_log = port, pe_status, log
    yield registrar, pes
    for daemon in (*pes.values(), registrar):
        daemon.stop()


def test_pes_register_at_host_port_with_ids_derived_from_their_host(pool):
    from xenpool.pe.tap import derived_pe_id

    registrar, pes = pool
    client = AsapClient(registrar.asap)
    answer = client.request(M.HandleResolution(b"Xen", items=10))
    client.close()
    expected = {derived_pe_id(f"op-host{n}", "Xen") for n in (1, 2)}
    assert {e.identifier for e in answer.pool_elements} == expected
    assert derived_pe_id("op-host1", "Xen") == derived_pe_id("op-host1", "Xen")
    assert len(expected) == 2


def test_the_status_tool_has_its_own_option(pool):
    registrar, pes = pool
    status = [sys.executable, "-m", "xenpool.cli", "status"]
    env = {"COLUMNS": "200", "PATH": ""}
    table = subprocess.run(
        [*status, "--status", f"127.0.0.1:{registrar.status}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert table.returncode == 0 and "2/2 hosts up" in table.stdout, table
    old = subprocess.run(
        [*status, "--registrar", f"127.0.0.1:{registrar.status}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert old.returncode == 0 and "2/2 hosts up" in old.stdout
    assert "--registrar is deprecated here, use --status" in old.stderr
    assert "--registrar is deprecated here, use --status" in old.stderr


def test_start_up_lines_name_what_runs_and_what_is_unsafe(pool):
    registrar, pes = pool
    log = registrar.drain()
    assert "no pool has a secret (--pool-secret POOL:FILE)" in log
    assert f"ASAP tcp:{registrar.asap}:interface=127.0.0.1" in log
    assert f"status tcp:{registrar.status}:interface=127.0.0.1" in log
    pe_log = pes[1].drain()
    assert "#warn] no --stonith: this PE cannot fence a dead host" in pe_log
    line = next(x for x in pe_log.splitlines() if "xenpool-pe 0x" in x)
    for part in (
        "(op-host1) for pool Xen",
        "load weighted",
        "policy LeastUsed",
        "stonith NONE",
        "storage aoe, iscsi, nbd, path",
        f"sessions on tcp:{pes[1].port}:interface=127.0.0.1",
        f"registrars tcp:host=127.0.0.1:port={registrar.asap}",
        "pool secret NONE",
    ):
        assert part in line, line


def test_unknown_disk_scheme_is_invalid_and_states_have_names(pool):
    registrar, pes = pool
    pu = SessionClient(pes[1].port)
    pu.send(S.CreateServer("op-disk", "ftp://san/op-disk", (), 64))
    result = pu.receive_until(S.CreateResult)[-1]
    pu.close()
    assert result.code == S.ResultCode.INVALID_REQUEST, result
    pu = SessionClient(pes[1].port)
    pu.send(S.CreateServer("op-state", "", (), 64))
    assert pu.receive_until(S.CreateResult)[-1].code == S.ResultCode.STARTED
    domain = get_json(pes[1].status, "/status")["domains"]["op-state"]
    assert domain["state_name"] == "running"
    pu.close()
    pes[1].wait_for("op-state stopped")


def test_a_failover_without_stonith_is_refused_with_one_warning(pool):
    registrar, pes = pool
    holder = SessionClient(pes[1].port)
    holder.send(S.CreateServer("op-failover", "", (), 64))
    received = holder.receive_until(S.CreateResult)
    assert received[-1].code == S.ResultCode.STARTED
    cookie = [m for m in received if isinstance(m, M.Cookie)][-1].cookie
    since = pes[2].mark()
    pes[1].proc.send_signal(signal.SIGSTOP)  # its host looks dead: it must be fenced
    try:
        for _ in range(4):
            pu = SessionClient(pes[2].port, timeout=30)
            pu.send(M.CookieEcho(cookie))
            result = pu.receive_until(S.CreateResult)[-1]
            pu.close()
            assert result.code == S.ResultCode.FENCE_FAILED, result
            assert "no --stonith" in result.reason
    finally:
        pes[1].proc.send_signal(signal.SIGCONT)
    log = pes[2].drain()[since:]
    about = [line for line in log.splitlines() if "op-failover" in line]
    warnings = [line for line in about if "#warn]" in line]
    assert len(warnings) == 1, about
    assert "failover refused, this PE has no --stonith" in warnings[0]
    assert not [line for line in about if "#info] refused op-failover" in line], about
    holder.close()


def test_no_starting_factory_noise(pool):
    registrar, pes = pool
    for n in range(
        3
    ):  # each start asks the voters and the other PE over new connections
        pu = SessionClient(pes[2].port)
        pu.send(S.CreateServer(f"op-quiet{n}", "", (), 32))
        assert pu.receive_until(S.CreateResult)[-1].code == S.ResultCode.STARTED
        pu.close()
        pes[2].wait_for(f"op-quiet{n} stopped")
    for daemon in (registrar, *pes.values()):
        assert "Starting factory" not in daemon.drain()


def test_json_log_has_flat_fields_and_sigusr1_reopens_it(pool):
    from xenpool.logs import JSON_FIELDS

    registrar, pes = pool
    pe = pes[1]
    pu = SessionClient(pe.port)
    pu.send(S.CreateServer("op-json", "", (), 32))
    assert pu.receive_until(S.CreateResult)[-1].code == S.ResultCode.STARTED
    pu.close()
    pe.wait_for("op-json stopped")
    events = [json.loads(line) for line in pe.json_log.read_text().splitlines()]
    assert events and all(tuple(e) == JSON_FIELDS for e in events)
    assert all(e["daemon"] == "xenpool-pe" for e in events)
    started = [e for e in events if e["vm"] == "op-json" and e["level"] == "info"]
    assert started and all(e["text"] for e in started)
    assert any(
        e["event"]
        == "xenpool-pe {pe} ({host}) for pool {pool}: load {load}, policy {policy}, stonith {stonith}, storage {storage}, hypervisor {uri}, sessions on {sessions}, registrars {registrars}, voters {voters}, status {status}, pool secret {secret}"
        for e in events
    )
    # logrotate: move the file away, SIGUSR1, and the daemon writes a new one
    rotated = pe.json_log.with_suffix(".json.1")
    pe.json_log.rename(rotated)
    since = pe.mark()
    pe.proc.send_signal(signal.SIGUSR1)
    pu = SessionClient(pe.port)
    pu.send(S.CreateServer("op-rotated", "", (), 32))
    assert pu.receive_until(S.CreateResult)[-1].code == S.ResultCode.STARTED
    pu.close()
    pe.wait_for("op-rotated stopped", since=since)
    assert pe.alive()
    fresh = [json.loads(line) for line in pe.json_log.read_text().splitlines()]
    assert any(e["vm"] == "op-rotated" for e in fresh)
    assert not any(
        json.loads(line)["vm"] == "op-rotated"
        for line in rotated.read_text().splitlines()
    )


def test_log_level_warn_hides_info(tmp_path):
    asap = free_port()
    registrar = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        "--log-level=warn",
        ready="starting on",  # it listens before the level applies (at start)
        cwd=tmp_path,
    )
    try:
        client = AsapClient(asap)  # connects once the registrar listens
        client.request(M.HandleResolution(b"Xen", items=1))
        client.close()
        log = registrar.drain()
        after_start = log.split("starting on")[-1]
        assert "no pool has a secret" in log  # a warning, before twistd starts
        assert "registrar 0x" not in after_start and "#info]" not in after_start, log
    finally:
        registrar.stop()


# -- the registrar can require every pool's secret ---------------------------------------


def test_require_pool_secret_refuses_pools_without_one(tmp_path):
    from xenpool.registrar.tap import Options

    from .daemons import loaded_element as pe

    asap = free_port()
    registrar = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        "--require-pool-secret=yes",
        ready="started",
        cwd=tmp_path,
    )
    try:
        client = AsapClient(asap)
        refused = client.request(M.Registration(b"Xen", pe(7, 7007, 0.1)))
        client.close()
        assert refused.reject
        assert refused.error.causes[0].code == Cause.SECURITY_REJECTION
        assert "no pool has a secret" not in registrar.drain()
    finally:
        registrar.stop()
    # the shipped config has it on
    secret = tmp_path / "pool.secret"
    secret.write_text("a secret of sixteen bytes or more\n")
    options = Options()
    options.parseOptions(
        [
            f"--config={ETC / 'registrar.conf'}",
            f"--pool-secret=Xen:{secret}",
            f"--state-dir={tmp_path}",
        ]
    )
    assert options.settings["require-pool-secret"] is True


# -- xenpool-pu create and signals -------------------------------------------------------


def _pu_create(registrar, server_id: str) -> processes.Process:
    pu = processes.Process(
        [
            XENPOOL_PU,
            "create",
            "--server-id",
            server_id,
            "--ram",
            "32",
            "--registrar",
            f"127.0.0.1:{registrar.asap}",
            "--heartbeat-interval",
            "0.2",
        ]
    )
    pu.wait_for(f"{server_id}: running: domain running")
    return pu


def _where(pes, server_id: str):
    return next(
        pe
        for pe in pes.values()
        if server_id in get_json(pe.status, "/status")["domains"]
    )


def test_sigterm_stops_the_vm_like_ctrl_c(pool):
    registrar, pes = pool
    pu = _pu_create(registrar, "op-term")
    try:
        pe = _where(pes, "op-term")
        pu.proc.send_signal(signal.SIGTERM)
        assert pu.proc.wait(30) == 0
        pe.wait_for("op-term stopped")
        assert "op-term" not in get_json(pe.status, "/status")["domains"]
        assert "stopping the VM" in pu.drain()
    finally:
        pu.stop()


def test_a_second_ctrl_c_leaves_the_vm_without_a_traceback(pool):
    registrar, pes = pool
    pu = _pu_create(registrar, "op-twice")
    pe = _where(pes, "op-twice")
    pe.proc.send_signal(signal.SIGSTOP)  # the stop hangs: time for a second Ctrl-C
    try:
        since = pu.mark()
        pu.proc.send_signal(signal.SIGINT)
        pu.wait_for("stopping the VM (Ctrl-C again to leave it running)", since=since)
        pu.proc.send_signal(signal.SIGINT)
        assert pu.proc.wait(30) == 1
        log = pu.drain()
        assert "left running; its PE keeps it for its --lease" in log
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    finally:
        pe.proc.send_signal(signal.SIGCONT)
        pu.stop()


# -- Prometheus metrics ------------------------------------------------------------------


def promtool_check(text: str) -> None:
    """``promtool check metrics``: Prometheus' own linter of the exposition format."""
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def get_text(port: int, path: str) -> str:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}{path}", timeout=10
    ) as response:
        return response.read().decode()


def test_metrics_follow_prometheus_conventions(pool, tmp_path):
    registrar, pes = pool
    keep = tmp_path / "vms.conf"
    keep.write_text("[vm op-metrics]\nram = 32\n")
    keeper_status = free_port()
    keeper = Daemon(
        "xenpool-pu",
        f"--keep={keep}",
        f"--registrar=127.0.0.1:{registrar.asap}",
        f"--state-dir={tmp_path / 'state'}",
        f"--status=tcp:{keeper_status}:interface=127.0.0.1",
        "--heartbeat-interval=0.2",
        ready="op-metrics: running",
        cwd=tmp_path,
    )
    try:
        pages = {
            "registrar": get_text(registrar.status, "/metrics"),
            "pe": get_text(pes[1].status, "/metrics"),
            "keeper": get_text(keeper_status, "/metrics"),
        }
    finally:
        keeper.stop()
    for name, text in pages.items():
        promtool_check(text)
        assert "_created" not in text, name
        assert "_kb" not in text and "_mb" not in text, name  # bytes, not KB or MB
        counters = [
            line.split()[2]
            for line in text.splitlines()
            if line.startswith("# TYPE") and line.endswith(" counter")
        ]
        assert counters, name
        for line in text.splitlines():
            sample = line.split("{")[0].split(" ")[0]
            if not line.startswith("#") and sample.startswith(tuple(counters)):
                assert sample.endswith("_total"), line
    assert 'xenpool_pe_load{pe="0x' in pages["registrar"]  # per-PE load, by pool
    assert 'pool="Xen"' in pages["registrar"]
    for name in (
        "xenpool_pe_fence_attempts_total 0.0",
        "xenpool_pe_fence_failures_total 0.0",
        "xenpool_pe_free_ram_bytes",
        "# TYPE xenpool_pe_refusals_total counter",  # by code: test_pe_e2e
    ):
        assert name in pages["pe"], name
    for name in (
        'xenpool_keeper_vms{state="running"} 1.0',
        'xenpool_keeper_failovers_total{server_id="op-metrics"} 0.0',
        "xenpool_keeper_failover_duration_seconds_count 0.0",
    ):
        assert name in pages["keeper"], name


def test_a_repeatable_option_keeps_its_default_unless_given(tmp_path):
    """The registrar's --asap defaults to tcp:3863 (it was dropped: an IndexError at start)."""
    from xenpool.registrar.tap import Options

    default = Options()
    default.parseOptions([f"--state-dir={tmp_path}"])
    assert default.settings["asap"] == ["tcp:3863"]
    given = Options()
    given.parseOptions(
        [f"--state-dir={tmp_path}", "--asap=tcp:4000", "--asap=tcp:4001"]
    )
    assert given.settings["asap"] == ["tcp:4000", "tcp:4001"]


@pytest.mark.parametrize(
    "command, expected",
    [
        (
            ["xenpool.pu.cli", "create", "--server-id", "web1", "--ram", "lots"],
            "xenpool-pu create: argument --ram:",
        ),
        (
            ["xenpool.cli", "status", "--bogus"],
            "xenpool: unrecognized arguments: --bogus",
        ),
        (["xenpool.cli", "vm"], "xenpool vm: the following arguments are required"),
    ],
)
def test_the_command_line_tools_name_a_bad_option_in_one_line(command, expected):
    result = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert_one_line(result, expected)
    assert "usage:" not in result.stderr


def test_a_registrar_peer_is_host_port_or_an_endpoint(tmp_path):
    from twisted.python import usage

    from xenpool.registrar.tap import Options

    options = Options()
    options.parseOptions(
        [f"--state-dir={tmp_path}", "--peer=pr2:9901", "--peer=tcp:host=pr3:port=9901"]
    )
    assert options.settings["peer"] == [
        "tcp:host=pr2:port=9901",
        "tcp:host=pr3:port=9901",
    ]
    with pytest.raises(usage.UsageError, match="--peer"):
        Options().parseOptions([f"--state-dir={tmp_path}", "--peer=pr2"])
