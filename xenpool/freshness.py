"""Signed requests taken only while fresh and only once (sans-IO): the replay window that
lease requests, planned moves, PU proofs and the operator's commands share."""

from __future__ import annotations

from collections.abc import Hashable


class FreshOnce:
    """The MACs of the signed requests taken, each kept until it could no longer pass the
    age check (twice the window: the issuer's clock may be on either side), so that a
    replay is refused without remembering every request ever taken."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.taken: dict[Hashable, float] = {}  # MAC -> when it may be forgotten

    def too_old(self, issued_s: float, now: float) -> bool:
        """Issued further than the window from ``now``, in the past or the future."""
        return abs(now - issued_s) > self.max_age_s

    def replayed(self, mac: Hashable, now: float) -> bool:
        """Taken before (and not yet forgotten)."""
        self.taken = {m: until for m, until in self.taken.items() if until > now}
        return mac in self.taken

    def take(self, mac: Hashable, now: float) -> None:
        self.taken[mac] = now + 2 * self.max_age_s
