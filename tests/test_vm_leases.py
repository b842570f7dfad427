"""Who may start a VM: per-VM leases from a majority of voters (registrars), on a Clock.

The voters' table alone, then PE cores with in-memory voters: two PEs taking one VM over
at the same moment, across a fence that takes seconds, start it exactly once."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from xenpool.pe.accounting import HostAccounting
from xenpool.pe.core import PeSettings, PoolElementCore
from xenpool.pe.leases import LeaseSettings, VmLeases
from xenpool.protocol import cookie as C
from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.registrar.leases import LeaseTable
from xenpool.testing import MemoryHypervisor
from xenpool_plugins.load import WeightedLoad

from .helpers import NODE, SECRET, Session

ACQUIRE, RENEW, RELEASE = (
    S.LeaseAction.ACQUIRE,
    S.LeaseAction.RENEW,
    S.LeaseAction.RELEASE,
)


def request(
    host: str,
    action=ACQUIRE,
    server_id="web1",
    pe=None,
    cleared="",
    disk="",
    ips=(),
    duration_ms=15_000,
):
    pe = pe if pe is not None else int(host[-1])
    return S.LeaseRequest(
        b"Xen", pe, host, action, duration_ms, server_id, disk, ips, cleared
    )


# ------------------------------------------------------------------ one voter


def test_a_voter_grants_a_key_to_one_host_while_its_lease_runs():
    table = LeaseTable(7)
    assert table.handle(request("host1"), now=0).granted
    refused = table.handle(request("host2"), now=5)
    assert (
        not refused.granted
        and refused.holder == S.Holder(1, "host1")
        and refused.remaining_ms == 10_000
    )
    assert "VM web1 is held by host1" in refused.reason
    assert table.handle(request("host1", RENEW), now=10).granted  # the holder renews
    assert not table.handle(
        request("host2"), now=24
    ).granted  # renewed at 10: runs to 25


def test_disk_and_ips_are_keys_too():
    table = LeaseTable(7)
    assert table.handle(
        request("host1", disk="nbd://san/web1", ips=("10.0.0.1",)), now=0
    ).granted
    assert (
        "disk nbd://san/web1 is held by host1"
        in table.handle(
            request("host2", server_id="web2", disk="nbd://san/web1"), 1
        ).reason
    )
    assert (
        "IP 10.0.0.1 is held"
        in table.handle(
            request("host2", server_id="web3", ips=("10.0.0.9", "10.0.0.1")), 1
        ).reason
    )
    assert table.handle(
        request("host2", server_id="web4", disk="nbd://san/web4", ips=("10.0.0.9",)), 1
    ).granted


def test_a_lease_that_ran_out_names_its_host_until_it_releases():
    table = LeaseTable(7)
    table.handle(request("host1"), now=0)
    taken = table.handle(
        request("host2"), now=16
    )  # host1 went silent: its lease ran out
    assert taken.granted and taken.previous == (S.Holder(1, "host1"),)
    table.handle(
        request("host2", RELEASE), now=17
    )  # host2's start failed: host1 is still a suspect
    assert table.handle(request("host3"), now=18).previous == (S.Holder(1, "host1"),)
    # host3 started it, having cleared host1: its renewal clears the suspects
    assert table.handle(request("host3", RENEW), now=19).granted
    table.handle(request("host3", RELEASE), now=20)
    assert table.handle(request("host2"), now=21).previous == ()
    assert table.leases  # and a released key with no suspect is forgotten
    table.handle(request("host2", RELEASE), now=22)
    assert not table.leases


def test_a_fenced_holder_loses_its_live_lease_to_the_host_that_fenced_it():
    table = LeaseTable(7)
    table.handle(request("host1"), now=0)
    assert not table.handle(request("host2"), now=1).granted
    taken = table.handle(request("host2", cleared="host1"), now=2)
    assert taken.granted and taken.previous == ()
    # a second PE that cleared host1 too comes later: host2 holds it now
    late = table.handle(request("host3", cleared="host1"), now=3)
    assert not late.granted and late.holder == S.Holder(2, "host2")


def test_acquire_waits_out_a_fresh_voters_quiet_time_renewals_do_not():
    table = LeaseTable(7, quiet_until=60)
    assert "takes new holders in 50 s" in table.handle(request("host1"), now=10).reason
    assert table.handle(request("host2", RENEW), now=10).granted
    late = table.handle(
        request("host1"), now=61
    )  # host2's lease ran out at 25, unreleased
    assert late.granted and late.previous == (S.Holder(2, "host2"),)


def test_a_pool_with_a_secret_takes_only_signed_fresh_unreplayed_requests():
    table = LeaseTable(7, secrets={b"Xen": SECRET})
    unsigned = request("host1")
    assert (
        table.handle(unsigned, now=0, wall_ms=1000).reason
        == "not signed with the pool secret"
    )
    fresh = dataclasses.replace(unsigned, issued_ms=1000, nonce=5)
    fresh = dataclasses.replace(fresh, mac=S.lease_request_mac(SECRET, fresh))
    assert table.handle(fresh, now=0, wall_ms=2000).granted
    assert (
        table.handle(fresh, now=1, wall_ms=2000).reason
        == "a replay of a request already taken"
    )
    old = dataclasses.replace(unsigned, issued_ms=1000, nonce=6)
    old = dataclasses.replace(old, mac=S.lease_request_mac(SECRET, old))
    assert "more than 60 s" in table.handle(old, now=1, wall_ms=1000 + 61_000).reason
    altered = dataclasses.replace(fresh, host="host2")
    assert (
        table.handle(altered, now=1, wall_ms=2000).reason
        == "not signed with the pool secret"
    )


def test_a_voter_restarted_from_its_file_remembers_every_holder_and_suspect():
    table = LeaseTable(7, max_duration_s=30)
    table.handle(request("host1"), now=0)
    table.handle(request("host2", server_id="web2"), now=0)
    table.handle(
        request("host3", server_id="web2"), now=40
    )  # host2 became a suspect of web2
    assert table.changed
    saved = table.dump()
    restarted = LeaseTable(7, max_duration_s=30)
    restarted.load(saved, now=1000)
    # every lease counts as live for a whole maximal lease after the restart
    assert not restarted.handle(request("host9"), now=1029).granted
    assert restarted.handle(request("host9"), now=1031).previous == (
        S.Holder(1, "host1"),
    )
    assert restarted.handle(request("host9", server_id="web2"), now=1031).previous == (
        S.Holder(2, "host2"),
        S.Holder(3, "host3"),
    )


# ------------------------------------------------------------------ PEs and voters


class MemoryVoter:
    """A LeaseTable reached in memory (unit tests only); ``down``: answers nothing."""

    def __init__(self, table: LeaseTable, clock: Clock) -> None:
        self.table, self.clock, self.down = table, clock, False

    def ask(self, requests):
        if self.down:
            return defer.succeed([None] * len(requests))
        return defer.succeed(
            [self.table.handle(r, self.clock.seconds()) for r in requests]
        )


class SlowFencer:
    """A fence that takes as long as the test says: fires when ``finish()`` is called."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, defer.Deferred]] = []

    def fence(self, host, pe_identifier=0):
        d = defer.Deferred()
        self.pending.append((host, d))
        return d

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        for _host, d in pending:
            d.callback(None)


class Pool:
    """PEs host1..host3 with in-memory claims and voters; ``dead``: hosts that answer nothing."""

    def __init__(self, clock: Clock, voters: int = 3) -> None:
        self.clock = clock
        self.voters = [MemoryVoter(LeaseTable(100 + n), clock) for n in range(voters)]
        self.dead: set[str] = set()
        self.cut: set[frozenset[str]] = (
            set()
        )  # pairs of hosts that cannot reach each other
        self.fencer = SlowFencer()
        self.cores = {}
        for n in (1, 2, 3):
            settings = PeSettings(
                pe_identifier=n, host=f"host{n}", secret=SECRET, cookie_max_age_s=600
            )
            leases = VmLeases(
                list(self.voters),
                LeaseSettings(b"Xen", n, f"host{n}", SECRET, 15.0),
                clock,
            )
            core = PoolElementCore(
                settings,
                MemoryHypervisor(),
                HostAccounting(NODE),
                WeightedLoad(),
                clock,
                fencer=self.fencer,
                claims=self._asker(f"host{n}"),
                leases=leases,
            )
            self.cores[f"host{n}"] = core

    def _asker(self, me: str):
        pool = self

        class Asker:
            def ask(self, query, also=frozenset()):
                return defer.succeed(
                    [
                        core.answer_claim(query)
                        for host, core in pool.cores.items()
                        if host != me
                        and host not in pool.dead
                        and frozenset((me, host)) not in pool.cut
                    ]
                )

        return Asker()

    def running(self, name: str) -> list[str]:
        return [
            host
            for host, core in self.cores.items()
            if name in core.hypervisor.domains and host not in self.dead
        ]


def echo(core: PoolElementCore, cookie: bytes) -> Session:
    session = Session()
    core.handle(M.CookieEcho(cookie), session)
    return session


def cookie_on(host: str, pe: int, clock: Clock, server_id: str = "web1") -> bytes:
    return C.seal(
        C.SessionState(
            b"Xen", server_id, "", (), 64, 1, True, host, pe, clock.seconds()
        ),
        SECRET,
    )


@pytest.fixture
def clock():
    return Clock()


def test_two_pes_taking_over_at_once_across_a_slow_fence_start_the_vm_once(clock):
    """host3 ran web1 and died with its lease live; two sessions echo its cookie to
    host1 and host2 in the same instant, and host1 and host2 cannot ask each other (the
    claim query sees nothing). Both fence host3 (the fence takes 20 s, longer than a
    lease); exactly one gets the lease after it, starts, and the other refuses."""
    pool = Pool(clock)
    pool.cut.add(frozenset(("host1", "host2")))
    host3 = pool.cores["host3"]
    assert (
        host3.handle(S.CreateServer("web1", "", (), 64), first := Session())
        and first.results()[0].ok
    )
    pool.dead.add("host3")  # powered off... from the others' point of view: no answers
    cookie = cookie_on("host3", 3, clock)
    one, two = echo(pool.cores["host1"], cookie), echo(pool.cores["host2"], cookie)
    assert [host for host, _ in pool.fencer.pending] == ["host3", "host3"]
    clock.advance(20)
    pool.fencer.finish()
    results = sorted((one.results() + two.results()), key=lambda r: r.ok)
    assert [r.ok for r in results] == [False, True]
    assert (
        results[0].code == S.ResultCode.ALREADY_RUNNING
        and "is held by" in results[0].reason
    )
    assert pool.running("web1") == [
        next(h for h, s in (("host1", one), ("host2", two)) if s.results()[0].ok)
    ]


def test_a_start_whose_lease_ran_out_during_its_fence_gives_way(clock):
    """host1 takes the lease (host3's ran out) and fences host3 for longer than a lease;
    meanwhile host2 takes the lease over and sees host1 starting it: it refuses, and host1,
    confirming its lease just before the start, goes on alone."""
    pool = Pool(clock)
    pool.cores["host3"].handle(S.CreateServer("web1", "", (), 64), Session())
    pool.dead.add("host3")
    clock.advance(16)  # host3's lease ran out
    cookie = cookie_on("host3", 3, clock)
    one = echo(pool.cores["host1"], cookie)
    assert [host for host, _ in pool.fencer.pending] == ["host3"]
    clock.advance(16)  # host1's lease runs out while its fence goes on
    two = echo(pool.cores["host2"], cookie)
    assert (
        two.results()[0].code == S.ResultCode.ALREADY_RUNNING
        and "host1 (PE 0x00000001, which is starting it)" in two.results()[0].reason
    )
    pool.fencer.finish()
    assert one.results()[0].ok
    assert pool.running("web1") == ["host1"]


def test_no_start_without_a_majority_of_voters(clock):
    pool = Pool(clock)
    pool.voters[0].down = pool.voters[1].down = True
    session = Session()
    pool.cores["host1"].handle(S.CreateServer("web1", "", (), 64), session)
    result = session.results()[0]
    assert (
        result.code == S.ResultCode.UNSPECIFIED
        and "1 of 3 voters granted the lease, 2 needed" in result.reason
    )
    assert pool.running("web1") == []
    pool.voters[1].down = False  # one voter back: a majority again
    session = Session()
    pool.cores["host1"].handle(S.CreateServer("web1", "", (), 64), session)
    assert session.results()[0].ok


def test_a_host_that_answers_is_not_fenced_even_when_its_pu_lost_it(clock):
    """Only the keeper's path to host3 is cut: host3 answers the other PEs and holds the
    lease, so the PE the keeper asks next refuses instead of fencing a healthy host."""
    pool = Pool(clock)
    pool.cores["host3"].handle(S.CreateServer("web1", "", (), 64), Session())
    session = echo(pool.cores["host1"], cookie_on("host3", 3, clock))
    result = session.results()[0]
    assert (
        result.code == S.ResultCode.ALREADY_RUNNING
        and "web1 runs on host3" in result.reason
    )
    assert "only the PU's path to it is cut" in result.reason
    assert pool.fencer.pending == [] and pool.running("web1") == ["host3"]


def test_a_suspect_that_answers_without_the_vm_is_not_fenced(clock):
    """host2's lease on web1 ran out without a release (it was cut off from the voters),
    but it answers that it does not run web1: host1 starts it without fencing anyone."""
    pool = Pool(clock)
    host2 = pool.cores["host2"]
    host2.leases.acquire(S.CreateServer("web1", "", (), 64))  # its start never happened
    clock.advance(16)
    session = Session()
    pool.cores["host1"].handle(S.CreateServer("web1", "", (), 64), session)
    assert session.results()[0].ok and pool.fencer.pending == []


def test_a_suspect_that_does_not_answer_is_fenced_before_the_start(clock):
    pool = Pool(clock)
    pool.cores["host2"].handle(S.CreateServer("web1", "", (), 64), Session())
    pool.dead.add("host2")
    pool.cores["host2"].leases.stop()
    clock.advance(16)  # its renewals stopped with it
    session = Session()
    pool.cores["host1"].handle(
        S.CreateServer("web1", "", (), 64), session
    )  # no cookie: the voters know
    assert session.results() == [] and [h for h, _ in pool.fencer.pending] == ["host2"]
    pool.fencer.finish()
    assert session.results()[0].ok and pool.running("web1") == ["host1"]


def test_leases_are_renewed_while_the_vm_runs_and_released_when_it_stops(clock):
    pool = Pool(clock)
    core = pool.cores["host1"]
    core.leases.start()
    session = Session()
    core.handle(S.CreateServer("web1", "", (), 64), session)
    for _ in range(6):  # 30 s: twice the lease, renewed every 5 s
        clock.advance(5)
    assert (
        not pool.cores["host2"]
        .leases.acquire(S.CreateServer("web1", "", (), 64))
        .result.granted
    )
    core.handle(S.StopServer("web1"), session)
    assert "web1" not in core.leases.held
    taken = (
        pool.cores["host2"].leases.acquire(S.CreateServer("web1", "", (), 64)).result
    )
    assert (
        taken.granted and taken.previous == frozenset()
    )  # released: host1 is no suspect
    core.leases.stop()


def test_a_refused_start_gives_its_lease_back(clock):
    pool = Pool(clock)
    core = pool.cores["host1"]
    session = Session()
    core.handle(
        S.CreateServer("web1", "", (), 5000), session
    )  # more RAM than the host has
    assert session.results()[0].code == S.ResultCode.NO_RAM
    assert "web1" not in core.leases.held
    other = Session()
    pool.cores["host2"].handle(S.CreateServer("web1", "", (), 64), other)
    assert other.results()[0].ok and pool.fencer.pending == []


# ------------------------------------------------------------------ a real registrar


@pytest.mark.slow
def test_a_registrar_votes_on_its_asap_port_and_remembers_its_leases_across_kill_9(
    tmp_path,
):
    """Lease requests share the ASAP port (the shim's first byte tells them apart); ASAP
    goes on as before on other connections, garbage gets an answer naming the field, and
    a registrar killed with -9 and restarted still refuses the VM to a second host."""
    from xenpool.protocol import framing

    from .daemons import AsapClient, Daemon, SessionClient, free_port

    asap = free_port()
    argv = (
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--state-dir={tmp_path / 'state'}",
    )
    registrar = Daemon(*argv, ready="started", cwd=tmp_path)
    try:
        voter = SessionClient(asap)
        voter.send(request("host1", ips=("10.0.0.1",)))
        assert voter.receive().granted
        voter.send_raw(
            framing.shim_frame(S.XENPOOL_PPID, b"\x50\x00\x00\x09\x00\x01\x00\x00\x00")
        )
        bad = voter.receive()
        assert not bad.granted and "pe_identifier" in bad.reason
        voter.send(request("host2"))
        assert voter.receive().holder == S.Holder(1, "host1")
        voter.close()
        client = AsapClient(asap)  # ASAP itself is untouched
        assert isinstance(
            client.request(M.HandleResolution(b"Xen", 8)), M.HandleResolutionResponse
        )
        client.close()
        registrar.proc.kill()
        registrar.proc.wait()
        registrar = Daemon(*argv, ready="2 VM leases read from", cwd=tmp_path)
        voter = SessionClient(asap)
        voter.send(request("host2", server_id="web2", ips=("10.0.0.1",)))
        refused = voter.receive()
        assert not refused.granted and "IP 10.0.0.1 is held by host1" in refused.reason
        voter.close()
    finally:
        registrar.stop()


def test_a_live_lease_of_a_host_that_answers_without_the_vm_is_taken_over(clock):
    """host2 restarted (or its release was lost): the voters still count its lease as
    live, but host2 answers that it runs no web1. host1 takes the lease over, asks host2
    once more after holding it, and starts web1 without fencing anyone."""
    pool = Pool(clock)
    pool.cores["host2"].leases.acquire(
        S.CreateServer("web1", "", (), 64)
    )  # a lease, no VM
    session = Session()
    pool.cores["host1"].handle(S.CreateServer("web1", "", (), 64), session)
    assert (
        session.results()[0].ok
        and pool.fencer.pending == []
        and pool.running("web1") == ["host1"]
    )
    # host2 can no longer start it on its stale lease: its confirmation is refused
    assert (
        not pool.cores["host2"]
        .leases.confirm(S.CreateServer("web1", "", (), 64))
        .result.granted
    )


def test_a_live_lease_of_a_silent_host_the_pu_did_not_lose_is_not_fenced(clock):
    pool = Pool(clock)
    pool.cores["host2"].handle(S.CreateServer("web1", "", (), 64), Session())
    pool.dead.add(
        "host2"
    )  # silent, but the keeper's cookie names no one: no reason to fence it
    session = Session()
    pool.cores["host1"].handle(S.CreateServer("web1", "", (), 64), session)
    result = session.results()[0]
    assert (
        result.code == S.ResultCode.ALREADY_RUNNING
        and "host2 does not answer" in result.reason
    )
    assert pool.fencer.pending == []
