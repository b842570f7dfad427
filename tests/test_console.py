"""The operator's console, unit by unit: events and alerts on a Clock with a fake
process spawner, signed host commands, the pool view, the drain plan, a PE in
maintenance, and the keeper's events."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock

from xenpool.console import admin
from xenpool.console.cli import Refused, plan_drain
from xenpool.console.events import AlertRunner, EventLog, environment
from xenpool.console.pool import LoadHistory, pool_view
from xenpool.protocol import session as S
from xenpool.testing import ScriptedPE
from xenpool.testing import ScriptedPool as Pool

from .helpers import REQUEST, SECRET, create

# ------------------------------------------------------------ events and alerts


def test_the_event_list_is_bounded_and_keeps_the_newest(clock):
    events = EventLog(clock, "PE 0x1", size=3)
    for n in range(5):
        clock.advance(1)
        events.record("fence_attempt", host=f"h{n}")
    kept = events.describe()
    assert [e["host"] for e in kept] == ["h2", "h3", "h4"]
    assert kept[-1] == {
        "time": 5.0,
        "kind": "fence_attempt",
        "source": "PE 0x1",
        "sequence": 5,
        "host": "h4",
    }


def test_a_failing_alert_hook_does_not_stop_the_recorder(clock):
    def broken(event):
        raise RuntimeError("boom")

    events = EventLog(clock, "keeper", alert=broken)
    assert events.record("failover", server_id="web1")["kind"] == "failover"
    assert len(events.describe()) == 1


def test_environment_names_every_field():
    env = environment({"kind": "fence_success", "host": "h2", "took_s": 0.5, "x-y": 1})
    assert env == {
        "XENPOOL_KIND": "fence_success",
        "XENPOOL_HOST": "h2",
        "XENPOOL_TOOK_S": "0.5",
        "XENPOOL_X_Y": "1",
    }


class FakeSpawner(Clock):
    """A Clock that records spawnProcess (unit tests only)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, protocol, executable, args, env=None):
        transport = FakeProcessTransport(protocol)
        self.spawned.append((args, env, protocol, transport))
        protocol.makeConnection(transport)
        return transport


class FakeProcessTransport:
    def __init__(self, protocol) -> None:
        self.protocol, self.stdin, self.closed, self.signals = protocol, b"", False, []

    def write(self, data: bytes) -> None:
        self.stdin += data

    def closeStdin(self) -> None:
        self.closed = True

    def signalProcess(self, sig) -> None:
        self.signals.append(sig)

    def end(self, code: int = 0) -> None:
        from twisted.internet.error import ProcessDone, ProcessTerminated
        from twisted.python.failure import Failure

        reason = ProcessDone(0) if code == 0 else ProcessTerminated(code)
        self.protocol.processEnded(Failure(reason))


def test_an_alert_gets_the_event_on_stdin_and_in_its_environment():
    reactor = FakeSpawner()
    runner = AlertRunner(reactor, ["/usr/bin/logger -t xenpool"], timeout_s=5)
    events = EventLog(reactor, "PE 0x2 (host2)", alert=runner)
    events.record("fence_success", host="host3", server_id="db1")
    ((args, env, _protocol, transport),) = reactor.spawned
    assert args == ["/usr/bin/logger", "-t", "xenpool"]
    assert json.loads(transport.stdin)["host"] == "host3" and transport.closed
    assert env["XENPOOL_KIND"] == "fence_success" and env["XENPOOL_SERVER_ID"] == "db1"


def test_a_slow_alert_is_killed_and_never_holds_up_the_recorder_or_the_next_event():
    reactor = FakeSpawner()
    runner = AlertRunner(reactor, ["slow-alert"], timeout_s=5)
    events = EventLog(reactor, "PE 0x2", alert=runner)
    events.record("fence_attempt", host="host3")  # returns at once: the alert runs on
    events.record("fence_success", host="host3")
    events.record("failover", server_id="db1")
    assert len(reactor.spawned) == 1  # one at a time, in order
    reactor.advance(5)
    first = reactor.spawned[0][3]
    assert first.signals == ["KILL"] and runner.killed == 1
    first.end(-9)  # the killed process ends
    assert len(reactor.spawned) == 2
    reactor.spawned[1][3].end(1)  # a failing alert: logged, the next one runs
    assert [json.loads(s[3].stdin)["kind"] for s in reactor.spawned] == [
        "fence_attempt",
        "fence_success",
        "failover",
    ]
    reactor.spawned[2][3].end(0)
    assert reactor.getDelayedCalls() == []  # no timer left behind


def test_an_alert_that_cannot_be_run_is_logged_and_skipped():
    class Refusing(FakeSpawner):
        def spawnProcess(self, *args, **kwargs):
            raise OSError("No such file or directory")

    reactor = Refusing()
    runner = AlertRunner(reactor, ["/nonexistent"], timeout_s=5)
    EventLog(reactor, "keeper", alert=runner).record("failover")
    reactor.advance(0)
    assert runner.busy == [False]


def test_the_backlog_of_a_stuck_alert_is_bounded():
    reactor = FakeSpawner()
    runner = AlertRunner(reactor, ["stuck"], timeout_s=60, backlog=2)
    events = EventLog(reactor, "keeper", alert=runner)
    for n in range(5):
        events.record("failover", n=n)
    assert [json.loads(stdin)["n"] for stdin, _env in runner.queues[0]] == [3, 4]


# ------------------------------------------------------------ host commands


def commands(clock, secret=SECRET, host="host2"):
    taken = []
    return (
        admin.HostCommands(
            secret, host, clock, lambda a: taken.append(a) or {"state": a}
        ),
        taken,
    )


def body(secret=SECRET, action="drain", host="host2", issued=100, nonce="n1") -> bytes:
    return json.dumps(admin.sign(secret, action, host, issued, nonce)).encode()


def test_a_signed_command_is_taken_once(clock):
    clock.advance(100)
    cmds, taken = commands(clock)
    assert cmds.take(body()) == {"state": "drain"}
    with pytest.raises(admin.CommandError, match="replay"):
        cmds.take(body())
    assert taken == ["drain"]


@pytest.mark.parametrize(
    "command, why",
    [
        (body(secret=b"another secret of some length"), "not signed"),
        (body(issued=10), "more than 60 s"),
        (body(host="host3"), "meant for host 'host3'"),
        (body(action="reboot"), "unknown action"),
        (b"{not json", "not a host command"),
        (b'{"action": "drain"}', "not a host command"),
    ],
)
def test_a_bad_command_is_refused_with_one_line_and_changes_nothing(
    clock, command, why
):
    clock.advance(100)
    cmds, taken = commands(clock)
    with pytest.raises(admin.CommandError, match=why) as err:
        cmds.take(command)
    assert "\n" not in str(err.value) and taken == []


def test_a_pe_without_a_pool_secret_takes_no_command(clock):
    cmds, taken = commands(clock, secret=b"")
    with pytest.raises(admin.CommandError, match="no pool secret"):
        cmds.take(body())
    assert taken == []


# ------------------------------------------------------------ a PE in maintenance


def test_a_drained_pe_reports_full_starts_nothing_and_says_why(pe):
    create(pe, "web1", ram=100)
    pe.set_maintenance("drained by the operator")
    assert pe.load() == 1.0 and pe.host_state() == "draining"
    refused = create(pe, "web2", ram=100)
    (result,) = refused.results()
    assert result.code == S.ResultCode.NO_RAM  # not final: the PU tries another PE
    assert "pe1 is in maintenance: drained by the operator" in result.reason
    assert "web2" not in pe.hypervisor.domains
    described = pe.describe()
    assert described["state"] == "draining" and described["cpus"] == 2
    kinds = [e["kind"] for e in described["events"]]
    assert kinds == ["maintenance", "start_refused"]
    pe.set_maintenance(None)
    assert pe.host_state() == "up" and pe.load() < 1.0
    assert create(pe, "web2", ram=100).results()[0].code == S.ResultCode.STARTED


def test_an_empty_drained_pe_is_in_maintenance(pe):
    pe.set_maintenance("drained by the operator")
    assert pe.host_state() == "maintenance"


# ------------------------------------------------------------ the pool view


def pe_doc(n, vms=(), state="up", events=()):
    return {
        "pe_identifier": f"0x{n:08x}",
        "host": f"host{n}",
        "load": 0.25 * n,
        "free_ram_kb": 500 * 1024,
        "ram_kb": 1000 * 1024,
        "cpus": 2,
        "vms": [{"server_id": v, "ram_mb": 100} for v in vms],
        "orphans": [],
        "state": state,
        "events": list(events),
    }


HANDLESPACE = {
    "registrar_id": 0x0A0A0A0A,
    "pools": [
        {
            "handle": "Xen",
            "pool_elements": [
                {
                    "identifier": n,
                    "transport": {
                        "kind": "tcp",
                        "addresses": ["127.0.0.1"],
                        "port": 5000 + n,
                    },
                    "load": 0.25 * n,
                    "seconds_since_update": 1.0,
                }
                for n in (1, 2)
            ],
        }
    ],
}


def test_the_view_names_hosts_and_shows_a_fenced_host_and_the_last_failover():
    fence = {"time": 10.0, "kind": "fence_success", "host": "host3", "sequence": 1}
    failover = {
        "time": 11.0,
        "kind": "failover",
        "server_id": "db1",
        "from_pe": "0x00000003",
        "to_pe": "0x00000002",
        "took_s": 0.5,
        "sequence": 2,
    }
    view = pool_view(
        HANDLESPACE,
        {
            "http://a": pe_doc(1, ["web1"]),
            "http://b": pe_doc(2, ["db1"], events=[fence]),
            "http://c": "Connection refused",
        },
        {
            "http://k": {
                "vms": [
                    {
                        "server_id": "db1",
                        "state": "running",
                        "pe": "0x00000002",
                        "domain_state": 1,
                        "running_since": 15.0,
                        "failovers": 1,
                        "last_failover_s": 0.5,
                        "ram_mb": 100,
                    }
                ],
                "events": [failover],
            }
        },
        now=20.0,
        known_hosts={"0x00000003": "host3"},
        known_urls={"http://c": ("0x00000003", "host3")},
    )
    hosts = {h["name"]: h for h in view["hosts"]}
    assert hosts["host1"]["pe"] == "0x00000001" and hosts["host1"]["vms"] == ["web1"]
    assert hosts["host3"]["state"] == "fenced"
    assert hosts["host1"]["address"] == "127.0.0.1:5001"
    vms = {v["name"]: v for v in view["vms"]}
    assert vms["db1"]["host"] == "host2" and vms["db1"]["uptime_s"] == 5.0
    assert (
        vms["db1"]["domain_state"] == "running" and vms["db1"]["keeper"] == "http://k"
    )
    assert vms["db1"]["last_failover"] == {
        "time": 11.0,
        "from": "host3",
        "to": "host2",
        "took_s": 0.5,
    }
    assert vms["web1"]["keeper"] is None  # a VM no keeper of the console knows
    assert [e["kind"] for e in view["events"]] == ["fence_success", "failover"]
    assert view["events"][1]["from_host"] == "host3"


def test_an_unreachable_host_never_fenced_is_unreachable():
    view = pool_view(
        HANDLESPACE,
        {"http://c": "no answer"},
        {},
        now=1.0,
        known_urls={"http://c": ("0x00000003", "host3")},
    )
    (host3,) = [h for h in view["hosts"] if h["name"] == "host3"]
    assert host3["state"] == "unreachable"


def test_load_history_keeps_an_hour_at_one_sample_per_step():
    history = LoadHistory()
    for t in range(0, 4000, 5):
        history.add("0x1", float(t), 0.5)
    samples = history.describe()["0x1"]
    assert samples[-1][0] - samples[0][0] <= 3600 and len(samples) <= 361
    assert all(b[0] - a[0] >= 10 for a, b in zip(samples, samples[1:]))


# ------------------------------------------------------------ the drain plan


def view_for_drain(free_mb: dict, vms: dict, state: dict | None = None) -> dict:
    hosts = []
    for name, free in free_mb.items():
        hosts.append(
            {
                "name": name,
                "pe": name,
                "state": (state or {}).get(name, "up"),
                "registered": True,
                "free_ram_kb": free * 1024,
                "vms": sorted(v for v, (h, _ram) in vms.items() if h == name),
                "vm_ram_mb": {v: ram for v, (h, ram) in vms.items() if h == name},
                "orphans": [],
            }
        )
    return {"hosts": hosts, "vms": []}


def test_a_drain_plan_puts_the_largest_vm_first_where_most_ram_is_free():
    view = view_for_drain(
        {"host1": 300, "host2": 0, "host3": 500},
        {"a": ("host2", 400), "b": ("host2", 250), "c": ("host2", 100)},
    )
    host2 = view["hosts"][1]
    assert plan_drain(view, host2) == [("a", "host3"), ("b", "host1"), ("c", "host3")]


def test_a_drain_that_leaves_a_vm_nowhere_is_refused():
    view = view_for_drain(
        {"host1": 300, "host2": 0, "host3": 500},
        {"a": ("host2", 600)},
        state={"host3": "maintenance"},
    )
    with pytest.raises(Refused, match=r"a \(600 MB\) fits on no other host"):
        plan_drain(view, view["hosts"][1])


# ------------------------------------------------------------ the keeper's events and commands


def keeper_service(tmp_path, *pes):
    from xenpool.pu.core import PuSettings
    from xenpool.pu.keeper import KeeperService

    clock = Clock()
    pool = Pool(clock, *pes)
    service = KeeperService(
        [REQUEST], pool, clock, PuSettings(), str(tmp_path), None, secret=SECRET
    )
    return service, clock


def test_the_keeper_records_a_vm_lost_and_its_failover_once(tmp_path):

    pe1, pe2 = ScriptedPE(1), ScriptedPE(2)
    service, clock = keeper_service(tmp_path, pe1, pe2)
    service.startService()
    assert service.keepers[0].pe.identifier == 1
    clock.advance(1)
    pe1.die()
    clock.advance(1)
    kinds = [
        (e["kind"], e.get("pe") or e.get("from_pe")) for e in service.events.events
    ]
    assert kinds == [("vm_lost", "0x00000001"), ("failover", "0x00000001")]
    failover = service.events.events[-1]
    assert failover["to_pe"] == "0x00000002" and failover["server_id"] == "web1"


def test_the_keeper_stops_and_starts_a_vm_for_the_operator(tmp_path):
    from xenpool.pu.core import State

    pe = ScriptedPE(1)
    service, clock = keeper_service(tmp_path, pe)
    service.startService()
    assert service.command_target("start")("web1") == "web1 is running, not stopped"
    assert service.command_target("stop")("nope") == (
        "this keeper keeps no VM named 'nope'"
    )
    assert service.command_target("stop")("web1") is None
    service.stop_vm("web1")
    clock.advance(1)
    assert service.keepers[0].state == State.STOPPED
    assert any(isinstance(m, S.StopServer) for m in pe.received)
    assert service.command_target("stop")("web1") == "web1 is stopped already"
    service.start_vm("web1")
    assert service.keepers[0].state == State.RUNNING
    assert [e["kind"] for e in service.events.events] == ["vm_stop", "vm_start"]


def test_the_keepers_admin_page_takes_only_signed_commands(tmp_path):
    from twisted.web.test.requesthelper import DummyRequest

    from xenpool.pu.keeper import _KeeperAdmin

    service, clock = keeper_service(tmp_path, ScriptedPE(1))
    service.startService()
    clock.advance(1000)
    page = _KeeperAdmin(service)

    def post(body: bytes):
        request = DummyRequest([b""])
        request.method = b"POST"
        from io import BytesIO

        request.content = BytesIO(body)
        answer = json.loads(page.render_POST(request))
        return request.responseCode or 200, answer

    code, answer = post(body(action="stop", host="web1", issued=1000))
    assert code == 200 and answer == {"ok": True, "message": "web1 is stopping"}
    code, answer = post(body(b"a wrong secret of some length", "start", "web1", 1000))
    assert code == 403 and answer["message"] == "not signed with this pool's secret"
    code, answer = post(body(action="stop", host="db9", issued=1000, nonce="n2"))
    assert code == 403 and "no VM named 'db9'" in answer["message"]


def test_a_reloaded_keep_file_starts_new_stops_removed_and_refuses_changed(tmp_path):
    from dataclasses import replace

    service, clock = keeper_service(tmp_path, ScriptedPE(1))
    service.startService()
    lines = service.reload([replace(REQUEST, ram_mb=512)])
    assert lines == [
        "web1: changed in the keep file, not applied: a running VM keeps its RAM, "
        "disk and IPs (stop it, remove it, reload, add it back)"
    ]
    assert service.keepers[0].request.ram_mb == 300
    new = S.CreateServer("db1", "", ("10.0.5.2",), 100)
    lines = service.reload([new])
    assert lines == [
        "web1: removed from the keep file: stopped",
        "db1: new in the keep file: started",
    ]
    assert [k.server_id for k in service.keepers] == ["db1"]
    assert service.reload([new]) == []
