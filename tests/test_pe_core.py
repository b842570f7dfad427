"""The pool element's session behaviour on a Clock, with an in-memory hypervisor."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from xenpool.interfaces import RUNNING, SHUTOFF, NodeInfo
from xenpool.pe.accounting import HostAccounting, LoadSettings
from xenpool.pe.core import PeSettings, PoolElementCore
from xenpool.protocol import cookie as C
from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.testing import MemoryHypervisor, RecordingStonith
from xenpool.testing import RecordingFencer as Fencer
from xenpool_plugins.load import WeightedLoad

from .helpers import NODE, SECRET, Session, create


def test_create_starts_the_vm_and_sends_cookies(pe, clock):
    session = create(pe)
    assert pe.hypervisor.domains["web1"]["spec"].ram_mb == 300
    assert [r.code for r in session.results()] == [S.ResultCode.STARTED]
    cookies = session.cookies(clock.seconds())
    assert [c.running for c in cookies] == [
        False,
        True,
    ]  # running=false before the start
    assert (
        cookies[1].host == "pe1"
        and cookies[1].pe_identifier == 7
        and cookies[1].ram_mb == 300
    )
    assert not session.closed
    assert pe.accounting.free_kb == NODE.ram_kb - pe.accounting.overhead_kb - 300 * 1024
    assert pe.updates  # an early load update after the start


def test_not_enough_ram_is_code_11_and_raises_the_load(pe):
    session = create(pe, ram=2000)
    (result,) = session.results()
    assert result.code == S.ResultCode.NO_RAM and "KB free" in result.reason
    assert session.closed and pe.load() == 1.0 and "web1" not in pe.hypervisor.domains
    pe.accounting.load_updated()  # the next regular update clears the raise
    assert pe.load() < 1.0


def test_ram_is_booked_before_the_start(pe):
    free = pe.accounting.free_kb // 1024
    create(pe, "a", ram=free - 10)
    second = create(pe, "b", ram=20)
    assert second.results()[0].code == S.ResultCode.NO_RAM


def test_same_server_id_twice_is_code_13(pe):
    create(pe, "web1")
    again = create(pe, "web1")
    assert again.results()[0].code == S.ResultCode.ALREADY_RUNNING


def test_a_failed_start_gives_its_reason_and_returns_the_ram(pe):
    pe.hypervisor.fail_start = "no such network"
    free = pe.accounting.free_kb
    session = create(pe)
    (result,) = session.results()
    assert (
        result.code == S.ResultCode.UNSPECIFIED and "no such network" in result.reason
    )
    assert pe.accounting.free_kb == free and session.closed


def test_unreachable_disk_is_code_12(pe):
    pe.disk_xml = lambda spec: defer.fail(OSError(f"{spec}: no such export"))
    session = Session()
    pe.handle(S.CreateServer("web1", "nbd://san/x", (), 64), session)
    assert session.results()[0].code == S.ResultCode.DISK_UNREACHABLE
    assert "no such export" in session.results()[0].reason


def test_heartbeat_reports_the_domain_state(pe):
    session = create(pe)
    pe.handle(S.CheckRunning("web1", 1), session)
    assert session.sent[-1] == S.CheckRunningResponse("web1", RUNNING)
    pe.hypervisor.domains["web1"]["state"] = SHUTOFF  # it died under us
    pe.handle(S.CheckRunning("web1", 1), session)
    assert session.sent[-1] == S.CheckRunningResponse("web1", SHUTOFF)
    assert session.closed and "web1" not in pe.accounting.vms


def test_pu_gone_the_vm_outlives_it_for_the_lease(pe, clock):
    free = pe.accounting.free_kb
    session = create(pe)
    pe.session_lost(session)
    clock.advance(59)
    assert pe.hypervisor.shutdowns == [] and pe.orphans.keys() == {"web1"}
    # still taken: another VM of that name (another disk) is refused
    assert (
        create(pe, "web1", disk="/dev/vg/other").results()[0].code
        == S.ResultCode.ALREADY_RUNNING
    )
    clock.advance(1)
    assert (
        pe.hypervisor.shutdowns == ["web1"]
        and pe.accounting.free_kb == free
        and not pe.orphans
    )


def test_a_keeper_back_without_its_cookie_takes_its_vm_back_with_a_plain_create(
    pe, clock
):
    """A keeper whose state file was lost or corrupt asks for its VM again: the PE that
    kept it running for the lease re-adopts it instead of refusing or starting it twice."""
    pe.session_lost(create(pe))
    clock.advance(30)
    again = create(pe)
    assert (
        again.results()[0].ok
        and again.results()[0].reason == "re-adopted, kept running"
    )
    clock.advance(60)
    assert pe.hypervisor.shutdowns == [] and list(pe.hypervisor.domains) == ["web1"]


def test_a_refusal_because_another_host_runs_the_vm_sends_a_cookie_naming_that_host(
    pool, clock
):
    """So a keeper without a cookie goes to that host next (and re-adopts there)."""
    assert create(pool.cores[2], "web1", 64).results()[0].ok
    refused = create(pool.cores[0], "web1", 64)
    assert refused.results()[0].code == S.ResultCode.ALREADY_RUNNING
    (state,) = refused.cookies(clock.seconds())
    assert (state.host, state.pe_identifier, state.running) == ("host3", 3, True)


def test_without_a_lease_pu_gone_shuts_the_vm_down(pe):
    pe.settings = PeSettings(pe_identifier=7, host="pe1", secret=SECRET, lease_s=0)
    free = pe.accounting.free_kb
    pe.session_lost(create(pe))
    assert pe.hypervisor.shutdowns == ["web1"] and pe.accounting.free_kb == free


def test_a_restarted_keeper_re_adopts_its_vm(pe, clock):
    first = create(pe)
    cookie = [m for m in first.sent if isinstance(m, M.Cookie)][-1]
    pe.session_lost(first)
    clock.advance(30)
    keeper = Session()
    pe.handle(M.CookieEcho(cookie.cookie), keeper)
    (result,) = keeper.results()
    assert result.code == S.ResultCode.STARTED and "re-adopted" in result.reason
    assert (
        len(pe.hypervisor.domains) == 1 and not pe.orphans
    )  # not started a second time
    clock.advance(60)
    assert pe.hypervisor.shutdowns == []  # the lease no longer runs


def test_stop_request(pe):
    session = create(pe)
    pe.handle(S.StopServer("web1"), session)
    assert (
        session.sent[-1] == S.StopResult("web1", S.ResultCode.NORMAL_END, "shut down")
        and session.closed
    )
    assert "web1" not in pe.hypervisor.domains


def test_cpu_share_from_cpu_time_deltas_smoothed(pe, clock):
    create(pe)
    estimate = pe.accounting.vms["web1"].cpu_share
    assert estimate == pytest.approx(300 / 1024)  # until measured: its share of the RAM
    pe.sample_load()  # first reading: a baseline
    clock.advance(30)
    pe.hypervisor.domains["web1"]["cpu_ns"] = int(30e9)  # one of two CPUs busy for 30 s
    pe.sample_load()
    assert pe.accounting.vms["web1"].cpu_share == pytest.approx(
        (0.5 + 3 * estimate) / 4
    )


def test_cookie_echo_refusals(pe, clock):
    state = C.SessionState(
        b"Xen", "web9", "", (), 64, 1, False, "pe2", 9, clock.seconds()
    )
    for cookie, reason in (
        (C.seal(state, b"another secret"), "bad MAC"),
        (C.seal(state, SECRET)[:-1] + b"x", "bad MAC"),
    ):
        session = Session()
        pe.handle(M.CookieEcho(cookie), session)
        assert (
            session.results()[0].code == S.ResultCode.COOKIE_REJECTED
            and reason in session.results()[0].reason
        )
    clock.advance(61)
    session = Session()
    pe.handle(M.CookieEcho(C.seal(state, SECRET)), session)
    assert "expired" in session.results()[0].reason


def test_cookie_echo_of_a_stopped_vm_starts_it_here(pe, clock):
    state = C.SessionState(
        b"Xen", "web9", "", ("10.0.5.9",), 64, 1, False, "pe2", 9, clock.seconds()
    )
    session = Session()
    pe.handle(M.CookieEcho(C.seal(state, SECRET)), session)
    assert (
        session.results()[0].code == S.ResultCode.STARTED
        and "web9" in pe.hypervisor.domains
    )


def test_cookie_echo_of_a_maybe_running_vm_is_not_started_without_fencing(pe, clock):
    state = C.SessionState(
        b"Xen", "web9", "", (), 64, 1, True, "pe2", 9, clock.seconds()
    )
    session = Session()
    pe.handle(M.CookieEcho(C.seal(state, SECRET)), session)
    assert (
        session.results()[0].code == S.ResultCode.FENCE_FAILED
        and "web9" not in pe.hypervisor.domains
    )


def test_failover_fences_the_old_host_first(pe, clock):
    pe.fencer = Fencer()
    state = C.SessionState(
        b"Xen", "web9", "", (), 64, 1, True, "pe2", 9, clock.seconds()
    )
    session = Session()
    pe.hypervisor.start = lambda spec, start=pe.hypervisor.start: (
        pe.fencer.fenced.append("started") or start(spec)
    )
    pe.handle(M.CookieEcho(C.seal(state, SECRET)), session)
    assert pe.fencer.fenced == ["pe2", "started"]  # the fence came before the start
    assert session.results()[0].code == S.ResultCode.STARTED
    assert (pe.fence_attempts, pe.fence_failures) == (1, 0)  # for /metrics


def test_a_failed_fence_means_no_start(pe, clock):
    pe.fencer = Fencer(fail=True)
    state = C.SessionState(
        b"Xen", "web9", "", (), 64, 1, True, "pe2", 9, clock.seconds()
    )
    session = Session()
    pe.handle(M.CookieEcho(C.seal(state, SECRET)), session)
    (result,) = session.results()
    assert result.code == S.ResultCode.FENCE_FAILED and "status on" in result.reason
    assert "web9" not in pe.hypervisor.domains
    assert (pe.fence_attempts, pe.fence_failures) == (1, 1)  # for /metrics


def test_status_description(pe):
    create(pe)
    create(pe, "big", ram=5000)
    status = pe.describe()
    assert status["vms"][0]["server_id"] == "web1" and status["refusals"] == {
        "no_ram": 1
    }


# ------------------------------------------------------------- pool-wide uniqueness


class Pool:
    """ClaimAsker over in-memory PE cores (unit tests only): every other PE answers."""

    def __init__(self) -> None:
        self.cores: list[PoolElementCore] = []
        self.down: set[int] = set()

    def asker(self, me: PoolElementCore):
        pool = self

        class Asker:
            def ask(self, query, also=frozenset()):
                return defer.succeed(
                    [
                        core.answer_claim(query)
                        for core in pool.cores
                        if core is not me
                        and core.settings.pe_identifier not in pool.down
                    ]
                )

        return Asker()


@pytest.fixture
def pool(clock):
    p = Pool()
    for n in (1, 2, 3):
        core = PoolElementCore(
            PeSettings(
                pe_identifier=n, host=f"host{n}", secret=SECRET, cookie_max_age_s=600
            ),
            MemoryHypervisor(),
            HostAccounting(NODE),
            WeightedLoad(),
            clock,
            fencer=Fencer(),
        )
        core.claims = p.asker(core)
        p.cores.append(core)
    return p


@pytest.mark.parametrize(
    "second, expected",
    [
        (dict(server_id="web1"), "web1 runs on host1 (PE 0x00000001, which holds it)"),
        (
            dict(server_id="web2", disk="/dev/vg/web1"),
            "disk /dev/vg/web1 is used by web1 on host1",
        ),
        (
            dict(server_id="web2", ips=("10.9.9.9", "10.0.5.1")),
            "IP 10.0.5.1 is used by web1 on host1",
        ),
    ],
)
def test_serverid_disk_and_ip_are_unique_in_the_pool(pool, second, expected):
    assert (
        create(pool.cores[0], "web1", 64, ips=("10.0.5.1",), disk="/dev/vg/web1")
        .results()[0]
        .ok
    )
    result = create(pool.cores[1], ram=64, **second).results()[0]
    assert result.code == S.ResultCode.ALREADY_RUNNING and expected in result.reason
    assert len(pool.cores[1].hypervisor.domains) == 0


def test_a_pe_gives_way_to_one_that_is_starting_the_vm_whatever_the_identifiers(pool):
    low, high = pool.cores[0], pool.cores[1]
    low.starting["web1"] = S.CreateServer(
        "web1", "", (), 64
    )  # PE 1 is in the middle of a start
    result = create(high, "web1", 64).results()[0]
    assert (
        result.code == S.ResultCode.ALREADY_RUNNING
        and "which is starting it" in result.reason
    )
    del low.starting["web1"]
    high.starting["web1"] = S.CreateServer(
        "web1", "", (), 64
    )  # and the other way round
    assert create(low, "web1", 64).results()[0].code == S.ResultCode.ALREADY_RUNNING
    assert not low.hypervisor.domains and not high.hypervisor.domains


def test_a_replayed_cookie_for_a_vm_running_elsewhere_is_refused_without_fencing(
    pool, clock
):
    first = create(pool.cores[0], "web1", 64)
    old_cookie = [m for m in first.sent if isinstance(m, M.Cookie)][
        -1
    ].cookie  # running on host1
    pool.cores[0].session_lost(first)  # host1 keeps it for the lease: alive, holding it
    replay = Session()
    pool.cores[2].handle(M.CookieEcho(old_cookie), replay)
    (result,) = replay.results()
    assert result.code == S.ResultCode.ALREADY_RUNNING and "host1" in result.reason
    assert pool.cores[2].fencer.fenced == [] and not pool.cores[2].hypervisor.domains


def test_a_dead_host_is_fenced_and_its_vm_started_once(pool):
    first = create(pool.cores[0], "web1", 64)
    cookie = [m for m in first.sent if isinstance(m, M.Cookie)][-1].cookie
    pool.down.add(1)  # host1 is gone: it cannot answer
    session = Session()
    pool.cores[1].handle(M.CookieEcho(cookie), session)
    assert session.results()[0].ok and pool.cores[1].fencer.fenced == ["host1"]
    again = Session()  # the same cookie once more, to a third PE: host2 now holds it
    pool.cores[2].handle(M.CookieEcho(cookie), again)
    assert (
        again.results()[0].code == S.ResultCode.ALREADY_RUNNING
        and "host2" in again.results()[0].reason
    )


def test_no_start_when_the_pool_cannot_be_asked(pool):
    class Broken:
        def ask(self, query, also=frozenset()):
            return defer.fail(ConnectionError("no registrar answered"))

    pool.cores[0].claims = Broken()
    result = create(pool.cores[0], "web1", 64).results()[0]
    assert (
        result.code == S.ResultCode.UNSPECIFIED
        and "no registrar answered" in result.reason
    )
    assert not pool.cores[0].starting


def test_the_disk_is_released_after_the_vm_stopped(pe):
    released = []
    pe.disk_release = lambda spec: released.append(spec) or defer.succeed(None)
    session = create(pe, disk="/dev/vg/web1")
    pe.handle(S.StopServer("web1"), session)
    assert released == ["/dev/vg/web1"] and "web1" not in pe.hypervisor.domains


def test_a_crash_reported_by_a_lifecycle_event_reaches_the_pu_at_once(pe):
    pe.events_live = True
    free = pe.accounting.free_kb
    session = create(pe)
    pe.domain_event("web1", 6)  # VIR_DOMAIN_CRASHED
    assert session.sent[-1] == S.CheckRunningResponse("web1", 6) and session.closed
    assert pe.accounting.free_kb == free and not pe.sessions


def test_with_events_heartbeats_are_answered_without_asking_libvirt(pe):
    pe.events_live = True
    session = create(pe)
    pe.hypervisor.state = lambda name: pytest.fail("libvirt asked although events flow")
    pe.handle(S.CheckRunning("web1", 1), session)
    assert session.sent[-1] == S.CheckRunningResponse("web1", RUNNING)
    pe.domain_event("web1", 3)  # paused: still normal
    pe.handle(S.CheckRunning("web1", 1), session)
    assert session.sent[-1] == S.CheckRunningResponse("web1", 3) and not session.closed


def test_events_of_our_own_shutdown_are_expected(pe):
    pe.events_live = True
    session = create(pe)
    stopping = pe.hypervisor.shutdown

    def shutdown(name, timeout_s):
        pe.domain_event(name, SHUTOFF)  # the event arrives while we stop it
        return stopping(name, timeout_s)

    pe.hypervisor.shutdown = shutdown
    pe.handle(S.StopServer("web1"), session)
    assert session.sent[-1] == S.StopResult(
        "web1", S.ResultCode.NORMAL_END, "shut down"
    )


def test_host_cpu_share_from_proc_stat_minus_the_guests():
    from xenpool.pe.accounting import HostCpu

    lines = iter(
        [
            "cpu  100 0 100 800 0 0 0 0 0 0",
            "cpu  400 0 200 1400 0 0 0 0 0 0",  # +300 user +100 system of +1000: 40 % busy
        ]
    )
    host = HostCpu(read=lambda: next(lines))
    assert host.share(0.1) is None  # the first reading is the baseline
    assert host.share(0.1) == pytest.approx(0.3)  # 40 % busy, 10 % of it the guests'


def test_the_test_driver_cpu_time_is_not_sampled(pe, clock):
    pe.hypervisor.measures_cpu = (
        False  # libvirt's test driver: cpuTime is wall-clock time
    )
    create(pe)
    estimate = pe.accounting.vms["web1"].cpu_share
    pe.sample_load()
    clock.advance(30)
    pe.hypervisor.domains["web1"]["cpu_ns"] = int(60e9)
    pe.sample_load()
    assert pe.accounting.vms["web1"].cpu_share == estimate


def test_a_restarted_pe_keeps_the_domains_it_finds_for_their_keeper(pe, clock):
    first = create(pe, "web1", 300, ips=("10.0.5.1",), disk="/dev/vg/web1")
    cookie = [m for m in first.sent if isinstance(m, M.Cookie)][-1].cookie
    # the PE process restarts: a fresh core over the same, still running, hypervisor
    restarted = PoolElementCore(
        pe.settings, pe.hypervisor, HostAccounting(NODE), WeightedLoad(), clock
    )
    restarted.found_running({"web1": (RUNNING, 300 * 1024)})
    assert restarted.accounting.free_kb == pe.accounting.free_kb  # its RAM counts
    assert (
        create(restarted, "web1", 64).results()[0].code == S.ResultCode.ALREADY_RUNNING
    )
    keeper = Session()
    restarted.handle(M.CookieEcho(cookie), keeper)
    assert "re-adopted" in keeper.results()[0].reason
    assert (
        restarted.conflict_with("other", "/dev/vg/web1", ()) is not None
    )  # the cookie told its disk
    assert list(pe.hypervisor.domains) == ["web1"]  # never started twice


def test_found_domains_without_a_keeper_end_with_the_lease(pe, clock):
    create(pe, "web1", 300)
    restarted = PoolElementCore(
        pe.settings, pe.hypervisor, HostAccounting(NODE), WeightedLoad(), clock
    )
    restarted.found_running({"web1": (RUNNING, 300 * 1024)})
    clock.advance(pe.settings.lease_s)
    assert pe.hypervisor.shutdowns == ["web1"] and not restarted.orphans


def test_concurrent_failovers_from_one_host_share_one_fence():
    from xenpool.pe.fencing import StonithFencer

    stonith = RecordingStonith(hold=True)
    fencer = StonithFencer(stonith, {"host1": {"plug": "1"}})
    first, second = fencer.fence("host1"), fencer.fence("host1")
    assert len(stonith.runs) == 1  # one power-off for both
    stonith.runs[0].callback(None)
    assert first.called and second.called
    fencer.fence("host1")
    assert len(stonith.runs) == 2  # a finished fence is never reused
    results = []
    fencer.fence("host1").addErrback(results.append)
    stonith.runs[1].errback(RuntimeError("status on"))
    assert results and "status on" in results[0].getErrorMessage()


def test_a_silent_pu_session_is_dropped_after_the_idle_timeout(pe, clock):
    from twisted.internet.testing import StringTransport

    from xenpool.pe.service import SessionFactory

    factory = SessionFactory(pe, idle_timeout=8, clock=clock)
    factory.startFactory()
    chatty, silent = factory.buildProtocol(None), factory.buildProtocol(None)
    for protocol in (chatty, silent):
        protocol.makeConnection(StringTransport())
    for _ in range(4):
        clock.advance(3)
        chatty.dataReceived(b"")  # any bytes count as a sign of life
    assert silent.transport.disconnecting and not chatty.transport.disconnecting
    factory.stopFactory()


def test_a_session_waiting_for_its_answer_is_not_idle(pe, clock):
    from twisted.internet.testing import StringTransport

    from xenpool.pe.service import SessionFactory
    from xenpool.protocol import framing

    factory = SessionFactory(pe, idle_timeout=8, clock=clock)
    factory.startFactory()
    waiting = factory.buildProtocol(None)
    waiting.makeConnection(StringTransport())
    started = defer.Deferred()
    pe.hypervisor.start = lambda spec: (
        started
    )  # a slow hypervisor: the start takes 30 s
    waiting.dataReceived(framing.frame_message(S.CreateServer("slow1", "", (), 64)))
    clock.advance(30)
    assert waiting.pending == 1 and not waiting.transport.disconnecting
    started.callback(None)
    assert waiting.pending == 0 and b"slow1" in waiting.transport.value()
    clock.advance(6)
    assert (
        not waiting.transport.disconnecting
    )  # idle since its answer, not since its request
    clock.advance(4)
    assert waiting.transport.disconnecting
    factory.stopFactory()


def test_a_repeated_heartbeat_gets_its_last_answer_until_the_state_changes(pe, clock):
    from twisted.internet.testing import StringTransport

    from xenpool.pe.service import SessionFactory
    from xenpool.protocol import framing

    pe.events_live = True
    factory = SessionFactory(pe, idle_timeout=8, clock=clock)
    session = factory.buildProtocol(None)
    session.makeConnection(StringTransport())
    session.dataReceived(framing.frame_message(S.CreateServer("web1", "", (), 64)))
    heartbeat = framing.frame_message(S.CheckRunning("web1", 1))
    running = framing.frame_message(S.CheckRunningResponse("web1", RUNNING))
    paused = framing.frame_message(S.CheckRunningResponse("web1", 3))
    session.transport.clear()
    session.dataReceived(heartbeat)
    assert session.transport.value() == running

    handle, pe.handle = (
        pe.handle,
        lambda *a: pytest.fail("a repeated heartbeat was decoded and handled"),
    )
    session.transport.clear()
    session.dataReceived(heartbeat)
    assert session.transport.value() == running
    pe.handle = handle

    pe.domain_event("web1", 3)  # paused: the remembered answer no longer holds
    session.transport.clear()
    session.dataReceived(heartbeat)
    assert session.transport.value() == paused

    session.transport.clear()
    for _ in range(2):
        session.dataReceived(heartbeat + heartbeat)  # two in one read: two answers
    session.dataReceived(heartbeat[:5])
    session.dataReceived(heartbeat[5:])  # one split over two reads: one answer
    assert session.transport.value() == 5 * paused

    pe.domain_event("web1", 6)  # crashed: the PU hears it, and the session ends
    session.transport.clear()
    assert not pe.sessions and session.transport.disconnecting


def test_with_a_load_window_a_vm_s_load_is_its_mean_over_the_window():
    node = NodeInfo("h", cpus=2, ram_kb=1024 * 1024)
    accounting = HostAccounting(
        node, LoadSettings(sample_interval_s=30, load_window_s=90, window_samples=2)
    )
    accounting.reserve("vm", 64)
    estimate = accounting.vms["vm"].cpu_share
    accounting.sample_vm("vm", 0, 0.0)
    assert accounting.vms["vm"].cpu_share == estimate  # nothing measured yet
    cpu_ns = 0
    for t, busy_s in (
        (30, 30),
        (60, 0),
        (90, 30),
        (120, 30),
        (150, 0),
    ):  # seconds of one core
        cpu_ns += int(busy_s * 1e9)
        accounting.sample_vm("vm", cpu_ns, float(t))
        if t == 30:
            assert accounting.vms["vm"].cpu_share == pytest.approx(
                0.5
            )  # the first sample, no estimate left
    # 60..150: 60 core-seconds over 90 s on 2 CPUs; what came before the window is gone
    assert accounting.vms["vm"].cpu_share == pytest.approx(60 / 90 / 2)
    assert accounting.window_share("vm") == pytest.approx(
        30 / 60 / 2
    )  # the rebalancers' 2 samples
    with_smoothing = HostAccounting(node, LoadSettings(sample_interval_s=30))
    with_smoothing.reserve("vm", 64)
    with_smoothing.sample_vm("vm", 0, 0.0)
    with_smoothing.sample_vm("vm", int(30e9), 30.0)
    assert with_smoothing.vms["vm"].cpu_share == pytest.approx((0.5 + 3 * estimate) / 4)


def test_a_pu_gone_while_its_claim_ran_gets_no_vm_started_for_a_dead_session(pe, clock):
    """The claim (lease, questions, a fence) can take seconds; a PU that went away meanwhile
    must not leave a VM attached to its dead session (refusing its keeper's cookie with "runs
    on this PE" until an idle sweep): nothing is started and the claim is given back."""
    answers = defer.Deferred()

    class SlowPool:
        def ask(self, query, also=frozenset()):
            return answers

    pe.claims = SlowPool()
    session = create(pe)
    assert "web1" in pe.starting
    pe.session_lost(session)
    answers.callback([])
    assert pe.hypervisor.domains == {} and pe.starting == {} and pe.sessions == {}
    pe.claims = None
    assert create(pe).results()[0].ok  # its keeper, back: started normally


def test_a_keeper_gone_before_its_re_adoption_completes_leaves_the_vm_kept(pe, clock):
    first = create(pe)
    pe.session_lost(first)  # an orphan now, kept for the lease
    late = Session()
    pe.session_lost(late)  # this session ended before it held anything
    pe._adopt(pe.orphans["web1"], late)
    assert "web1" in pe.orphans and late not in pe.sessions


def test_a_pu_gone_while_the_disk_is_checked_gets_no_vm_started(pe, clock):
    """The chaos campaign's double start: the keeper died while the PE checked the VM's
    disk; the session ended with nothing running (RAM and lease given back), but the start
    went on, so the VM ran untracked and another PE, asked by the restarted keeper, started
    it a second time. Now nothing starts once the session is gone."""
    checked = defer.Deferred()
    pe.disk_xml = lambda spec: checked
    session = create(pe, disk="nbd://san/web1")
    pe.session_lost(session)
    checked.callback("<disk/>")
    assert (
        pe.hypervisor.domains == {}
        and pe.sessions == {}
        and pe.orphans == {}
        and pe.starting == {}
    )
    assert pe.accounting.free_kb == HostAccounting(NODE).free_kb


def test_a_pu_gone_while_the_hypervisor_starts_keeps_the_vm_for_its_lease(pe, clock):
    started = defer.Deferred()
    start = pe.hypervisor.start
    pe.hypervisor.start = lambda spec: started.addCallback(lambda _: start(spec))
    session = create(pe)
    pe.session_lost(session)  # may be running now: kept for the lease, re-adoptable
    started.callback(None)
    assert list(pe.hypervisor.domains) == ["web1"] and list(pe.orphans) == ["web1"]
