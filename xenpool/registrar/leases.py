"""A registrar as a voter on who may run a VM (sans-IO): per-VM leases for PEs.

A PE asks a majority of the pool's voters for a lease on a VM's keys (its ServerID, its
disk, each IP) before it fences or starts it, and renews it while the VM may run there.
Each voter grants a key to at most one host while that host's lease runs, so two PEs can
never both hold a majority: exactly one of two concurrent starters goes on. A lease that
ran out is not forgotten: until its host releases the keys (the VM stopped there) the
voter names that host as a *previous holder* to the next one it grants the keys to,
which must fence it, or prove that it does not run the VM, before starting.

Holders are hosts (fencing identities), not PE identifiers: a PE restarted on the same
host keeps what its host holds.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from ..freshness import FreshOnce
from ..protocol import session as S

# A request is taken only this close to its issue time, and only once.
MAX_REQUEST_AGE_S = 60.0


@dataclass
class Lease:
    """One key at one voter: its holder (None once released) until ``expires`` (this
    voter's clock), and the hosts that held it before and may still run the VM."""

    holder: S.Holder | None
    server_id: str
    expires: float
    prior: frozenset[S.Holder] = frozenset()


KIND_NAMES = {"vm": "VM", "disk": "disk", "ip": "IP"}


def request_keys(request: S.LeaseRequest) -> list[tuple[bytes, str, str]]:
    keys = [(request.pool_handle, "vm", request.server_id)]
    if request.disk:
        keys.append((request.pool_handle, "disk", request.disk))
    keys += [(request.pool_handle, "ip", ip) for ip in request.ips]
    return keys


class LeaseTable:
    """The leases one voter granted. ``quiet_until``: a voter that may have forgotten
    leases (restarted without its state) takes no new holder before this time, only
    renewals, so every living holder has told it again what it holds."""

    def __init__(
        self,
        voter: int,
        *,
        max_duration_s: float = 60.0,
        secrets: dict[bytes, bytes] | None = None,
        quiet_until: float = 0.0,
    ) -> None:
        self.voter = voter
        self.max_duration_s = max_duration_s
        self.secrets = secrets or {}
        self.quiet_until = quiet_until
        self.leases: dict[tuple[bytes, str, str], Lease] = {}
        self.requests = FreshOnce(MAX_REQUEST_AGE_S)
        self.changed = False  # the holders changed since the last save

    def handle(
        self, request: S.LeaseRequest, now: float, wall_ms: int | None = None
    ) -> S.LeaseAnswer:
        """``wall_ms``: this voter's wall clock, to check a signed request's age."""
        refused = self._unauthentic(request, now, wall_ms)
        if refused:
            return self._answer(request, False, reason=refused)
        keys = request_keys(request)
        me = S.Holder(request.pe_identifier, request.host)
        if request.action == S.LeaseAction.RELEASE:
            for key in keys:
                lease = self.leases.get(key)
                if (
                    lease is not None
                    and lease.holder is not None
                    and lease.holder.host == request.host
                ):
                    self.changed = True
                    if lease.prior:
                        self.leases[key] = Lease(
                            None, lease.server_id, now, lease.prior
                        )
                    else:
                        del self.leases[key]
            return self._answer(request, True)
        if request.action == S.LeaseAction.ACQUIRE and now < self.quiet_until:
            return self._answer(
                request,
                False,
                reason=f"voter restarted without its state; it takes new holders in "
                f"{self.quiet_until - now:.0f} s",
            )
        for key in keys:
            lease = self.leases.get(key)
            holder = lease.holder if lease else None
            if (
                lease is not None
                and holder is not None
                and holder.host not in (request.host, request.cleared)
                and lease.expires > now
            ):
                remaining = round((lease.expires - now) * 1000)
                return self._answer(
                    request,
                    False,
                    remaining,
                    holder,
                    reason=f"{KIND_NAMES[key[1]]} {key[2]} is held by {holder.host} for {remaining / 1000:.1f} s more",
                )
        duration = min(request.duration_ms / 1000, self.max_duration_s)
        previous: set[S.Holder] = set()
        for key in keys:
            lease = self.leases.get(key)
            prior: set[S.Holder] = set(lease.prior) if lease else set()
            if (
                lease is not None
                and lease.holder is not None
                and lease.holder.host != request.host
            ):
                prior.add(lease.holder)  # its lease ran out without a release
            if (
                request.action == S.LeaseAction.RENEW
                and lease is not None
                and lease.holder is not None
                and lease.holder.host == request.host
            ):
                prior.clear()  # the holder runs it, having fenced or asked every previous host
            prior = {h for h in prior if h.host not in (request.host, request.cleared)}
            previous |= prior
            if lease is None or lease.holder != me or lease.prior != frozenset(prior):
                self.changed = True
            self.leases[key] = Lease(
                me, request.server_id, now + duration, frozenset(prior)
            )
        if request.action == S.LeaseAction.RENEW:
            previous = set()
        ordered = tuple(sorted(previous, key=lambda h: (h.host, h.pe_identifier)))[
            : S.MAX_LEASE_HOLDERS
        ]
        return self._answer(request, True, round(duration * 1000), previous=ordered)

    def _answer(
        self,
        request: S.LeaseRequest,
        granted: bool,
        remaining_ms: int = 0,
        holder: S.Holder | None = None,
        previous: tuple[S.Holder, ...] = (),
        reason: str = "",
    ) -> S.LeaseAnswer:
        return S.LeaseAnswer(
            self.voter,
            request.server_id,
            granted,
            remaining_ms,
            holder,
            previous,
            reason[: S.MAX_REASON],
        )

    def _unauthentic(
        self, request: S.LeaseRequest, now: float, wall_ms: int | None
    ) -> str:
        """Why a request is refused unheard: a wrong MAC, too old, or a replay ('' if none).
        Pools without a secret take unsigned requests, as their registrations."""
        secret = self.secrets.get(request.pool_handle)
        if secret is None:
            return ""
        if not hmac.compare_digest(request.mac, S.lease_request_mac(secret, request)):
            return "not signed with the pool secret"
        if (
            wall_ms is not None
            and abs(wall_ms - request.issued_ms) > MAX_REQUEST_AGE_S * 1000
        ):
            return f"issued {(wall_ms - request.issued_ms) / 1000:.0f} s from now, more than {MAX_REQUEST_AGE_S:.0f} s"
        if self.requests.replayed(request.mac, now):
            return "a replay of a request already taken"
        self.requests.take(request.mac, now)
        return ""

    # ---------------------------------------------------------------- persistence

    def dump(self) -> str:
        """Every lease, expired ones too (their hosts are previous holders)."""
        self.changed = False

        def holder(h: S.Holder | None):
            return None if h is None else [h.pe_identifier, h.host]

        return json.dumps(
            [
                {
                    "pool": key[0].hex(),
                    "kind": key[1],
                    "key": key[2],
                    "server_id": lease.server_id,
                    "holder": holder(lease.holder),
                    "prior": [holder(h) for h in lease.prior],
                }
                for key, lease in self.leases.items()
            ]
        )

    def load(self, text: str, now: float) -> None:
        """Leases saved before a restart; each counts as live for a whole maximal lease
        from now, since when it was last renewed is unknown."""
        for item in json.loads(text):
            key = (bytes.fromhex(item["pool"]), str(item["kind"]), str(item["key"]))
            holder = (
                S.Holder(int(item["holder"][0]), str(item["holder"][1]))
                if item["holder"]
                else None
            )
            prior = frozenset(
                S.Holder(int(pe), str(host)) for pe, host in item["prior"]
            )
            self.leases[key] = Lease(
                holder, str(item["server_id"]), now + self.max_duration_s, prior
            )
