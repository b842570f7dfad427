"""From a cookie's host identity to a fence: the PE config maps hosts to fence options."""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from ..config import read_ini
from ..interfaces import FenceTarget


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

    def fence(self, host: str) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._running.get(host)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._running[host] = [waiter]
        target = FenceTarget(host, dict(self.fence_map.get(host, {})))
        defer.maybeDeferred(self.stonith.fence, target).addBoth(self._done, host)
        return waiter

    def _done(self, result, host: str) -> None:
        for waiter in self._running.pop(host):
            waiter.errback(result) if isinstance(result, Failure) else waiter.callback(result)
