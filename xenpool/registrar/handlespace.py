"""The handlespace: pools and their pool elements, sans-IO (RFC 5351/5352/5353).

Plain Python fed with requests and the current time; it answers with results and
never does I/O. The registrar service wires it to sockets and timers.
"""

from __future__ import annotations

import hmac
import random
import struct
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from ..protocol import messages as M
from ..protocol import params as P
from ..protocol.errors import Cause

if TYPE_CHECKING:
    from ..interfaces import IPoolPolicy, IPoolSelection

DEFAULT_MAX_BAD_PE_REPORTS = 3
DEFAULT_MAX_RESOLUTION_ITEMS = 3
# However many PEs a Handle Resolution Option asks for, one answer carries at most this
# many (0xffffffff means "as many as possible"); rsplib refuses an answer with more.
RESOLUTION_ITEMS_LIMIT = M.MAX_RESOLUTION_ITEMS
# Distinct HANDLE_RESOLUTION requests whose answers are kept; bounded because the
# requests come from the network.
ANSWER_CACHE_SIZE = 1024
_RESPONSE_HEADER = struct.Struct("!BBH")


class HandlespaceError(Exception):
    """A request the handlespace refuses; ``cause`` is the RFC 5354 error cause."""

    def __init__(self, cause: Cause, reason: str) -> None:
        super().__init__(reason)
        self.cause = cause
        self.reason = reason


@dataclass(slots=True)
class PoolEntry:
    """One PE as the handlespace keeps it."""

    pool_handle: bytes
    element: P.PoolElement  # as registered; home registrar and policy kept current
    owner: (
        Hashable | None
    )  # the ASAP association that registered it (None: learned via ENRP)
    registered_at: float
    last_update: float
    expires_at: float  # end of the registration life
    unreachable_reports: int = 0
    _encoded: bytes | None = None  # the Pool Element parameter, encoded once per change
    # Where the PE's registrar association is (its ASAP transport, RFC 5354 section 3.10):
    # carried in ENRP only, so that a peer can take the PE over.
    asap_transport: P.Transport | None = None

    @property
    def enrp_element(self) -> P.PoolElement:
        """The Pool Element parameter as ENRP carries it: with its ASAP transport (rsplib
        refuses one without: "invalid registrator"). A PE learned from a peer that did not
        send one gets its user transport there, the one address known for it."""
        return replace(
            self.element,
            asap_transport=self.asap_transport or self.element.user_transport,
        )

    @property
    def encoded(self) -> bytes:
        if self._encoded is None:
            self._encoded = P.encode_pool_element(self.element)
        return self._encoded

    @property
    def identifier(self) -> int:
        return self.element.identifier

    @property
    def home_registrar(self) -> int:
        return self.element.home_registrar


@dataclass(slots=True)
class Pool:
    handle: bytes
    policy_type: int
    transport_type: type
    selection: IPoolSelection
    entries: dict[int, PoolEntry] = field(default_factory=dict)
    # The start of every handle resolution answer: pool handle and the pool's policy.
    answer_head: bytes = b""
    generation: int = (
        0  # changes with every change of the pool; cached answers carry it
    )


def checksum_of(entries: Iterator[PoolEntry]) -> int:
    """The 16-bit handlespace checksum over (pool handle, PE id) of the given PEs, as
    rsplib computes it: a one's-complement sum of 16-bit words, inverted."""
    total = 0
    for entry in entries:
        data = entry.pool_handle
        if len(data) % 2:
            data += b"\0"
        total += sum(
            int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)
        )
        total += (entry.identifier >> 16) + (entry.identifier & 0xFFFF)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Handlespace:
    """Pools by handle, with registration rules, expiry and selection by policy.

    ``policies`` maps a policy type code to an IPoolPolicy provider.
    """

    def __init__(
        self,
        registrar_id: int,
        policies: dict[int, IPoolPolicy],
        *,
        rng: random.Random | None = None,
        max_bad_pe_reports: int = DEFAULT_MAX_BAD_PE_REPORTS,
        max_resolution_items: int = DEFAULT_MAX_RESOLUTION_ITEMS,
        pool_secrets: dict[bytes, bytes] | None = None,
        require_secret: bool = False,
    ) -> None:
        self.registrar_id = registrar_id
        # every pool needs a secret: a registration for a pool without one is refused
        self.require_secret = require_secret
        self.policies = policies
        self.rng = rng or random.Random()
        self.max_bad_pe_reports = max_bad_pe_reports
        self.max_resolution_items = max_resolution_items
        self.pools: dict[bytes, Pool] = {}
        self.pool_secrets = pool_secrets or {}
        self.resolutions = 0  # answered, cached or not
        # raw request -> (pool, its generation then, answer): answers a deterministic
        # policy would give again, valid while the pool's generation is unchanged.
        self._answers: dict[bytes, tuple[Pool, int, bytes]] = {}

    # ------------------------------------------------------------ registration

    def check_authentication(
        self, handle: bytes, element: P.PoolElement, mac: bytes | None
    ) -> None:
        """A pool with a secret takes only PEs that prove they know it (cause 10)."""
        secret = self.pool_secrets.get(handle)
        if secret is None:
            if self.require_secret:
                raise HandlespaceError(
                    Cause.SECURITY_REJECTION,
                    f"pool {handle!r} has no secret at this registrar, which requires one "
                    "(--require-pool-secret; give it --pool-secret POOL:FILE)",
                )
            return
        if mac is None or not hmac.compare_digest(
            mac, P.registration_mac(secret, handle, element)
        ):
            raise HandlespaceError(
                Cause.SECURITY_REJECTION,
                f"pool {handle!r} requires its secret; the PE's proof is {'wrong' if mac else 'missing'}",
            )

    def register(
        self,
        handle: bytes,
        element: P.PoolElement,
        *,
        now: float,
        owner: Hashable | None,
        home: int | None = None,
        asap_transport: P.Transport | None = None,
    ) -> PoolEntry:
        """Add or update a PE; raises HandlespaceError with the RFC's cause.
        ``asap_transport``: where its registrar association is (kept for ENRP)."""
        policy_type = element.policy.policy_type
        pool = self.pools.get(handle)
        if pool is None:
            provider = self.policies.get(policy_type)
            if provider is None:
                raise HandlespaceError(
                    Cause.INCONSISTENT_POLICY,
                    f"policy 0x{policy_type:08x} is not supported here",
                )
            pool = Pool(
                handle,
                policy_type,
                type(element.user_transport),
                provider.new_selection(self.rng),
            )
            pool.answer_head = P.encode_pool_handle(handle) + P.encode_policy(
                P.PoolPolicy.make(policy_type)
            )
        elif pool.policy_type != policy_type:
            raise HandlespaceError(
                Cause.INCONSISTENT_POLICY,
                f"pool {handle!r} uses policy 0x{pool.policy_type:08x}, the PE asked for 0x{policy_type:08x}",
            )
        elif type(element.user_transport) is not pool.transport_type and pool.entries:
            raise HandlespaceError(
                Cause.INCONSISTENT_TRANSPORT,
                f"pool {handle!r} uses {pool.transport_type.__name__}, the PE offers {type(element.user_transport).__name__}",
            )
        existing = pool.entries.get(element.identifier)
        if (
            existing is not None
            and existing.element.user_transport != element.user_transport
        ):
            raise HandlespaceError(
                Cause.NON_UNIQUE_PE_IDENTIFIER,
                f"PE 0x{element.identifier:08x} is already registered from {existing.element.user_transport}",
            )
        life_s = (
            element.registration_life / 1000
            if element.registration_life > 0
            else float("inf")
        )
        asap_transport = asap_transport or element.asap_transport
        element = replace(
            element,
            home_registrar=self.registrar_id if home is None else home,
            asap_transport=None,
        )
        if existing is None:
            entry = PoolEntry(
                handle,
                element,
                owner,
                now,
                now,
                now + life_s,
                asap_transport=asap_transport,
            )
            pool.entries[element.identifier] = entry
            self.pools[handle] = pool
        else:
            entry = existing
            entry.element, entry.owner, entry.last_update, entry.expires_at = (
                element,
                owner,
                now,
                now + life_s,
            )
            entry.unreachable_reports, entry._encoded = 0, None
            entry.asap_transport = asap_transport or entry.asap_transport
        pool.selection.update(element.identifier, element.policy)
        pool.generation += 1
        return entry

    def deregister(self, handle: bytes, identifier: int) -> PoolEntry:
        pool = self.pools.get(handle)
        if pool is None:
            raise HandlespaceError(Cause.UNKNOWN_POOL_HANDLE, f"no pool {handle!r}")
        entry = pool.entries.get(identifier)
        if entry is None:
            raise HandlespaceError(
                Cause.INVALID_VALUES, f"no PE 0x{identifier:08x} in pool {handle!r}"
            )
        self._remove(pool, entry)
        return entry

    def _remove(self, pool: Pool, entry: PoolEntry) -> None:
        del pool.entries[entry.identifier]
        pool.selection.remove(entry.identifier)
        pool.generation += 1
        if not pool.entries:
            del self.pools[pool.handle]

    def report_unreachable(self, handle: bytes, identifier: int) -> PoolEntry | None:
        """Count an ENDPOINT_UNREACHABLE; returns the entry if it was removed."""
        pool = self.pools.get(handle)
        entry = pool.entries.get(identifier) if pool else None
        if pool is None or entry is None:
            return None
        entry.unreachable_reports += 1
        if entry.unreachable_reports >= self.max_bad_pe_reports:
            self._remove(pool, entry)
            return entry
        return None

    def expire(self, now: float) -> list[PoolEntry]:
        """Remove every PE whose registration life has ended."""
        gone = [
            e
            for pool in self.pools.values()
            for e in pool.entries.values()
            if e.expires_at <= now
        ]
        for entry in gone:
            self._remove(self.pools[entry.pool_handle], entry)
        return gone

    def remove_owned_by(self, owner: Hashable) -> list[PoolEntry]:
        """Drop the PEs an ASAP association registered (it closed or failed its audit)."""
        gone = [e for e in self.entries() if e.owner == owner]
        for entry in gone:
            self._remove(self.pools[entry.pool_handle], entry)
        return gone

    def set_home(self, entry: PoolEntry, home: int) -> None:
        """A takeover moved the PE to another home registrar."""
        entry.element = replace(entry.element, home_registrar=home)
        entry._encoded = None
        self.pools[entry.pool_handle].generation += 1

    # ------------------------------------------------------------- resolution

    def _pool_and_count(self, handle: bytes, items: int | None) -> tuple[Pool, int]:
        pool = self.pools.get(handle)
        if pool is None:
            raise HandlespaceError(Cause.UNKNOWN_POOL_HANDLE, f"no pool {handle!r}")
        return pool, min(items or self.max_resolution_items, RESOLUTION_ITEMS_LIMIT)

    def resolution_answer(
        self,
        handle: bytes,
        items: int | None = None,
        ram_mb: int | None = None,
        request: bytes | None = None,
    ) -> bytes:
        """The encoded HANDLE_RESOLUTION_RESPONSE: the hot path of every registrar,
        built from parameters encoded once per change instead of once per answer.

        ``request``: the request's bytes. When the pool's policy would give the same
        answer again (``repeats``), it is kept for ``cached_answer`` under those bytes."""
        pool, count = self._pool_and_count(handle, items)
        selection = pool.selection
        books_ram = bool(ram_mb) and getattr(selection, "fits_requests", False)
        chosen = (
            # A selection with fits_requests (LeastUsedFreeRAM) books the requested RAM.
            cast(Any, selection).select(count, ram_mb=ram_mb)
            if books_ram
            else selection.select(count)
        )
        body = b"".join([pool.answer_head, *[pool.entries[i].encoded for i in chosen]])
        answer = (
            _RESPONSE_HEADER.pack(
                M.AsapType.HANDLE_RESOLUTION_RESPONSE, 0, 4 + len(body)
            )
            + body
        )
        self.resolutions += 1
        repeats = getattr(
            selection, "repeats", None
        )  # optional for third-party selections
        if (
            request is not None
            and not books_ram
            and repeats is not None
            and repeats(count, chosen)
        ):
            if len(self._answers) >= ANSWER_CACHE_SIZE:
                self._answers.clear()
            self._answers[request] = (pool, pool.generation, answer)
        return answer

    def cached_answer(self, request: bytes) -> bytes | None:
        """The answer to exactly these request bytes, if one is kept and still valid."""
        hit = self._answers.get(request)
        if hit is None or hit[0].generation != hit[1]:
            return None
        self.resolutions += 1
        return hit[2]

    def resolve(self, handle: bytes, items: int | None = None) -> list[P.PoolElement]:
        """Up to ``items`` PEs (default: max_resolution_items) chosen by the pool's policy."""
        pool, count = self._pool_and_count(handle, items)
        return [pool.entries[i].element for i in pool.selection.select(count)]

    # ---------------------------------------------------------------- queries

    def entries(self) -> Iterator[PoolEntry]:
        for pool in self.pools.values():
            yield from pool.entries.values()

    def get(self, handle: bytes, identifier: int) -> PoolEntry | None:
        pool = self.pools.get(handle)
        return pool.entries.get(identifier) if pool else None

    def checksum(self, home: int | None = None) -> int:
        """PE checksum over the PEs whose home is ``home`` (default: this registrar)."""
        home = self.registrar_id if home is None else home
        return checksum_of(e for e in self.entries() if e.home_registrar == home)

    def __len__(self) -> int:
        return sum(len(pool.entries) for pool in self.pools.values())
