"""A pool user keeping one VM available: create, heartbeat, fail over. No sockets here.

The I/O is a small interface (``PoolAccess``): resolve the pool handle, open a session
with a PE, report a PE unreachable. Time comes from an injected IReactorTime, so tests
drive every timer with a Clock.

Failover: when the session with the PE is lost (closed, or no heartbeat answer within
``heartbeat_timeout_s``), the PU reports the PE unreachable, resolves the pool again and
echoes the last cookie to the next PE, which fences the old host first when the cookie
says the VM may be running. With no PE able to take it, it retries with backoff.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet import defer, task
from twisted.internet.defer import DeferredQueue
from twisted.logger import Logger

from ..asap_client import LOST
from ..interfaces import state_name
from ..logs import hex_id
from ..protocol import cookie as C
from ..protocol import messages as M
from ..protocol import params as P
from ..protocol import session as S

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger()


@dataclass(frozen=True)
class PuSettings:
    pool_handle: bytes = b"Xen"
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 3.0
    create_timeout_s: float = 120.0  # a start may include a fence and a boot
    retry_initial_s: float = (
        0.5  # the first back-off after a round of refusals; doubles up to retry_max_s
    )
    retry_max_s: float = 30.0
    # Each wait is shortened by up to this share of the back-off, at random, so keepers
    # refused together do not come back together.
    retry_jitter: float = 0.5
    resolution_items: int = 8
    connect_timeout_s: float = (
        2.0  # a PE not connected within this is skipped (for the PoolAccess)
    )


class Channel(Protocol):
    """One session with a PE; incoming messages go to the ``deliver`` callback given at
    connect time, then LOST when it ends."""

    def send(self, message: object) -> None: ...

    def close(self) -> None: ...


class PoolAccess(Protocol):
    def resolve(
        self, pool_handle: bytes, items: int, ram_mb: int | None = None
    ) -> defer.Deferred:
        """-> list[PoolElement]; ``ram_mb``: what the VM needs, for pools whose policy fits it."""

    def connect(
        self, element: P.PoolElement, deliver: Callable[[object], None]
    ) -> defer.Deferred: ...  # -> Channel

    def report_unreachable(self, pool_handle: bytes, identifier: int) -> None: ...


class _Session:
    """One session with one PE, with its own queue: whatever its channel delivers after the
    session ended (a refused session's late connectionLost, say) is dropped, so it can never
    be read as the next session's answer."""

    def __init__(self) -> None:
        self.queue: DeferredQueue[object] = DeferredQueue()
        self.channel: Channel | None = None
        self.ended = False
        self.heartbeat_pause: defer.Deferred | None = None
        self.started = False  # the PE confirmed the start
        self.pending_cookie: bytes | None = (
            None  # from before that: kept only if the start succeeds
        )

    def deliver(self, message: object) -> None:
        if self.ended:
            return
        self.queue.put(message)
        if message is LOST and self.heartbeat_pause is not None:
            self.heartbeat_pause.cancel()  # between heartbeats: fail over now, not at the next one

    def attach(self, channel: Channel) -> None:
        self.channel = channel
        if self.ended:  # interrupted while connecting
            channel.close()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.channel is not None:
                self.channel.close()

    def interrupt(self) -> None:
        """End it from outside, then wake whoever waits on it (LOST): only after the
        channel is closed, so the waiter cannot open the next session while this one is."""
        if not self.ended:
            self.end()
            self.queue.put(LOST)
            if self.heartbeat_pause is not None:
                self.heartbeat_pause.cancel()


class State(enum.Enum):
    RESOLVING = "resolving"
    STARTING = "starting"
    RUNNING = "running"
    FAILING_OVER = "failing over"
    WAITING = "waiting"  # no PE could take it; retrying
    STOPPING = "stopping"
    STOPPED = "stopped"
    LEFT = "left running"  # the keeper went away; the PE keeps the VM for its lease
    REFUSED = "refused"  # a final refusal (e.g. it runs elsewhere already)


FINAL_CODES = {
    S.ResultCode.ALREADY_RUNNING,
    S.ResultCode.INVALID_REQUEST,
    S.ResultCode.NOT_AUTHORIZED,  # every PE of the pool has the same --pu-access
}


@dataclass
class Events:
    """What happened, for the CLI, the keeper's table and the tests."""

    on_state: Callable[[VmKeeper, State, str], None] = lambda keeper, state, why: None
    on_cookie: Callable[[VmKeeper, bytes], None] = lambda keeper, cookie: None


@dataclass(eq=False)
class VmKeeper:
    request: S.CreateServer
    access: PoolAccess
    clock: IReactorTime
    settings: PuSettings = field(default_factory=PuSettings)
    events: Events = field(default_factory=Events)
    cookie: bytes | None = None  # the last cookie from a PE
    pe: P.PoolElement | None = None
    state: State = State.RESOLVING
    domain_state: int | None = None
    lost_at: float | None = None  # when the last PE was lost
    last_failover_s: float | None = None
    failovers: int = 0
    moves: int = 0  # planned moves by a rebalancing PE
    running_since: float | None = None  # when the PE last confirmed a start
    rng: Callable[[], float] = field(
        default=random.random, repr=False
    )  # uniform in [0, 1): the back-off's jitter
    # The VM is this PU's (it ran it, had a cookie, perhaps one no PE accepts, or it is in a
    # keeper's keep file): "already running" then means a PE may still hold it for this PU,
    # not that someone else's VM has the name.
    ran_before: bool = False

    def __post_init__(self) -> None:
        self._session: _Session | None = None
        self._stop_requested = False
        self._leaving = False
        self._backoff_pause: defer.Deferred | None = None
        self._move_target = 0  # the PE a planned move sends the VM to (0: none)

    @property
    def server_id(self) -> str:
        return self.request.server_id

    def _set(self, state: State, why: str = "") -> None:
        self.state = state
        self.events.on_state(self, state, why)

    # ------------------------------------------------------------------ running

    def run(self) -> defer.Deferred:
        """Keep the VM until stop(); fires with the final State."""
        if getattr(self, "_running", None) is not None and not self._running.called:
            raise RuntimeError(
                f"{self.server_id} is kept already"
            )  # two runs: two sessions for one VM
        if self.cookie is not None:
            self.ran_before = (
                True  # a cookie saved by an earlier run: the VM is this keeper's
            )
        self._running: defer.Deferred = defer.Deferred.fromCoroutine(self._run())
        return self._running

    async def _run(self) -> State:
        """Rounds of start attempts (each PE the pool names at most once), a back-off
        after each round no PE took; only a VM that ran and was lost (or moved) is
        tried again at once."""
        backoff = self.settings.retry_initial_s
        failed: set[int] = set()
        while not self._stop_requested:
            self._set(
                State.RESOLVING if self.lost_at is None else State.FAILING_OVER,
                "asking the pool for a PE",
            )
            try:
                elements = await self.access.resolve(
                    self.settings.pool_handle,
                    self.settings.resolution_items,
                    ram_mb=self.request.ram_mb,
                )
            except Exception as err:
                reasons = [f"no registrar answered: {err}"]
                elements = []
            else:
                reasons = [] if elements else ["the pool has no PE"]
            candidates = [e for e in elements if e.identifier not in failed] or elements
            home = self._cookie_home()
            if home is not None:
                # Back to the PE that ran it first: it may still hold it (re-adoption);
                # any other PE would have to fence that one.
                candidates.sort(key=lambda e: e.identifier != home)
            if self._move_target:
                # A planned move names its target: there first, if the pool still has
                # it; should it refuse, the others follow in the policy's order.
                candidates.sort(key=lambda e: e.identifier != self._move_target)
                self._move_target = 0
            retry_now, fence_failed = False, set()
            for element in candidates:
                if (
                    self._stop_requested
                ):  # stop() or leave() while resolving or between PEs
                    break
                outcome = await self._session_with(element)
                if (
                    outcome == S.ResultCode.COOKIE_REJECTED
                    and self.cookie is not None
                    and not self._stop_requested
                ):
                    # Echoed forever, a cookie no PE accepts would keep the VM down. The
                    # PEs' pool-wide uniqueness check keeps a plain request from a second start.
                    reasons.append(self._last_reason)
                    self._drop_cookie()
                    outcome = await self._session_with(element)
                if outcome is None:  # the session ended after the VM ran: fail over now
                    failed = {element.identifier}
                    backoff = self.settings.retry_initial_s
                    retry_now = True
                    break
                if self._stop_requested:
                    break
                if self._final(outcome):
                    return self.state
                reasons.append(self._last_reason)
                if outcome == S.ResultCode.FENCE_FAILED:
                    # The next PE would fence the same host: wait, do not hammer its fence
                    # device; the next round starts with another PE (its fencing may work).
                    fence_failed = {element.identifier}
                    break
            if self._stop_requested:
                break
            if not retry_now:
                wait = backoff * (1 - self.settings.retry_jitter * self.rng())
                # Every PE's own answer: the last one alone may hide the real reason.
                self._set(
                    State.WAITING, f"{'; '.join(reasons)}; retrying in {wait:.1f} s"
                )
                await self._pause(wait)
                backoff = min(backoff * 2, self.settings.retry_max_s)
                failed = fence_failed
        if self._leaving:
            self._set(State.LEFT, "its PE keeps it for the lease")
        else:
            self._set(State.STOPPED, "stopped")
        return self.state

    def _final(self, code) -> bool:
        """A refusal to give up on. "Already running" is final for a new VM (a cookie a
        refusing PE sent naming the holder does not make it this PU's); for one this PU
        already ran (it started it, or had a cookie from an earlier run) it means its old
        PE is alive and holds it, so the PU goes on, and back to that PE first after the back-off."""
        if code == S.ResultCode.ALREADY_RUNNING and self.ran_before:
            return False
        return code in FINAL_CODES

    def _cookie_home(self) -> int | None:
        try:
            return C.peek(self.cookie).pe_identifier if self.cookie else None
        except C.CookieError:
            return None

    async def _pause(self, seconds: float) -> None:
        """The back-off: only stop() and leave() cut it short."""
        self._backoff_pause = task.deferLater(self.clock, seconds, lambda: None)
        await _unless_cancelled(self._backoff_pause)
        self._backoff_pause = None

    async def _session_with(self, element: P.PoolElement):
        """Start (or take over) the VM on one PE and keep it there.

        Returns a result code when the PE refused, or None once a running VM's session
        ended (the PE was lost, or moved the VM). Whatever happens, the session has ended
        and its channel is closed when this returns: one PE at a time holds a session
        for this VM."""
        if self._session is not None and not self._session.ended:
            raise RuntimeError(f"{self.server_id}: a second session while one is open")
        self._last_reason = ""
        session = self._session = _Session()
        try:
            return await self._start_and_keep(session, element)
        finally:
            session.end()

    async def _start_and_keep(self, session: _Session, element: P.PoolElement):
        try:
            channel = await self.access.connect(element, session.deliver)
        except Exception as err:
            self._last_reason = f"PE {hex_id(element.identifier)} unreachable: {err}"
            self.access.report_unreachable(
                self.settings.pool_handle, element.identifier
            )
            return S.ResultCode.UNSPECIFIED
        session.attach(channel)
        if self._stop_requested or session.ended:  # stop() or leave() while connecting
            return S.ResultCode.NORMAL_END
        self.pe = element
        self._set(State.STARTING, f"on PE {hex_id(element.identifier)}")
        channel.send(M.CookieEcho(self.cookie) if self.cookie else self.request)
        result = await self._await(
            session, S.CreateResult, self.settings.create_timeout_s
        )
        if not isinstance(result, S.CreateResult):
            if result is LOST:
                self._last_reason = f"PE {hex_id(element.identifier)} closed the session without an answer"
            else:
                self._last_reason = f"PE {hex_id(element.identifier)} gave no answer in {self.settings.create_timeout_s:g} s"
            return S.ResultCode.UNSPECIFIED
        if not result.ok:
            self._last_reason = f"PE {hex_id(element.identifier)} refused: code {result.code}, {result.reason}"
            if self._final(result.code):
                self._set(State.REFUSED, self._last_reason)
            return result.code
        session.started = True
        if session.pending_cookie is not None:
            self._keep_cookie(session.pending_cookie)
            session.pending_cookie = None
        self.running_since = self.clock.seconds()
        self.ran_before = True
        if self.lost_at is not None:
            self.last_failover_s = self.running_since - self.lost_at
            self.failovers += 1
        self.lost_at = None
        self._set(State.RUNNING, f"on PE {hex_id(element.identifier)}: {result.reason}")
        ended = await self._heartbeat(session)
        if isinstance(ended, S.StopResult):  # a planned move: no one to report or fence
            self.moves += 1
            self._move_target = ended.target_pe
            to = f" to PE {hex_id(ended.target_pe)}" if ended.target_pe else ""
            self._set(
                State.FAILING_OVER,
                f"moved off PE {hex_id(element.identifier)}{to}: {ended.reason}",
            )
            return None
        if ended is True and not self._leaving:
            await self._stop_on(session)
        if self._stop_requested:  # asked to stop or leave: not a loss, no one to report
            return S.ResultCode.NORMAL_END
        self.lost_at = self.clock.seconds()
        self.access.report_unreachable(self.settings.pool_handle, element.identifier)
        self._set(State.FAILING_OVER, f"PE {hex_id(element.identifier)} lost")
        return None

    async def _await(self, session: _Session, kind: type, timeout: float):
        """The next ``kind`` message, keeping every cookie on the way; LOST if the
        session ended, None on timeout."""
        deadline = self.clock.seconds() + timeout
        while True:
            left = deadline - self.clock.seconds()
            if left <= 0:
                return None
            d = session.queue.get()
            timer = self.clock.callLater(left, d.cancel)
            try:
                message = await d
            except defer.CancelledError:
                return None
            finally:
                if timer.active():
                    timer.cancel()
            if message is LOST:
                return LOST
            if isinstance(message, M.Cookie):
                self._cookie_arrived(session, message.cookie)
            elif isinstance(message, kind) or (
                isinstance(message, S.StopResult) and message.code == S.ResultCode.MOVED
            ):
                return message

    def _cookie_arrived(self, session: _Session, cookie: bytes) -> None:
        """A PE sends a cookie (not running) when it begins a start it may still refuse:
        kept, it would send this keeper to a PE that never had the VM instead of the one
        that holds it. So it waits for the start's success. A cookie saying "running" is
        kept at once: that PE may run the VM now (it fenced or checked the last host first)
        and must be the one fenced should it vanish."""
        if session.started or _says_running(cookie):
            session.pending_cookie = None
            self._keep_cookie(cookie)
        else:
            session.pending_cookie = cookie

    def _drop_cookie(self) -> None:
        log.warn(
            "{server}: its cookie was refused ({why}); asking with a plain request",
            server=self.server_id,
            why=self._last_reason,
        )
        self.cookie = None
        self.ran_before = True

    def _keep_cookie(self, cookie: bytes) -> None:
        self.cookie = cookie
        self.events.on_cookie(self, cookie)

    async def _heartbeat(self, session: _Session) -> bool | S.StopResult:
        """CheckRunning every interval. Returns True when a stop was asked, False
        when the session was lost (closed, or a heartbeat went unanswered), and the PE's
        StopResult when it moved the VM away (rebalancing)."""
        last_answer = self.clock.seconds()
        assert session.channel is not None  # attached before the VM is kept
        while not self._stop_requested:
            session.channel.send(
                S.CheckRunning(
                    self.server_id, max(1, round(self.settings.heartbeat_interval_s))
                )
            )
            # The timeout runs from the last answer, not from this request: a silent PE
            # is given up heartbeat_timeout_s after it was last heard, whatever the interval.
            left = (
                last_answer + self.settings.heartbeat_timeout_s - self.clock.seconds()
            )
            answer = await self._await(
                session, S.CheckRunningResponse, max(left, 0.001)
            )
            if answer is LOST:
                return False
            if answer is None:
                session.end()
                return False
            if isinstance(answer, S.StopResult):
                return answer
            last_answer = self.clock.seconds()
            if answer.state != self.domain_state:
                self.domain_state = answer.state
                self._set(State.RUNNING, f"domain {state_name(answer.state)}")
            session.heartbeat_pause = task.deferLater(
                self.clock, self.settings.heartbeat_interval_s, lambda: None
            )
            await _unless_cancelled(session.heartbeat_pause)
            session.heartbeat_pause = None
        return True

    # ------------------------------------------------------------------ stopping

    def leave(self) -> None:
        """Go away without stopping the VM (a keeper shutting down): the PE keeps it for
        its lease, and a keeper that comes back with the cookie re-adopts it."""
        self._stop_requested = True
        self._leaving = True
        if self._backoff_pause is not None:
            self._backoff_pause.cancel()
        if self._session is not None:
            self._session.interrupt()

    def stop(self) -> defer.Deferred:
        """Stop the VM cleanly (StopServer) and end the session; fires with the final State."""
        self._stop_requested = True
        if self._backoff_pause is not None:
            self._backoff_pause.cancel()
        if self._session is not None and self._session.heartbeat_pause is not None:
            self._session.heartbeat_pause.cancel()
        return self._running

    async def _stop_on(self, session: _Session) -> None:
        self._set(State.STOPPING, "asking the PE to stop it")
        assert session.channel is not None  # attached before the VM is kept
        session.channel.send(S.StopServer(self.server_id))
        answer = await self._await(
            session, S.StopResult, max(30.0, self.settings.heartbeat_timeout_s)
        )
        if not isinstance(answer, S.StopResult):
            log.warn("{server}: the PE did not confirm the stop", server=self.server_id)


def _says_running(cookie: bytes) -> bool:
    try:
        return C.peek(cookie).running
    except C.CookieError:
        return False


async def _unless_cancelled(d: defer.Deferred) -> None:
    try:
        await d
    except defer.CancelledError:
        pass
