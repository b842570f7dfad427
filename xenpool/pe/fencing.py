"""From a cookie's host identity to a fence: the PE config maps hosts to fence options."""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from ..config import read_ini
from ..interfaces import FenceTarget, ISelfFencing
from ..protocol import messages as M
from ..protocol.errors import Cause


def read_fence_map(path: str) -> dict[str, dict[str, str]]:
    """An INI file with one section per host: the options its fence needs
    (``[host2]`` / ``plug = host2`` / ``ip = 10.0.0.12`` ...)."""
    parser = read_ini(path, "fence-map")
    return {host: dict(parser.items(host)) for host in parser.sections()}


class StonithFencer:
    """Fences a host by its identity with an IStonith provider and the host's options.

    Failovers of several VMs from one dead host share one fence while it runs (one
    power-off, one operator confirmation for ``manual``). A finished fence is never
    reused: the host may have come back since."""

    def __init__(self, stonith, fence_map: dict[str, dict[str, str]]) -> None:
        self.stonith = stonith
        self.fence_map = fence_map
        self._running: dict[str, list[defer.Deferred]] = {}

    def fence(self, host: str, pe_identifier: int = 0) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._running.get(host)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._running[host] = [waiter]
        target = FenceTarget(host, dict(self.fence_map.get(host, {})), pe_identifier)
        defer.maybeDeferred(self.stonith.fence, target).addBoth(self._done, host)
        return waiter

    def _done(self, result, host: str) -> None:
        for waiter in self._running.pop(host):
            waiter.errback(result) if isinstance(result, Failure) else waiter.callback(result)


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

    def __init__(self, reactor, registrars, pool_handle: bytes, timeout_s: float = 2.0, items: int = 256) -> None:
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
                TcpPoolAccess(self.reactor, _OneRegistrar(e), self.timeout_s).ask(M.HandleResolution(self.pool_handle, self.items))
            )
            for e in endpoints
        ]  # fmt: skip
        results = await defer.DeferredList(asks, consumeErrors=True)
        unknown = []
        for n, (ok, answer) in enumerate(results, 1):
            which = f"registrar {n} of {len(results)}"
            if not ok:
                unknown.append(f"{which} did not answer ({answer.getErrorMessage()})")
            elif not isinstance(answer, M.HandleResolutionResponse):
                unknown.append(f"{which} answered {type(answer).__name__}")
            elif any(e.identifier == pe_identifier for e in answer.pool_elements):
                return True
            elif answer.error is not None:
                if not all(c.code == Cause.UNKNOWN_POOL_HANDLE for c in answer.error.causes):
                    unknown.append(f"{which} refused the resolution")
            elif len(answer.pool_elements) >= self.items:
                unknown.append(f"{which} answered with {len(answer.pool_elements)} PEs, maybe not all")
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
    pe.refresh_interval_s = min(pe.refresh_interval_s or stonith.refresh_interval_s, stonith.refresh_interval_s)
