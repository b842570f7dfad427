"""The pool user's keep-and-fail-over logic on a Clock, with scripted PEs."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.pu.core import LOST, PuSettings, State, VmKeeper
from xenpool.testing import ScriptedPE, element
from xenpool.testing import ScriptedPool as Pool

from .helpers import REQUEST, RedirectingPE, cookie_naming, keeper, sealed


def test_create_then_heartbeat(clock):
    pe = ScriptedPE(1)
    k = keeper(clock, Pool(clock, pe))
    k.run()
    assert k.state == State.RUNNING and k.cookie == b"cookie from 1"
    assert pe.received[0] == REQUEST
    clock.advance(1)
    clock.advance(1)
    assert [m for m in pe.received if isinstance(m, S.CheckRunning)] == [
        S.CheckRunning("web1", 1)
    ] * 3


def test_a_lost_pe_fails_over_with_the_last_cookie(clock):
    first, second = ScriptedPE(1), ScriptedPE(2)
    pool = Pool(clock, first, second)
    k = keeper(clock, pool)
    k.run()
    clock.advance(0.5)
    pool.down.add(1)
    first.die()
    assert k.state == State.RUNNING and k.pe.identifier == 2
    assert second.received[0] == M.CookieEcho(b"cookie from 1")
    assert pool.unreachable == [1] and k.failovers == 1 and k.last_failover_s == 0


def test_a_silent_pe_is_lost_after_the_heartbeat_timeout(clock):
    first, second = ScriptedPE(1), ScriptedPE(2)
    pool = Pool(clock, first, second)
    k = keeper(clock, pool, heartbeat_interval_s=1, heartbeat_timeout_s=3)
    k.run()
    first.silent = True  # SIGSTOP: no reset, no answers (last answer at 0)
    clock.advance(1)  # the next heartbeat goes out, unanswered
    clock.advance(1.9)
    assert k.pe.identifier == 1
    clock.advance(0.1)  # 3 s after the PE was last heard
    assert k.pe.identifier == 2 and k.state == State.RUNNING and first.closed
    assert k.last_failover_s == 0  # measured from the moment the loss was seen


def test_refusals_try_the_next_pe_then_back_off(clock):
    full, also_full = (
        ScriptedPE(1, refuse=S.ResultCode.NO_RAM),
        ScriptedPE(2, refuse=S.ResultCode.NO_RAM),
    )
    pool = Pool(clock, full, also_full)
    k = keeper(clock, pool, retry_initial_s=1)
    k.run()
    assert (
        k.state == State.WAITING
        and "refused: code 11" in k.history[-1][1]
        and "retrying in 1.0 s" in k.history[-1][1]
    )
    also_full.refuse = None
    clock.advance(1)
    assert k.state == State.RUNNING and k.pe.identifier == 2


def test_already_running_elsewhere_is_final(clock):
    k = keeper(clock, Pool(clock, ScriptedPE(1, refuse=S.ResultCode.ALREADY_RUNNING)))
    done = k.run()
    assert k.state == State.REFUSED and done.called


def test_no_pe_at_all_backs_off_exponentially(clock):
    pool = Pool(clock)
    k = keeper(clock, pool, retry_initial_s=0.5, retry_max_s=2)
    k.run()
    waits = []
    for _ in range(5):
        waits.append(k.history[-1][1].split("retrying in ")[1])
        clock.advance(2)
    assert waits[:4] == ["0.5 s", "1.0 s", "2.0 s", "2.0 s"]
    assert "the pool has no PE" in k.history[-1][1]


def test_stop_asks_the_pe_to_stop_the_vm(clock):
    pe = ScriptedPE(1)
    k = keeper(clock, Pool(clock, pe))
    k.run()
    done = k.stop()
    clock.advance(1)
    assert (
        S.StopServer("web1") in pe.received
        and done.called
        and k.state == State.STOPPED
        and pe.closed
    )


def test_with_a_saved_cookie_it_goes_back_to_the_pe_named_in_it(clock):
    from xenpool.protocol import cookie as C

    state = C.SessionState(b"Xen", "web1", "", (), 300, 1, True, "pe2", 2, 0.0)
    first, second = ScriptedPE(1), ScriptedPE(2)
    k = keeper(clock, Pool(clock, first, second))
    k.cookie = C.seal(state, b"whatever secret")
    k.run()
    assert k.pe.identifier == 2 and first.received == []
    assert isinstance(second.received[0], M.CookieEcho)


def test_after_a_glitch_the_pu_goes_back_to_the_old_pe_that_still_holds_the_vm(clock):
    """The PU lost its session, but its PE is alive and keeps the VM: another PE says
    "already running there" (13), which is not final for a VM this PU ran; after the
    back-off the PU returns to the PE named in its cookie."""
    from xenpool.protocol import cookie as C

    state = C.SessionState(b"Xen", "web1", "", (), 300, 1, True, "pe1", 1, 0.0)
    holder, other = ScriptedPE(1), ScriptedPE(2, refuse=S.ResultCode.ALREADY_RUNNING)
    pool = Pool(clock, holder, other)
    k = keeper(clock, pool, retry_initial_s=1)
    k.cookie = C.seal(state, b"secret")
    k.run()  # goes to PE 1 first: it is the cookie's home
    assert k.pe.identifier == 1 and k.state == State.RUNNING
    holder.die()  # the session breaks, PE 1 stays up
    assert k.state == State.WAITING  # PE 2 answered 13: not final
    clock.advance(1)
    assert k.state == State.RUNNING and k.pe.identifier == 1


class SlowPE(ScriptedPE):
    """Answers a start only when the test says so."""

    def send(self, message) -> None:
        if isinstance(message, (S.CreateServer, M.CookieEcho)):
            self.received.append(message)
            self.start_deliver = self.deliver
            return
        super().send(message)

    def answer_start(self) -> None:
        self.start_deliver(M.Cookie(f"cookie from {self.identifier}".encode()))
        self.start_deliver(
            S.CreateResult("web1", 0, 1000, f"started on pe{self.identifier}")
        )


def test_a_refused_sessions_late_loss_does_not_end_the_next_session(clock):
    """Over TCP a refused session's connectionLost arrives after the keeper closed it,
    while it is already starting the VM on the next PE: it must not be read as that PE's
    answer (the keeper would drop a VM that PE has just started and ask a third one)."""
    full, starter, third = (
        ScriptedPE(1, refuse=S.ResultCode.NO_RAM),
        SlowPE(2),
        ScriptedPE(3),
    )
    pool = Pool(clock, full, starter, third)
    k = keeper(clock, pool)
    k.run()
    stale_deliver = full.deliver
    assert k.state == State.STARTING and k.pe.identifier == 2
    stale_deliver(LOST)  # the refused session's connectionLost, late
    starter.answer_start()
    assert k.state == State.RUNNING and k.pe.identifier == 2 and third.received == []
    clock.advance(0.5)
    stale_deliver(LOST)  # again, between two heartbeats of the running session
    clock.advance(5)
    assert k.state == State.RUNNING and k.pe.identifier == 2 and not starter.closed
    assert pool.unreachable == [] and third.received == [] and k.failovers == 0


class TcpLikePE(ScriptedPE):
    """Its session's connectionLost comes a moment after the keeper closed it, as over TCP."""

    def __init__(self, clock: Clock, identifier: int, **kwargs) -> None:
        super().__init__(identifier, **kwargs)
        self.clock = clock

    def close(self) -> None:
        super().close()
        if (
            len(self.received) < 100
        ):  # a keeper that never waits fails the test, not hangs it
            self.clock.callLater(0, self.deliver, LOST)


def start_times(pe: ScriptedPE) -> list[float]:
    return [
        at
        for at, message in pe.timed
        if isinstance(message, (S.CreateServer, M.CookieEcho))
    ]


def timed(clock: Clock, pe: ScriptedPE) -> ScriptedPE:
    """Record when each message reached ``pe``."""
    pe.timed = []
    send = pe.send

    def timed_send(message) -> None:
        pe.timed.append((clock.seconds(), message))
        send(message)

    pe.send = timed_send
    return pe


def test_the_back_off_waits_although_refused_sessions_end_late(clock):
    """A refused session's late connectionLost cut the back-off short: the keeper retried
    thousands of times a second while saying "retrying in 30.0 s"."""
    pes = [
        timed(clock, TcpLikePE(clock, i, refuse=S.ResultCode.NO_RAM)) for i in (1, 2)
    ]
    k = keeper(clock, Pool(clock, *pes), retry_initial_s=1, retry_max_s=4)
    k.run()
    for _ in range(20):
        clock.advance(0.5)
    for pe in pes:  # one round per back-off period: 1, 2, 4, then 4 s
        assert start_times(pe) == pytest.approx([0, 1, 3, 7])
    assert k.state == State.WAITING and k.history[-1][1].endswith("retrying in 4.0 s")


def test_the_back_off_has_jitter_and_its_cap(clock):
    draws = iter([1.0, 0.5, 0.0, 1.0, 1.0])
    pe = timed(clock, ScriptedPE(1, refuse=S.ResultCode.NO_RAM))
    k = keeper(
        clock,
        Pool(clock, pe),
        rng=lambda: next(draws, 1.0),
        retry_initial_s=2,
        retry_max_s=8,
        retry_jitter=0.5,
    )
    k.run()
    for _ in range(60):
        clock.advance(0.5)
    # back-offs 2, 4, 8, 8, ..., each shortened by jitter * draw (then 1.0 draws)
    assert start_times(pe) == pytest.approx([0, 1, 4, 12, 16, 20, 24, 28])
    waits = [
        why.split("retrying in ")[1]
        for state, why in k.history
        if state == State.WAITING
    ]
    assert waits[:5] == ["1.0 s", "3.0 s", "8.0 s", "4.0 s", "4.0 s"]


def test_the_waiting_message_names_every_pes_reason(clock):
    """With more than one PE the keeper said "PE ... gave no answer" while one PE had
    refused with code 12 and a clear reason."""
    no_disk = TcpLikePE(clock, 1, refuse=S.ResultCode.DISK_UNREACHABLE)
    no_disk.reason = "disk unreachable: nbd://san:10809/web1: connection refused"
    pool = Pool(clock, no_disk, ScriptedPE(2), ScriptedPE(3, silent=True))
    pool.down.add(2)
    pool.resolve = lambda *args, **kwargs: defer.succeed(
        [element(1), element(2), element(3)]
    )
    k = keeper(clock, pool, create_timeout_s=10)
    k.run()
    clock.advance(10)
    assert k.state == State.WAITING
    assert k.history[-1][1] == (
        "PE 0x00000001 refused: code 12, disk unreachable: nbd://san:10809/web1: connection refused; "
        "PE 0x00000002 unreachable: refused; PE 0x00000003 gave no answer in 10 s; retrying in 0.5 s"
    )


def test_the_create_command_prints_each_pes_refusal(clock, capsys):
    from xenpool.pu import cli

    no_ram, no_disk = (
        ScriptedPE(1, refuse=S.ResultCode.NO_RAM),
        TcpLikePE(clock, 2, refuse=S.ResultCode.DISK_UNREACHABLE),
    )
    no_ram.reason, no_disk.reason = (
        "needs 300 MB, 120 MB free",
        "disk unreachable: nbd://san:10809/web1",
    )
    k = keeper(clock, Pool(clock, no_ram, no_disk))
    k.events.on_state = cli.show
    k.run()
    clock.advance(0)
    waiting = capsys.readouterr().out.splitlines()[-1]
    assert waiting.endswith(
        "web1: waiting: PE 0x00000001 refused: code 11, needs 300 MB, 120 MB free; "
        "PE 0x00000002 refused: code 12, disk unreachable: nbd://san:10809/web1; retrying in 0.5 s"
    )


class SealingPE(ScriptedPE):
    """Sends real cookies as a PE does: one (not running) when a start begins, before it
    may refuse, one (running) once the VM runs."""

    def send(self, message) -> None:
        if (
            isinstance(message, (S.CreateServer, M.CookieEcho))
            and not self.silent
            and self.deliver is not None
        ):
            self.received.append(message)
            self.deliver(M.Cookie(sealed(self.identifier, False)))
            if self.refuse is not None:
                self.deliver(S.CreateResult("web1", self.refuse, 0, "no"))
                return
            self.deliver(M.Cookie(sealed(self.identifier, True)))
            self.deliver(
                S.CreateResult("web1", 0, 1000, f"started on pe{self.identifier}")
            )
            return
        super().send(message)


def test_a_refusing_pes_cookie_does_not_replace_the_holders(clock):
    """PE 2 sends its cookie, then refuses with 13 (the VM runs on PE 1): the keeper must
    keep PE 1's cookie and go back there, not to PE 2 forever."""
    holder, other = SealingPE(1), SealingPE(2, refuse=S.ResultCode.ALREADY_RUNNING)
    k = keeper(clock, Pool(clock, holder, other), retry_initial_s=1)
    saved = []
    k.events.on_cookie = lambda kp, cookie: saved.append(cookie)
    k.run()
    assert k.state == State.RUNNING and k.cookie == sealed(1, True)
    holder.die()  # the session breaks; PE 1 lives on and holds the VM
    assert k.state == State.WAITING and len(other.received) == 1
    assert k.cookie == sealed(1, True)
    clock.advance(1)
    assert (
        k.state == State.RUNNING and k.pe.identifier == 1 and len(other.received) == 1
    )
    assert holder.received[-2] == M.CookieEcho(sealed(1, True))
    assert sealed(2, False) not in saved and saved[-1] == sealed(1, True)


def test_a_running_cookie_is_kept_even_when_the_session_then_breaks(clock):
    """PE 2 said "running" (it fenced PE 1 and started the VM), then vanished before its
    answer: PE 2 is the one to fence next, so its cookie is the one to echo."""
    first, second, third = SealingPE(1), ScriptedPE(2), ScriptedPE(3)
    pool = Pool(clock, first, second, third)
    k = keeper(clock, pool)
    saved = []
    k.events.on_cookie = lambda kp, cookie: saved.append(cookie)
    k.run()
    pool.down.add(1)

    def starts_then_vanishes(message) -> None:
        second.received.append(message)
        if isinstance(message, M.CookieEcho):
            second.deliver(M.Cookie(sealed(2, True)))
            pool.down.add(2)
            second.die()

    second.send = starts_then_vanishes
    first.die()
    assert k.state == State.RUNNING and k.pe.identifier == 3
    assert (
        third.received[0] == M.CookieEcho(sealed(2, True)) and sealed(2, True) in saved
    )


class CookieRefusingPE(ScriptedPE):
    """Refuses every cookie echo with 14, as a PE does a cookie it cannot verify."""

    def send(self, message) -> None:
        if isinstance(message, M.CookieEcho):
            self.received.append(message)
            self.deliver(
                S.CreateResult(
                    "",
                    S.ResultCode.COOKIE_REJECTED,
                    0,
                    f"{len(message.cookie)} bytes is not a xenpool cookie",
                )
            )
            return
        super().send(message)


def test_a_refused_cookie_is_dropped_and_a_plain_request_sent(clock):
    pe = CookieRefusingPE(1)
    k = keeper(clock, Pool(clock, pe))
    k.cookie = b"broken"
    k.run()
    assert pe.received[:2] == [M.CookieEcho(b"broken"), REQUEST]
    assert k.state == State.RUNNING and k.cookie == b"cookie from 1"


class TrackedChannel:
    """One connection to a scripted PE, so that a test sees which are still open."""

    def __init__(self, pool: OneSessionPool, pe: ScriptedPE) -> None:
        self.pool, self.pe, self.closed = pool, pe, False

    def send(self, message) -> None:
        assert not self.closed, f"sent {message} on a closed channel"
        self.pe.send(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.open.remove(self)
            self.pe.close()


class OneSessionPool(Pool):
    """Records the most sessions ever open at once; ``hold`` keeps connects pending."""

    def __init__(self, clock: Clock, *pes: ScriptedPE) -> None:
        super().__init__(clock, *pes)
        self.open: list[TrackedChannel] = []
        self.most_open = 0
        self.hold: list[defer.Deferred] | None = None

    def connect(self, element, deliver):
        d = super().connect(element, deliver)

        def connected(pe):
            channel = TrackedChannel(self, pe)
            self.open.append(channel)
            self.most_open = max(self.most_open, len(self.open))
            return channel

        d.addCallback(connected)
        if self.hold is not None:
            held = defer.Deferred()
            self.hold.append(held)
            return held.addCallback(lambda _: d)
        return d


def test_a_planned_move_ends_the_session_before_the_next_opens(clock):
    first, second = ScriptedPE(1), ScriptedPE(2)
    pool = OneSessionPool(clock, first, second)
    k = keeper(clock, pool)
    k.run()
    first.deliver(
        S.StopResult("web1", S.ResultCode.MOVED, "planned", target_pe=2)
    )  # and PE 1 keeps the connection
    clock.advance(1)
    assert k.pe.identifier == 2 and k.state == State.RUNNING
    assert pool.most_open == 1 and first.closed


def test_refusals_and_a_create_timeout_never_overlap_sessions(clock):
    silent, full, good = (
        ScriptedPE(1, silent=True),
        ScriptedPE(2, refuse=S.ResultCode.NO_RAM),
        ScriptedPE(3),
    )
    pool = OneSessionPool(clock, silent, full, good)
    k = keeper(clock, pool, create_timeout_s=5)
    k.run()
    clock.advance(5)
    assert k.pe.identifier == 3 and k.state == State.RUNNING
    assert pool.most_open == 1 and silent.closed and full.closed


@pytest.mark.parametrize("how", ["leave", "stop"])
def test_leaving_or_stopping_while_connecting_closes_that_session(clock, how):
    pe = ScriptedPE(1)
    pool = OneSessionPool(clock, pe)
    pool.hold = []
    k = keeper(clock, pool)
    done = k.run()
    getattr(k, how)()
    pool.hold[0].callback(None)  # the connection comes up after all
    assert pe.received == [] and pool.open == [] and done.called
    assert k.state == (State.LEFT if how == "leave" else State.STOPPED)


def test_leaving_a_running_vm_reports_no_one_unreachable(clock):
    pe = ScriptedPE(1)
    pool = OneSessionPool(clock, pe)
    k = keeper(clock, pool)
    done = k.run()
    clock.advance(0.5)
    k.leave()
    assert (
        done.called
        and k.state == State.LEFT
        and pool.open == []
        and pool.unreachable == []
    )
    assert not any(isinstance(m, S.StopServer) for m in pe.received)


def test_a_second_run_is_refused(clock):
    k = keeper(clock, Pool(clock, ScriptedPE(1)))
    k.run()
    with pytest.raises(RuntimeError):
        k.run()


def test_stopping_while_resolving_opens_no_session(clock):
    pe = ScriptedPE(1)
    pool = OneSessionPool(clock, pe)
    answer = defer.Deferred()
    pool.resolve = lambda *args, **kwargs: answer
    k = keeper(clock, pool)
    done = k.run()
    k.stop()
    answer.callback([element(1)])
    assert (
        done.called
        and k.state == State.STOPPED
        and pool.most_open == 0
        and pe.received == []
    )


def test_a_new_vm_refused_with_a_cookie_naming_the_holder_is_still_refused_for_good(
    clock,
):
    k = keeper(clock, Pool(clock, RedirectingPE(1, holder=2)))
    done = k.run()
    assert (
        done.called
        and k.state == State.REFUSED
        and "web1 runs on host2" in k._last_reason
    )


def test_a_keeper_that_lost_its_cookie_follows_the_cookie_to_the_holder(clock):
    """Its state file was corrupt: the PE it asks first refuses, naming the host that kept
    the VM running; the keeper goes there next (first, by the cookie) and keeps it."""
    holder = ScriptedPE(2)
    pool = Pool(clock, RedirectingPE(1, holder=2), holder)
    k = VmKeeper(REQUEST, pool, clock, PuSettings(), rng=lambda: 0.0, ran_before=True)
    k.run()
    for _ in range(10):
        clock.advance(1)
    assert k.state == State.RUNNING and k.pe.identifier == 2
    assert holder.received[0] == M.CookieEcho(cookie_naming(2))


def test_a_failed_fence_ends_the_round(clock):
    """Every other PE would fence the same host: after code 15 the PU waits its back-off
    instead of making the next PE run the same failing fence."""
    first, second = (
        ScriptedPE(1, refuse=S.ResultCode.FENCE_FAILED),
        ScriptedPE(2, refuse=S.ResultCode.FENCE_FAILED),
    )
    k = keeper(clock, Pool(clock, first, second))
    k.run()
    assert (
        len(first.received) == 1 and second.received == [] and k.state == State.WAITING
    )
    clock.advance(0.5)
    assert (
        len(first.received) == 1 and len(second.received) == 1
    )  # another PE's fencing may work
    clock.advance(1.0)
    assert len(first.received) == 2 and len(second.received) == 1
