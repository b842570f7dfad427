"""From a cookie's host identity to a fence: the PE config maps hosts to fence options."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import read_ini
from ..interfaces import FenceTarget, ISelfFencing
from ..protocol import messages as M
from ..protocol.errors import Cause

log = Logger()


def read_fence_map(path: str) -> dict[str, dict[str, str]]:
    """An INI file with one section per host: the options its fence needs
    (``[host2]`` / ``plug = host2`` / ``ip = 10.0.0.12`` ...)."""
    parser = read_ini(path, "fence-map")
    return {host: dict(parser.items(host)) for host in parser.sections()}


class FenceHeldOff(Exception):
    """A fence of this host failed a moment ago; it is not tried again yet."""


class StonithFencer:
    """Fences a host by its identity with an IStonith provider and the host's options.

    Failovers of several VMs from one dead host share one fence while it runs (one
    power-off, one operator confirmation for ``manual``), and a fence that succeeded
    ``REUSE_S`` ago at most. A failed one is not tried again for a
    while (``HOLD_OFF_S``, doubling up to ``HOLD_OFF_MAX_S``, with jitter; with a clock):
    asking a power controller thousands of times a second is an attack on it."""

    HOLD_OFF_S = 2.0
    HOLD_OFF_MAX_S = 60.0
    # A fence that succeeded this recently stands for the other VMs of the same failure
    # (a host that was just powered off runs none of them, and starts none without a lease).
    REUSE_S = 2.0

    def __init__(
        self,
        stonith,
        fence_map: dict[str, dict[str, str]],
        clock=None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.stonith = stonith
        self.fence_map = fence_map
        self.clock = clock
        self.rng = rng
        self._running: dict[str, list[defer.Deferred]] = {}
        self._failed: dict[
            str, tuple[float, float, float]
        ] = {}  # host -> (failed at, hold-off, until)
        self._fenced_at: dict[str, float] = {}

    def fence(self, host: str, pe_identifier: int = 0) -> defer.Deferred:
        held = self._failed.get(host)
        if (
            held is not None
            and self.clock is not None
            and self.clock.seconds() < held[2]
        ):
            now = self.clock.seconds()
            return defer.fail(
                FenceHeldOff(
                    f"fencing {host} failed {now - held[0]:.1f} s ago; not tried again "
                    f"for {held[2] - now:.1f} s"
                )
            )
        if (
            self.clock is not None
            and self.clock.seconds() - self._fenced_at.get(host, float("-inf"))
            < self.REUSE_S
        ):
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._running.get(host)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._running[host] = [waiter]
        log.info(
            "fencing {host}: asking {provider}",
            host=host,
            provider=getattr(self.stonith, "name", "the stonith plugin"),
        )
        target = FenceTarget(host, dict(self.fence_map.get(host, {})), pe_identifier)
        defer.maybeDeferred(self.stonith.fence, target).addBoth(self._done, host)
        return waiter

    def _done(self, result, host: str) -> None:
        if self.clock is not None:
            if isinstance(result, Failure):
                hold_off = (
                    min(self._failed[host][1] * 2, self.HOLD_OFF_MAX_S)
                    if host in self._failed
                    else self.HOLD_OFF_S
                )
                now = self.clock.seconds()
                self._failed[host] = (
                    now,
                    hold_off,
                    now + hold_off * (0.5 + 0.5 * self.rng()),
                )
            else:
                self._failed.pop(host, None)
                self._fenced_at[host] = self.clock.seconds()
        for waiter in self._running.pop(host):
            waiter.errback(result) if isinstance(result, Failure) else waiter.callback(
                result
            )


# -- self-fencing (the ``watchdog`` provider) ----------------------------------------------------


class MembershipUnknown(Exception):
    """The pool could not tell whether a PE is registered (a registrar did not answer)."""


class _OneRegistrar:
    """A Registrars stand-in offering one endpoint, to ask each registrar on its own."""

    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint

    def endpoints(self) -> list:
        return [self.endpoint]


class PoolMembership:
    """Whether a PE is registered in the pool, asked of every registrar the PE knows
    (configured, then announced): registered if any of them has it; unknown (failing with
    MembershipUnknown) if any of them does not answer or its answer may be cut short (a
    full answer of ``items`` PEs); not registered only if every one answered without it.
    The PE's watchdog is fed while any registrar confirms it, so one that cannot be asked
    might be the one that still does."""

    def __init__(
        self,
        reactor,
        registrars,
        pool_handle: bytes,
        timeout_s: float = 2.0,
        items: int = M.MAX_RESOLUTION_ITEMS,
    ) -> None:
        self.reactor = reactor
        self.registrars = registrars
        self.pool_handle = pool_handle
        self.timeout_s = timeout_s
        self.items = items

    def registered(self, pe_identifier: int) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._registered(pe_identifier))

    async def _registered(self, pe_identifier: int) -> bool:
        from ..asap_client import TcpPoolAccess

        endpoints = self.registrars.endpoints()
        if not endpoints:
            raise MembershipUnknown("no registrar configured, and none announced")
        asks = [
            defer.Deferred.fromCoroutine(
                TcpPoolAccess(self.reactor, _OneRegistrar(e), self.timeout_s).ask(
                    M.HandleResolution(self.pool_handle, self.items)
                )
            )
            for e in endpoints
        ]
        results = await defer.DeferredList(asks, consumeErrors=True)
        unknown = []
        for n, (ok, answer) in enumerate(results, 1):
            which = f"registrar {n} of {len(results)}"
            if not ok:
                unknown.append(
                    f"{which} did not answer ({cast(Failure, answer).getErrorMessage()})"
                )
            elif not isinstance(answer, M.HandleResolutionResponse):
                unknown.append(f"{which} answered {type(answer).__name__}")
            elif any(e.identifier == pe_identifier for e in answer.pool_elements):
                return True
            elif answer.error is not None:
                if not all(
                    c.code == Cause.UNKNOWN_POOL_HANDLE for c in answer.error.causes
                ):
                    unknown.append(f"{which} refused the resolution")
            elif len(answer.pool_elements) >= self.items:
                unknown.append(
                    f"{which} answered with {len(answer.pool_elements)} PEs, maybe not all"
                )
        if unknown:
            raise MembershipUnknown("; ".join(unknown))
        return False


def attach_self_fencing(stonith, feeder, pe, core, registrars, reactor) -> None:
    """Wire a self-fencing stonith provider (``watchdog``) and its ``feeder`` (made with
    the device opened, before the reactor runs) into a PE daemon: the provider asks the
    pool about other PEs, the feeder becomes a child service told of every registration
    and its answer, and the PE refreshes its registration often enough to keep it fed."""
    if not ISelfFencing.providedBy(stonith):
        return
    stonith.attach(
        PoolMembership(reactor, registrars, core.settings.pool_handle),
        lambda: bool(core.sessions or core.orphans or core.starting),
    )
    feeder.setServiceParent(pe)
    pe.registration_watchers.append(feeder)
    pe.refresh_interval_s = min(
        pe.refresh_interval_s or stonith.refresh_interval_s, stonith.refresh_interval_s
    )
