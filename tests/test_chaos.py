"""``xenpool chaos``: the pure parts (schedule, invariant checker, log analysis, report)
and one short real campaign in network namespaces (root only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from xenpool.chaos.model import (
    KINDS,
    UNNAMED,
    Checker,
    HostView,
    LogEvent,
    Report,
    Round,
    Trial,
    check_attempts,
    log_events,
    schedule,
)

VMS = ["vm1", "vm2", "vm3"]
IDS = {"host1": "0x00000001", "host2": "0x00000002", "host3": "0x00000003"}


def rnd(t, hosts, keeper=None, registrars=None) -> Round:
    """hosts: name -> set of domains | None (no answer) | "dead"."""
    views = {
        h: HostView(
            alive=d != "dead",
            domains=None if d in (None, "dead") else set(d),
            registered=True,
            pe_id=IDS[h],
        )
        for h, d in hosts.items()
    }
    return Round(
        t,
        views,
        keeper,
        registrars
        if registrars is not None
        else {"r1": set(IDS.values()), "r2": set(IDS.values())},
    )


def keeper_says(**where) -> list[dict]:
    return [
        {"server_id": vm, "state": "running", "pe": IDS[host]}
        for vm, host in where.items()
    ]


# ------------------------------------------------------------------ schedule


def test_schedule_is_deterministic_for_a_seed():
    a = schedule(7, ["pe-kill", "garbage", "part-all"], 3)
    assert a == schedule(7, ["pe-kill", "garbage", "part-all"], 3)
    assert a != schedule(8, ["pe-kill", "garbage", "part-all"], 3)
    assert len(a) == 9 and sorted(t.kind for t in a) == sorted(
        ["pe-kill", "garbage", "part-all"] * 3
    )
    for t in a:
        lo, hi = KINDS[t.kind]
        assert lo <= t.hold_s <= hi


def test_schedule_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown fault kind 'nope'"):
        schedule(0, ["pe-kill", "nope"], 1)


def test_every_kind_has_a_fault():
    from xenpool.chaos.faults import FAULTS
    from xenpool.chaos.model import SELFTEST_KINDS

    assert set(FAULTS) == set(KINDS) | set(SELFTEST_KINDS)
    assert not set(KINDS) & set(SELFTEST_KINDS)


# ------------------------------------------------------------------ invariant (a)


def test_checker_flags_a_double_start_seen_in_two_rounds():
    c = Checker(VMS)
    assert c.feed(rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}})) == []
    assert (
        c.feed(rnd(1, {"host1": {"vm1"}, "host2": {"vm2", "vm1"}, "host3": {"vm3"}}))
        == []
    )  # one round: skew
    found = c.feed(
        rnd(2, {"host1": {"vm1"}, "host2": {"vm2", "vm1"}, "host3": {"vm3"}})
    )
    assert found == ["double start: vm1 runs on host1, host2"]
    assert (
        c.feed(rnd(3, {"host1": {"vm1"}, "host2": {"vm2", "vm1"}, "host3": {"vm3"}}))
        == []
    )  # reported once


def test_a_silent_host_still_runs_what_it_last_reported_and_a_dead_one_nothing():
    c = Checker(VMS)
    c.feed(rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}}))
    # host1 stopped (no answer) while vm1 starts on host2: a double start
    c.feed(rnd(1, {"host1": None, "host2": {"vm2", "vm1"}, "host3": {"vm3"}}))
    assert c.feed(
        rnd(2, {"host1": None, "host2": {"vm2", "vm1"}, "host3": {"vm3"}})
    ) == ["double start: vm1 runs on host1, host2"]
    # host1 killed (fenced) before vm1 started on host2: fine
    c = Checker(VMS)
    c.feed(rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}}))
    assert (
        c.feed(rnd(1, {"host1": "dead", "host2": {"vm2", "vm1"}, "host3": {"vm3"}}))
        == []
    )
    assert (
        c.feed(rnd(2, {"host1": "dead", "host2": {"vm2", "vm1"}, "host3": {"vm3"}}))
        == []
    )


# ------------------------------------------------------------------ invariants (b), (d)


def test_settled_when_every_vm_runs_once_and_is_heartbeated():
    c = Checker(VMS)
    r = rnd(
        0,
        {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}},
        keeper_says(vm1="host1", vm2="host2", vm3="host3"),
    )
    assert c.settled(r) == []


def test_settled_flags_a_missing_vm_and_a_keeper_that_is_not_running_it():
    c = Checker(VMS)
    keeper = keeper_says(vm1="host1", vm2="host2", vm3="host3")
    keeper[2]["state"] = "waiting"
    problems = c.settled(
        rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": set()}, keeper)
    )
    assert problems == ["vm3 runs on 0 hosts (none)"]
    problems = c.settled(
        rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}}, keeper)
    )
    assert problems == ["vm3: keeper state waiting"]
    keeper = keeper_says(vm1="host1", vm2="host2", vm3="host1")
    problems = c.settled(
        rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}}, keeper)
    )
    assert problems == ["vm3: keeper heartbeats PE 0x00000001 but it runs on host3"]
    assert "keeper does not answer" in c.settled(
        rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}}, None)
    )


def test_settled_flags_registrars_that_disagree():
    c = Checker(VMS)
    keeper = keeper_says(vm1="host1", vm2="host2", vm3="host3")
    regs = {"r1": set(IDS.values()), "r2": {"0x00000001", "0x00000002"}}
    problems = c.settled(
        rnd(0, {"host1": {"vm1"}, "host2": {"vm2"}, "host3": {"vm3"}}, keeper, regs)
    )
    assert problems == [
        "registrar r2 knows PEs ['0x00000001', '0x00000002'], running are ['0x00000001', '0x00000002', '0x00000003']"
    ]


# ------------------------------------------------------------------ invariant (c)


def test_start_attempts_closer_than_the_backoff_are_flagged():
    ok = [
        LogEvent(0.0, "host1", "start", "vm1"),
        LogEvent(0.6, "host1", "start", "vm1"),
        LogEvent(0.1, "host2", "start", "vm1"),
    ]
    assert check_attempts(ok) == []
    hot = [LogEvent(t / 20, "host1", "start", "vm1") for t in range(5)]
    assert check_attempts(hot) == [
        "start attempts: vm1: 4 less than 0.25 s after the one before on the same PE (host1 4)"
    ]


def test_a_keeper_in_a_hot_loop_on_a_bad_cookie_is_flagged():
    loop = [
        LogEvent(t / 100, pe, "start", UNNAMED)
        for t in range(50)
        for pe in ("host2", "host3")
    ]
    assert check_attempts(loop) == [
        f"start attempts: {UNNAMED}: 98 less than 0.25 s after the one before on the same PE (host2 49, host3 49)"
    ]
    assert check_attempts(loop, unnamed=False) == []


def test_too_many_fence_attempts_are_flagged():
    # PEs each fencing it once (each takes over VMs of its own), then again after a hold-off
    spaced = [
        LogEvent(t, pe, "fence", "", "host1")
        for pe in ("host2", "host3", "host4")
        for t in (0.1, 1.2, 2.5)
    ]
    assert check_attempts(spaced) == []
    # one PE fencing it again and again (a failing fence retried without a hold-off)
    again = spaced + [
        LogEvent(3.0 + 0.2 * i, "host3", "fence", "", "host1") for i in range(3)
    ]
    assert check_attempts(again) == [
        "fence attempts: host3 fenced host1 4 times within 1.0 s"
    ]
    assert check_attempts(again, fence_tolerance=3) == []


def test_a_silent_host_keeps_its_last_report_only_while_it_is_the_same_process():
    """A stopped or cut-off PE still runs what it last reported; a PE process that replaced
    it (the host rebooted) does not, even before it answers."""
    checker = Checker(["vm1"])
    view = lambda domains, process: HostView(True, domains, True, IDS["host1"], process)  # noqa: E731
    other = HostView(True, {"vm1"}, True, IDS["host2"], 7)
    checker.feed(
        Round(
            0,
            {
                "host1": view({"vm1"}, 1),
                "host2": HostView(True, set(), True, IDS["host2"], 7),
            },
            [],
            {},
        )
    )
    assert (
        checker.feed(Round(1, {"host1": view(None, 1), "host2": other}, [], {})) == []
    )  # one round: skew
    assert checker.feed(Round(2, {"host1": view(None, 1), "host2": other}, [], {})) == [
        "double start: vm1 runs on host1, host2"
    ]
    checker = Checker(["vm1"])
    checker.feed(
        Round(
            0,
            {
                "host1": view({"vm1"}, 1),
                "host2": HostView(True, set(), True, IDS["host2"], 7),
            },
            [],
            {},
        )
    )
    for t in (
        1,
        2,
        3,
    ):  # host1 rebooted (a new process, not answering yet); vm1 moved to host2
        assert (
            checker.feed(Round(t, {"host1": view(None, 2), "host2": other}, [], {}))
            == []
        )


def test_log_events_reads_a_pe_json_log(tmp_path):
    from twisted.logger import Logger, jsonFileLogObserver

    path = tmp_path / "host2.jsonl"
    with open(path, "w") as out:
        log = Logger(observer=jsonFileLogObserver(out))
        log.info("started {server} ({ram} MB) for a PU", server="vm1", ram=128)
        log.info("fencing {host}: asking {provider}", host="host1", provider="command")
        log.warn(
            "fenced {host} before starting {server}", host="host1", server="vm2"
        )  # not an operation
        log.info("fencing {host}: asking {provider}", host="host3", provider="command")
        log.critical(
            "FENCING {host} FAILED, {server} NOT STARTED: {err}",
            host="host3",
            server="vm3",
            err="no",
        )
        log.info(
            "refused {server}: {code} {reason}", server="vm4", code=13, reason="runs"
        )
        log.info(
            "refused {server}: {code} {reason}", server="", code=7, reason="garbage"
        )
        log.info("something else")
    with open(path, "a") as out:
        out.write('\x1e{"torn": ')  # a line cut by a kill -9
    events = log_events("host2", path)
    assert [(e.what, e.vm, e.target) for e in events] == [
        ("start", "vm1", ""),
        ("fence", "", "host1"),
        ("fence", "", "host3"),
        ("start", "vm4", ""),
        ("start", UNNAMED, ""),
    ]
    assert all(e.pe == "host2" for e in events)
    assert check_attempts(events) == []


# ------------------------------------------------------------------ report


def test_report_json_format():
    report = Report()
    report.add_trial(Trial("pe-kill", 0, 11, 1.0), 2.5, [])
    report.add_trial(Trial("pe-kill", 1, 12, 1.0), None, ["not recovered"])
    report.add_trial(Trial("garbage", 0, 13, 1.0), 0.1, [])
    doc = report.as_json()
    assert doc == {
        "trials": 3,
        "kinds": {
            "pe-kill": {"trials": 2, "violations": 1, "recovery_s": [2.5]},
            "garbage": {"trials": 1, "violations": 0, "recovery_s": [0.1]},
        },
        "violations": [{"kind": "pe-kill", "seed": 12, "what": "not recovered"}],
    }
    json.dumps(doc)
    report.add_violation(
        Trial("garbage", 0, 13, 1.0), "still broken before the next trial"
    )
    assert report.as_json()["kinds"]["garbage"] == {
        "trials": 1,
        "violations": 1,
        "recovery_s": [0.1],
    }
    assert report.as_json()["violations"][-1] == {
        "kind": "garbage",
        "seed": 13,
        "what": "still broken before the next trial",
    }
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(report.table())
    text = console.export_text()
    assert "pe-kill" in text and "garbage" in text and "1/2" in text


def test_chaos_command_line_refuses_an_unknown_kind():
    from xenpool.cli import main

    assert main(["chaos", "--kinds", "pe-kill,nope"]) == 2


# ------------------------------------------------------------------ a real campaign

CAMPAIGN_KINDS = ",".join(KINDS)  # every kind, one trial each
SELFTEST = "selftest-broken-fence"  # breaks fencing on purpose: must be caught as a double start


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the chaos bed needs root (network namespaces, veth, iptables)",
)
def test_a_short_real_campaign(tmp_path):
    """Two trials of every kind with the real ``xenpool chaos`` command (about 3 minutes)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpool.cli",
            "chaos",
            "--kinds",
            f"{CAMPAIGN_KINDS},{SELFTEST}",
            "--trials",
            "2",
            "--seed",
            "1",
            "--recovery-bound",
            "30",
            "--json",
            "--workdir",
            str(tmp_path / "bed"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stderr)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"trials", "kinds", "violations"}
    kinds = [*CAMPAIGN_KINDS.split(","), SELFTEST]
    assert report["trials"] == 2 * len(kinds) and sorted(report["kinds"]) == sorted(
        kinds
    )
    for kind, k in report["kinds"].items():
        assert set(k) == {"trials", "violations", "recovery_s"} and k["trials"] == 2
        assert k["recovery_s"], (
            f"{kind}: the bed did not recover: {report['violations']}"
        )  # the bed recovered
        assert all(0 <= s <= 30 for s in k["recovery_s"])
    for v in report["violations"]:
        assert set(v) == {"kind", "seed", "what"} and v["kind"] in kinds
        print(f"VIOLATION {v['kind']} seed {v['seed']}: {v['what']}")
    # The checker sees a double start when fencing is broken on purpose ...
    assert any(
        v["kind"] == SELFTEST and v["what"].startswith("double start:")
        for v in report["violations"]
    )
    assert proc.returncode == 1
    # ... and xenpool itself breaks no invariant.
    assert [v for v in report["violations"] if v["kind"] != SELFTEST] == []
    # The bed cleaned up after itself: no namespace of ours is left (other beds, such as
    # a campaign run beside the suite, may come and go meanwhile).
    ours = (tmp_path / "bed" / "netns-tag").read_text().strip()
    assert ours.startswith("xc") and not [
        n for n in netns_names() if n.startswith(ours)
    ]


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("xc")]
