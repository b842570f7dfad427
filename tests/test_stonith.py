"""The STONITH providers (plugins/stonith.py) with real parts, no mocks of what they drive.

- ``fence-agent`` runs Debian's real ``fence_dummy`` (package fence-agents; those tests
  skip when it is absent) and small fake agents written as scripts: real processes.
- ``command`` runs real commands.
- ``libvirt`` destroys domains of libvirt's test driver.
- ``manual`` uses a real directory.

Processes are spawned through the reactor, and a reactor cannot be restarted within one
process, so those tests run each fence in a fresh Python (``RUNNER``: ``task.react``
around ``load_plugins().create("stonith", ...).fence(...)``) and read its outcome and its
log lines as JSON. Timeouts are real (1 s) and are the plugin's own; the test never
sleeps. The rest runs in-process: libvirt calls through a thread pool stand-in that
runs each call at once, timers on a Clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import libvirt
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from xenpool.interfaces import FenceTarget, IStonith
from xenpool.plugins import PluginError, load_plugins
from xenpool_plugins.stonith import (
    PROVIDERS,
    CommandStonith,
    FenceAgentStonith,
    FenceFailed,
    LibvirtStonith,
    ManualStonith,
    agent_error_line,
    confirm,
    confirmation_path,
    describe_options,
    find_executable,
    redact,
    secret_values,
)

ETC = Path(__file__).resolve().parent.parent / "etc" / "xenpool"
FENCE_DUMMY = find_executable("fence_dummy")
needs_fence_agents = pytest.mark.skipif(
    FENCE_DUMMY is None,
    reason="fence-agents not installed (apt-get install fence-agents)",
)
SECRET = "hunter2-Secret"
#: A guard for a runner that went wrong, far above any fence here; not a pause.
RUNNER_TIMEOUT_S = 60

RUNNER = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import task
    from twisted.logger import formatEvent, globalLogBeginner
    from xenpool.interfaces import FenceTarget
    from xenpool.plugins import load_plugins

    def main(reactor, job):
        lines = []
        globalLogBeginner.beginLoggingTo([lambda e: lines.append(formatEvent(e))], redirectStandardIO=False)
        stonith = load_plugins().create("stonith", job["name"], **job["options"])
        d = stonith.fence(FenceTarget(job["host"], job["target"]))
        outcome = {}
        d.addCallbacks(
            lambda value: outcome.update(ok=True, value=value),
            lambda f: outcome.update(ok=False, error=type(f.value).__name__, reason=str(f.value)),
        )
        d.addCallback(lambda _: sys.stdout.write(json.dumps({**outcome, "log": lines}) + "\\n"))
        return d

    task.react(main, [json.loads(sys.argv[1])])
    """
)


def run_fence(
    name: str, options: dict, host: str = "host1", target: dict | None = None
) -> dict:
    """Fence ``host`` in a fresh process with the real reactor: {ok, value | error, reason, log}."""
    job = {"name": name, "options": options, "host": host, "target": target or {}}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=RUNNER_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def script(path: Path, body: str) -> str:
    """An executable Python script (a fake fence agent or command) at ``path``."""
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body), encoding="utf-8")
    path.chmod(0o755)
    return str(path)


def result_of(d: Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred) -> FenceFailed:
    with pytest.raises(FenceFailed) as caught:
        result_of(d)
    return caught.value


def log_text(events) -> str:
    return "\n".join(formatEvent(e) for e in events)


# -- registration -------------------------------------------------------------------------


BUILTIN = {
    "fence-agent": {"agent": "fence_dummy"},
    "libvirt": {},
    "command": {"command": "true {host}"},
    "watchdog": {},
}


def test_builtin_registers_the_five_providers(tmp_path):
    plugins = load_plugins()
    assert {p.name for p in plugins.providers("stonith") if p.plugin == "builtin"} == {
        "fence-agent",
        "libvirt",
        "command",
        "manual",
        "watchdog",
    }
    for name, options in {**BUILTIN, "manual": {"state_dir": str(tmp_path)}}.items():
        stonith = plugins.create("stonith", name, **options)
        assert verifyObject(IStonith, stonith)
        assert stonith.name == name
    for factory in PROVIDERS:
        assert verifyClass(IStonith, factory)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("fence-agent", {}, "agent"),
        ("fence-agent", {"agent": " "}, "agent must name a fence agent"),
        (
            "fence-agent",
            {"agent": "fence_dummy", "action": "reboot"},
            "'action' is set by xenpool",
        ),
        ("fence-agent", {"agent": "fence_dummy", "plug": "a\nb"}, "line break"),
        (
            "fence-agent",
            {"agent": "fence_dummy", "bad key": "x"},
            "bad fence agent option name",
        ),
        (
            "fence-agent",
            {"agent": "fence_dummy", "timeout": "0"},
            "timeout must be > 0",
        ),
        ("command", {"command": ""}, "command is empty"),
        ("command", {"command": ["fence-it", "{host"]}, "literal braces"),
        ("command", {"command": ["fence-it", "{host.name}"]}, "plain names"),
        ("command", {"command": ["fence-it", "{}"]}, "empty placeholder"),
        ("libvirt", {"uri": ""}, "uri must be"),
        ("manual", {}, "state_dir"),
    ],
)
def test_bad_options_are_refused_when_created(name, options, message):
    with pytest.raises(PluginError) as caught:
        load_plugins().create("stonith", name, **options)
    assert message in str(caught.value)


# -- helpers ---------------------------------------------------------------------------------


def test_secrets_are_masked_wherever_they_appear():
    options = {
        "ip": "10.0.0.1",
        "password": SECRET,
        "snmp_priv_passwd": "pw2",
        "community": "private",
        "plug": "3",
    }
    assert set(secret_values(options)) == {SECRET, "pw2", "private"}
    said = f"Parse error: Ignoring unknown option 'password={SECRET}' on 10.0.0.1"
    assert (
        redact(said, secret_values(options))
        == "Parse error: Ignoring unknown option 'password=***' on 10.0.0.1"
    )
    assert (
        describe_options(options)
        == "ip=10.0.0.1, password=***, snmp_priv_passwd=***, community=***, plug=3"
    )


def test_agent_error_line_picks_what_went_wrong():
    stderr = (
        "WARNING:root:Parse error: Ignoring unknown option 'nodename=h1'\n"
        "2026-01-01 10:00:00,000 ERROR: Failed: Unable to obtain correct plug status\n\n"
        "Please use '-h' for usage\n"
    )
    assert (
        agent_error_line(stderr)
        == "2026-01-01 10:00:00,000 ERROR: Failed: Unable to obtain correct plug status"
    )
    assert agent_error_line("just this\n") == "just this"
    assert agent_error_line("") == ""


def test_find_executable_searches_sbin_too(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_executable("sh") is None or find_executable("sh").startswith(
        ("/usr/sbin", "/sbin", "/usr/local/sbin")
    )
    agent = script(tmp_path / "fence_mine", "")
    assert find_executable("fence_mine") == agent
    assert find_executable(agent) == agent
    (tmp_path / "not_executable").write_text("")
    assert find_executable(str(tmp_path / "not_executable")) is None
    if FENCE_DUMMY is not None:
        assert (
            find_executable("fence_dummy") == FENCE_DUMMY
        )  # /usr/sbin without it on PATH


# -- fence-agent, in-process (nothing spawned) ---------------------------------------------


def test_fence_agent_options_are_text():
    stonith = FenceAgentStonith(
        "fence_ipmilan", ssh=True, lanplus=False, ipport=623, reactor=Clock()
    )
    assert stonith.options == {"ssh": "1", "lanplus": "0", "ipport": "623"}


def test_fence_agent_that_does_not_exist_fails():
    stonith = FenceAgentStonith(agent="fence_no_such_agent", reactor=Clock())
    with capturedLogs() as events:
        error = failure_of(stonith.fence(FenceTarget("host1")))
    assert "fence agent 'fence_no_such_agent' not found" in error.reason
    assert error.host == "host1"
    assert (
        "FENCING host1 FAILED: fence agent 'fence_no_such_agent' not found"
        in log_text(events)
    )


@pytest.mark.parametrize(
    "target, message",
    [
        ({"action": "on"}, "'action' is set by xenpool"),
        ({"option": "on"}, "'option' is set by xenpool"),
        ({"plug": "1\naction=on"}, "line break"),
        ({"password": f"{SECRET}\n"}, "line break"),
    ],
)
def test_fence_agent_refuses_bad_target_options(target, message):
    stonith = FenceAgentStonith(agent="fence_dummy", reactor=Clock())
    with capturedLogs() as events:
        error = failure_of(stonith.fence(FenceTarget("host1", target)))
    assert message in error.reason
    assert SECRET not in error.reason and SECRET not in log_text(events)


# -- fence-agent, real processes -------------------------------------------------------------


def fake_agent(tmp_path: Path, status_exit: int = 2, off_exit: int = 0) -> str:
    """A fence agent that appends what it got on stdin to ``stdin.log`` and exits
    ``off_exit`` for action=off, ``status_exit`` for action=status."""
    return script(
        tmp_path / "fence_fake",
        f"""
        import sys
        text = sys.stdin.read()
        with open({str(tmp_path / "stdin.log")!r}, "a") as f:
            f.write(text + "--\\n")
        action = [l.split("=", 1)[1] for l in text.splitlines() if l.startswith("action=")][-1]
        if action == "off":
            print("Success: Powered OFF")
            sys.exit({off_exit})
        print("Status: whatever", file=sys.stderr)
        sys.exit({status_exit})
        """,
    )


@pytest.mark.slow
def test_fence_agent_sends_merged_options_off_then_status(tmp_path):
    agent = fake_agent(tmp_path)
    outcome = run_fence(
        "fence-agent",
        {
            "agent": agent,
            "ip": "10.0.0.1",
            "username": "admin",
            "password": SECRET,
            "plug": "default",
        },
        "host2",
        {"plug": "vm-host2", "ssh": "1"},
    )
    assert outcome["ok"] and outcome["value"] is None
    runs = (tmp_path / "stdin.log").read_text().split("--\n")[:-1]
    assert len(runs) == 2
    for run, action in zip(runs, ["off", "status"]):
        lines = run.splitlines()
        assert lines[-1] == f"action={action}"  # last: it wins over anything repeated
        assert dict(line.split("=", 1) for line in lines[:-1]) == {
            "ip": "10.0.0.1",
            "username": "admin",
            "password": SECRET,
            "plug": "vm-host2",  # the target's options win
            "ssh": "1",
            "nodename": "host2",
        }
    log = "\n".join(outcome["log"])
    assert "fenced host2: off confirmed (fence_fake status: off)" in log
    assert SECRET not in log


@pytest.mark.slow
def test_fence_agent_named_by_the_target(tmp_path):
    agent = fake_agent(tmp_path)
    outcome = run_fence(
        "fence-agent", {"agent": "fence_no_such_agent"}, "host1", {"agent": agent}
    )
    assert outcome["ok"], outcome
    assert "agent=" not in (tmp_path / "stdin.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "off_exit, status_exit, message",
    [
        (0, 0, "fence_fake reports host1 still ON after action=off succeeded"),
        (
            0,
            1,
            "cannot confirm it is off: fence_fake action=status for host1 failed (exit 1): Status: whatever",
        ),
        (
            0,
            7,
            "cannot confirm it is off: fence_fake action=status for host1 failed (exit 7)",
        ),
        (1, 2, "fence_fake action=off for host1 failed (exit 1): Success: Powered OFF"),
    ],
)
def test_fence_agent_fails_unless_status_says_off(
    tmp_path, off_exit, status_exit, message
):
    outcome = run_fence(
        "fence-agent", {"agent": fake_agent(tmp_path, status_exit, off_exit)}
    )
    assert not outcome["ok"]
    assert outcome["error"] == "FenceFailed"
    assert message in outcome["reason"]
    assert f"FENCING host1 FAILED: {outcome['reason']}" in outcome["log"]
    assert not any("off confirmed" in line for line in outcome["log"])


@pytest.mark.slow
def test_fence_agent_that_hangs_is_killed_and_fails(tmp_path):
    pid_file = tmp_path / "pid"
    agent = script(
        tmp_path / "fence_hang",
        f"""
        import os, signal, sys
        sys.stdin.read()
        with open({str(pid_file)!r}, "w") as f:
            f.write(str(os.getpid()))
        signal.pause()  # never answers
        """,
    )
    outcome = run_fence("fence-agent", {"agent": agent, "timeout": "1"})
    assert not outcome["ok"]
    assert (
        outcome["reason"]
        == "fence_hang action=off for host1 timed out after 1s (killed)"
    )
    pid = int(pid_file.read_text())
    assert not Path(
        f"/proc/{pid}"
    ).exists()  # killed and reaped before the fence failed


@pytest.mark.slow
@needs_fence_agents
def test_fence_dummy_off_confirmed(tmp_path):
    status = tmp_path / "status"
    status.write_text("on")  # fence_dummy's type=file state: "on" or "off", no newline
    options = {"agent": "fence_dummy", "password": SECRET}
    outcome = run_fence("fence-agent", options, "host1", {"status_file": str(status)})
    assert outcome["ok"], outcome
    assert status.read_text() == "off"
    log = "\n".join(outcome["log"])
    assert (
        "fencing host1: fence_dummy off done (Success: Powered OFF); checking its status"
        in log
    )
    assert "fenced host1: off confirmed (fence_dummy status: off)" in log
    assert SECRET not in log


@pytest.mark.slow
@needs_fence_agents
def test_fence_dummy_already_off_is_confirmed(tmp_path):
    status = tmp_path / "status"
    status.write_text("off")
    outcome = run_fence(
        "fence-agent", {"agent": "fence_dummy", "status_file": str(status)}
    )
    assert outcome["ok"], outcome


@pytest.mark.slow
@needs_fence_agents
def test_fence_dummy_that_cannot_read_the_plug_fails(tmp_path):
    status = tmp_path / "status"
    status.write_text("smoke")  # neither on nor off: fence_dummy cannot tell
    # fence_dummy does not know "password" and echoes the line on stderr: it must be masked.
    options = {"agent": "fence_dummy", "password": SECRET}
    outcome = run_fence("fence-agent", options, "host1", {"status_file": str(status)})
    assert not outcome["ok"]
    assert "fence_dummy action=off for host1 failed (exit 1)" in outcome["reason"]
    assert (
        "Unable to obtain correct plug status or plug is not available"
        in outcome["reason"]
    )
    everything = outcome["reason"] + "\n".join(outcome["log"])
    assert "password=***" in everything
    assert SECRET not in everything
    assert status.read_text() == "smoke"


@pytest.mark.slow
@needs_fence_agents
def test_fence_dummy_that_cannot_power_off_fails(tmp_path):
    # type=fail: a plug that never goes off; power_timeout=1 makes fence_dummy give up after 1 s.
    outcome = run_fence(
        "fence-agent", {"agent": "fence_dummy", "type": "fail", "power_timeout": "1"}
    )
    assert not outcome["ok"]
    assert "fence_dummy action=off for host1 failed (exit 1)" in outcome["reason"]
    assert "Timed out waiting to power OFF" in outcome["reason"]


# -- command ---------------------------------------------------------------------------------


def test_command_placeholders():
    stonith = CommandStonith(
        ["ipmi-off", "--host={host}", "{plug}", "{{literal}}"], reactor=Clock()
    )
    assert stonith.command_for(FenceTarget("h1", {"plug": "7"})) == [
        "ipmi-off",
        "--host=h1",
        "7",
        "{literal}",
    ]
    assert CommandStonith("power off '{host} now'").argv == [
        "power",
        "off",
        "{host} now",
    ]
    with pytest.raises(FenceFailed) as caught:
        stonith.command_for(FenceTarget("h1"))
    assert (
        "fence command uses {plug} but the options of h1 have no 'plug'"
        in caught.value.reason
    )
    error = failure_of(stonith.fence(FenceTarget("h1")))
    assert "{plug}" in error.reason


def test_command_that_does_not_exist_fails():
    error = failure_of(
        CommandStonith(["no-such-fence-command", "{host}"], reactor=Clock()).fence(
            FenceTarget("h1")
        )
    )
    assert error.reason == "fence command 'no-such-fence-command' not found"


@pytest.mark.slow
def test_command_exit_0_is_fenced(tmp_path):
    argv_file = tmp_path / "argv"
    command = script(
        tmp_path / "power-off",
        f"""
        import sys
        open({str(argv_file)!r}, "w").write(" ".join(sys.argv[1:]))
        """,
    )
    outcome = run_fence(
        "command",
        {"command": [command, "--host", "{host}", "--port={plug}"]},
        "host3",
        {"plug": "4"},
    )
    assert outcome["ok"], outcome
    assert argv_file.read_text() == "--host host3 --port=4"
    assert any(
        "fenced host3: off confirmed (" in line and "power-off exited 0)" in line
        for line in outcome["log"]
    )


@pytest.mark.slow
def test_command_failure_reports_its_last_stderr_line(tmp_path):
    command = script(
        tmp_path / "power-off",
        """
        import sys
        print("connecting to the PDU of", sys.argv[1], file=sys.stderr)
        print("PDU refused: bad password", sys.argv[2], file=sys.stderr)
        print()
        sys.exit(3)
        """,
    )
    outcome = run_fence(
        "command",
        {"command": f"{command} {{host}} {{password}}"},
        "host3",
        {"password": SECRET},
    )
    assert not outcome["ok"]
    assert (
        outcome["reason"]
        == f"fence command {command} for host3 failed (exit 3): PDU refused: bad password ***"
    )
    assert SECRET not in "\n".join(outcome["log"])


@pytest.mark.slow
def test_command_that_hangs_is_killed_and_fails(tmp_path):
    command = script(tmp_path / "power-off", "import signal\nsignal.pause()\n")
    outcome = run_fence("command", {"command": [command, "{host}"], "timeout": 1})
    assert not outcome["ok"]
    assert (
        outcome["reason"]
        == f"fence command {command} for host1 timed out after 1s (killed)"
    )


# -- manual ----------------------------------------------------------------------------------


def test_manual_refuses_until_an_operator_confirms(tmp_path):
    stonith = load_plugins().create(
        "stonith", "manual", state_dir=str(tmp_path / "fence")
    )
    with capturedLogs() as events:
        error = failure_of(stonith.fence(FenceTarget("host1")))
    message = "waiting for an operator to confirm host1 is off: run `xenpool fence-confirm host1`"
    assert error.reason == message
    assert f"FENCING host1 FAILED: {message}" in log_text(events)

    path = confirm(tmp_path / "fence", "host1")
    assert path == confirmation_path(tmp_path / "fence", "host1") and path.exists()
    with capturedLogs() as events:
        assert result_of(stonith.fence(FenceTarget("host1"))) is None
    assert "fenced host1: off confirmed (confirmed by an operator " in log_text(events)
    assert (
        not path.exists()
    )  # used up: the next failure of host1 needs a new confirmation
    assert failure_of(stonith.fence(FenceTarget("host1"))).reason == message


def test_manual_confirmation_is_for_one_host_only(tmp_path):
    stonith = ManualStonith(tmp_path)
    confirm(tmp_path, "host2")
    assert (
        "confirm host1 is off" in failure_of(stonith.fence(FenceTarget("host1"))).reason
    )
    assert result_of(stonith.fence(FenceTarget("host2"))) is None


def test_manual_stale_confirmation_is_refused_and_removed(tmp_path):
    stonith = ManualStonith(tmp_path, max_age=600)
    path = confirm(tmp_path, "host1")
    old = path.stat().st_mtime - 601
    os.utime(path, (old, old))
    error = failure_of(stonith.fence(FenceTarget("host1")))
    assert error.reason.startswith(
        "the confirmation is stale (601s old, max_age 600s); waiting for an operator"
    )
    assert not path.exists()
    forever = ManualStonith(tmp_path, max_age=0)
    path = confirm(tmp_path, "host1")
    os.utime(path, (old, old))
    assert result_of(forever.fence(FenceTarget("host1"))) is None


def test_manual_host_names_cannot_escape_the_directory(tmp_path):
    with pytest.raises(ValueError):
        confirm(tmp_path, "../etc/passwd")
    error = failure_of(ManualStonith(tmp_path).fence(FenceTarget("../x")))
    assert "bad host name" in error.reason


# -- libvirt (test driver, in-process) -------------------------------------------------------


class SyncThreadPool:
    """Runs every call at once, in the calling thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class NeverThreadPool:
    """Takes every call and never runs it: a libvirt that does not answer."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        pass


class SyncReactor(Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


@pytest.fixture
def default_host():
    """A connection to test:///default, held open so the provider's connections see the
    same host (its running domain "test"); "test" is started again afterwards."""
    conn = libvirt.open("test:///default")
    try:
        yield conn
    finally:
        dom = conn.lookupByName("test")
        if not dom.isActive():
            dom.create()
        conn.close()


def libvirt_stonith(**options) -> LibvirtStonith:
    return load_plugins().create(
        "stonith",
        "libvirt",
        threadpool=SyncThreadPool(),
        reactor=SyncReactor(),
        **options,
    )


def test_libvirt_destroys_the_domain_and_confirms(default_host):
    assert default_host.lookupByName("test").isActive()
    stonith = libvirt_stonith(uri="test:///default")
    with capturedLogs() as events:
        assert (
            result_of(stonith.fence(FenceTarget("host1", {"domain": "test"}))) is None
        )
    assert not default_host.lookupByName("test").isActive()
    assert (
        "fenced host1: off confirmed (libvirt test:///default: destroyed test; test not active)"
        in log_text(events)
    )
    # Again: nothing runs any more, which is just as fenced.
    with capturedLogs() as events:
        assert (
            result_of(stonith.fence(FenceTarget("host1", {"domain": "test"}))) is None
        )
    assert "nothing was running" in log_text(events)


def test_libvirt_without_domain_destroys_every_guest(default_host):
    stonith = libvirt_stonith(uri="test:///default")
    with capturedLogs() as events:
        assert result_of(stonith.fence(FenceTarget("host1"))) is None
    assert default_host.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) == []
    assert "destroyed test; no guest active" in log_text(events)


def test_libvirt_uri_template_and_unknown_domain():
    # etc/xenpool/node-host1.xml: a host with no domains; "web1" is not running there.
    stonith = libvirt_stonith(uri=f"test://{ETC}/node-{{host}}.xml")
    assert stonith.uri_for(FenceTarget("host1")) == f"test://{ETC}/node-host1.xml"
    assert (
        stonith.uri_for(FenceTarget("host1", {"uri": "test:///default"}))
        == "test:///default"
    )
    with capturedLogs() as events:
        assert (
            result_of(stonith.fence(FenceTarget("host1", {"domain": "web1, web2"})))
            is None
        )
    assert (
        f"libvirt test://{ETC}/node-host1.xml: nothing was running; web1, web2 not active"
        in log_text(events)
    )


def test_libvirt_default_uri_is_ssh_to_the_host():
    assert libvirt_stonith().uri_for(FenceTarget("host7")) == "qemu+ssh://host7/system"


@pytest.mark.parametrize("uri", ["bogus:///system", "test:///nonexistent/node.xml"])
def test_libvirt_unreachable_uri_fails(uri):
    with capturedLogs() as events:
        error = failure_of(
            libvirt_stonith(uri=uri).fence(FenceTarget("host1", {"domain": "test"}))
        )
    assert error.reason.startswith(f"cannot connect to {uri}: ")
    assert f"FENCING host1 FAILED: cannot connect to {uri}" in log_text(events)


def test_libvirt_fence_cancelled_is_a_failure():
    stonith = LibvirtStonith(
        "test:///default", threadpool=NeverThreadPool(), reactor=SyncReactor()
    )
    d = stonith.fence(FenceTarget("host1"))
    d.cancel()
    assert failure_of(d).reason == "fencing host1 was cancelled"


class BrokenThreadPool:
    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        on_result(False, Failure(RuntimeError("the pool broke")))


def test_an_unexpected_error_is_a_fence_failure_too():
    stonith = LibvirtStonith(
        "test:///default", threadpool=BrokenThreadPool(), reactor=SyncReactor()
    )
    with capturedLogs() as events:
        error = failure_of(stonith.fence(FenceTarget("host1")))
    assert error.reason == "unexpected error while fencing host1: the pool broke"
    assert (
        "FENCING host1 FAILED: unexpected error while fencing host1: the pool broke"
        in log_text(events)
    )


def test_libvirt_that_does_not_answer_times_out():
    reactor = SyncReactor()
    stonith = LibvirtStonith(
        "qemu+ssh://{host}/system",
        timeout=30,
        threadpool=NeverThreadPool(),
        reactor=reactor,
    )
    d = stonith.fence(FenceTarget("host1"))
    reactor.advance(29)
    assert not d.called
    reactor.advance(1)
    assert failure_of(d).reason == "no answer from qemu+ssh://host1/system within 30s"


@pytest.mark.slow
def test_libvirt_with_the_real_reactor_and_threads():
    outcome = run_fence(
        "libvirt", {"uri": "test:///default"}, "host1", {"domain": "test"}
    )
    assert outcome["ok"], outcome
    assert (
        "fenced host1: off confirmed (libvirt test:///default: destroyed test; test not active)"
        in outcome["log"]
    )


def test_a_failed_fence_is_not_tried_again_until_its_hold_off_ends():
    """A failing power controller is asked once per hold-off (2 s doubling to 60 s, with
    jitter), not once per failover attempt; a success ends the hold-off."""
    from twisted.internet import defer

    from xenpool.pe.fencing import FenceHeldOff, StonithFencer

    class Flaky:
        name = "flaky"

        def __init__(self):
            self.calls, self.fail = 0, True

        def fence(self, target):
            self.calls += 1
            return (
                defer.fail(RuntimeError("BMC says no"))
                if self.fail
                else defer.succeed(None)
            )

    clock, stonith = Clock(), Flaky()
    fencer = StonithFencer(
        stonith, {}, clock=clock, rng=lambda: 1.0
    )  # no jitter: the full hold-off
    failures = []
    fencer.fence("host2").addErrback(failures.append)
    for _ in range(100):  # a keeper retrying as fast as it can
        fencer.fence("host2").addErrback(failures.append)
    assert (
        stonith.calls == 1
        and failures[0].check(RuntimeError)
        and all(f.check(FenceHeldOff) for f in failures[1:])
    )
    assert "failed 0.0 s ago" in failures[1].getErrorMessage()
    clock.advance(2)
    fencer.fence("host2").addErrback(failures.append)
    assert stonith.calls == 2
    clock.advance(3.9)  # the second hold-off is 4 s
    fencer.fence("host2").addErrback(failures.append)
    assert stonith.calls == 2
    clock.advance(0.1)
    stonith.fail = False
    done = []
    fencer.fence("host2").addCallback(done.append)
    assert stonith.calls == 3 and done == [None]
    fencer.fence("host2").addCallback(
        done.append
    )  # the same failure's other VMs: no second power-off
    assert stonith.calls == 3 and done == [None, None]
    clock.advance(2)
    fencer.fence("host2").addCallback(
        done.append
    )  # later: the host may be back, fenced again
    assert stonith.calls == 4
