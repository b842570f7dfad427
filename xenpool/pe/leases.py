"""The PE's side of the per-VM leases (see xenpool/registrar/leases.py): ask the voters,
count a majority, keep renewing what may run here, release what stopped.

No sockets here: a voter is anything with ``ask(requests) -> Deferred[list[answer | None]]``
(answers in the order of the requests, None where it gave none); time comes from an
injected IReactorTime.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from ..protocol import session as S

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger()


class Voter(Protocol):
    def ask(self, requests: list[S.LeaseRequest]) -> defer.Deferred:
        """-> list[LeaseAnswer | None], one per request, in order."""


@dataclass(frozen=True)
class LeaseOutcome:
    """What a majority of the voters said. ``previous``: hosts that may still run the VM
    (fence them, or prove they do not run it, before a start). ``blocker``: the host
    whose live lease refused it."""

    granted: bool
    previous: frozenset[S.Holder] = frozenset()
    blocker: S.Holder | None = None
    reason: str = ""


@dataclass
class LeaseSettings:
    pool_handle: bytes
    pe_identifier: int
    host: str
    secret: bytes = b""
    duration_s: float = 15.0


@dataclass(eq=False)
class VmLeases:
    """The leases of one PE. With no voters every lease is granted at once (a pool
    without voters has no exactly-once guarantee beyond the claim query: logged at start)."""

    voters: Sequence[Voter]
    settings: LeaseSettings
    clock: IReactorTime
    wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)
    nonce: Callable[[], int] = field(
        default=lambda: random.SystemRandom().randrange(2**32)
    )
    on_lost: Callable[[str, str], None] = lambda server_id, why: None

    def __post_init__(self) -> None:
        self.held: dict[str, S.CreateServer] = {}  # kept renewed: they may run here
        self.lost: set[str] = set()  # held, but the last renewal found no majority
        self._loop = task.LoopingCall(self.renew_all)
        self._loop.clock = self.clock

    @property
    def enabled(self) -> bool:
        return bool(self.voters)

    @property
    def majority(self) -> int:
        return len(self.voters) // 2 + 1

    def start(self) -> None:
        if self.enabled and not self._loop.running:
            self._loop.start(self.settings.duration_s / 3, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _request(
        self, action: int, vm: S.CreateServer, cleared: str = ""
    ) -> S.LeaseRequest:
        s = self.settings
        request = S.LeaseRequest(
            s.pool_handle,
            s.pe_identifier,
            s.host,
            action,
            round(s.duration_s * 1000),
            vm.server_id,
            vm.disk,
            vm.ips,
            cleared,
            self.wall_ms(),
            self.nonce(),
        )
        return (
            dataclasses.replace(request, mac=S.lease_request_mac(s.secret, request))
            if s.secret
            else request
        )

    async def _ask_all(
        self, requests: list[S.LeaseRequest]
    ) -> list[list[S.LeaseAnswer | None]]:
        """Per request, each voter's answer (None: none)."""
        results = await defer.DeferredList(
            [voter.ask(requests) for voter in self.voters], consumeErrors=True
        )
        per_request: list[list[S.LeaseAnswer | None]] = [[] for _ in requests]
        for ok, answers in results:
            for i, request in enumerate(requests):
                answer = (
                    answers[i]
                    if ok and isinstance(answers, list) and i < len(answers)
                    else None
                )
                if (
                    not isinstance(answer, S.LeaseAnswer)
                    or answer.server_id != request.server_id
                ):
                    answer = None
                per_request[i].append(answer)
        return per_request

    def _outcome(self, answers: list[S.LeaseAnswer | None]) -> LeaseOutcome:
        granted = [a for a in answers if a is not None and a.granted]
        if len(granted) >= self.majority:
            return LeaseOutcome(
                True,
                frozenset(
                    h
                    for a in granted
                    for h in a.previous
                    if h.host != self.settings.host
                ),
            )
        refusals = [a for a in answers if a is not None and not a.granted]
        blocker = next((a.holder for a in refusals if a.holder is not None), None)
        silent = sum(a is None for a in answers)
        reasons = sorted({a.reason for a in refusals if a.reason})
        if silent:
            reasons.append(f"{silent} of {len(answers)} voters did not answer")
        why = (
            f"{len(granted)} of {len(answers)} voters granted the lease, {self.majority} needed: "
            + "; ".join(reasons)
        )
        return LeaseOutcome(False, blocker=blocker, reason=why)

    # ------------------------------------------------------------------ requests

    def acquire(self, vm: S.CreateServer, cleared: str = "") -> defer.Deferred:
        """-> LeaseOutcome for a start of ``vm`` here (``cleared``: a host just fenced, or
        that answered it does not run ``vm``, whose live lease may be taken over). A refused
        acquisition is released again where it was granted, so it blocks no one."""
        return defer.Deferred.fromCoroutine(self._acquire(vm, cleared))

    async def _acquire(self, vm: S.CreateServer, cleared: str) -> LeaseOutcome:
        if not self.enabled:
            return LeaseOutcome(True)
        (answers,) = await self._ask_all(
            [self._request(S.LeaseAction.ACQUIRE, vm, cleared)]
        )
        outcome = self._outcome(answers)
        if (
            not outcome.granted
            and any(a is not None and a.granted for a in answers)
            and vm.server_id not in self.held
        ):
            self.release(vm)
        return outcome

    def confirm(self, vm: S.CreateServer) -> defer.Deferred:
        """-> LeaseOutcome of a renewal just before a start: the lease is still this
        host's (no one took it while a fence ran), and every previous host is dealt with."""
        return defer.Deferred.fromCoroutine(self._confirm(vm))

    async def _confirm(self, vm: S.CreateServer) -> LeaseOutcome:
        if not self.enabled:
            return LeaseOutcome(True)
        (answers,) = await self._ask_all([self._request(S.LeaseAction.RENEW, vm)])
        return self._outcome(answers)

    def hold(self, vm: S.CreateServer) -> None:
        """``vm`` may run here from now on: renew its lease until release()."""
        self.held[vm.server_id] = vm
        self.lost.discard(vm.server_id)

    def release(self, vm: S.CreateServer) -> defer.Deferred:
        """``vm`` stopped here (or never started): the voters forget this host for it."""
        self.held.pop(vm.server_id, None)
        self.lost.discard(vm.server_id)
        if not self.enabled:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(
            self._ask_all([self._request(S.LeaseAction.RELEASE, vm)])
        )

    def renew_all(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._renew_all())

    async def _renew_all(self) -> None:
        vms = list(self.held.values())
        if not vms or not self.enabled:
            return
        results = await self._ask_all(
            [self._request(S.LeaseAction.RENEW, vm) for vm in vms]
        )
        for vm, answers in zip(vms, results):
            if vm.server_id not in self.held:
                continue  # released meanwhile
            outcome = self._outcome(answers)
            if outcome.granted:
                if vm.server_id in self.lost:
                    log.info("{server}: lease renewed again", server=vm.server_id)
                self.lost.discard(vm.server_id)
            elif vm.server_id not in self.lost:
                self.lost.add(vm.server_id)
                log.error(
                    "{server}: LEASE NOT RENEWED ({why}); another PE may fence this host to take it over",
                    server=vm.server_id,
                    why=outcome.reason,
                )
                self.on_lost(vm.server_id, outcome.reason)
