"""From a cookie's host identity to a fence: the PE config maps hosts to fence options."""

from __future__ import annotations

from twisted.internet import defer

from ..config import read_ini
from ..interfaces import FenceTarget


def read_fence_map(path: str) -> dict[str, dict[str, str]]:
    """An INI file with one section per host: the options its fence needs
    (``[host2]`` / ``plug = host2`` / ``ip = 10.0.0.12`` ...)."""
    parser = read_ini(path, "fence-map")
    return {host: dict(parser.items(host)) for host in parser.sections()}


class StonithFencer:
    """Fences a host by its identity with an IStonith provider and the host's options."""

    def __init__(self, stonith, fence_map: dict[str, dict[str, str]]) -> None:
        self.stonith = stonith
        self.fence_map = fence_map

    def fence(self, host: str) -> defer.Deferred:
        return defer.maybeDeferred(self.stonith.fence, FenceTarget(host, dict(self.fence_map.get(host, {}))))
