"""The registrar's ASAP behaviour: registrations, resolutions and the keep-alive audit.

No sockets here: an *association* is anything with ``send(message)`` and
``close()`` (a TCP connection in the daemon, a list in tests); time comes from an
injected IReactorTime, so tests drive every timer with a Clock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import Logger

from ..logs import hex_id, pool_name
from ..protocol import messages as M
from ..protocol import params as P
from ..protocol.errors import Cause
from .handlespace import Handlespace, HandlespaceError, PoolEntry

log = Logger()


@dataclass(frozen=True)
class Timers:
    """The registrar's timers, in seconds. Defaults follow rsplib."""

    keep_alive_interval: float = 5.0  # how often the home registrar audits a PE
    keep_alive_timeout: float = 5.0  # how long it waits for the PE's answer
    expiry_check_interval: float = 1.0  # how often ended registration lives are swept


class Association(Hashable, Protocol):
    def send(self, message: M.Message) -> None: ...

    def send_encoded(self, data: bytes) -> None:
        """Send a message already encoded (the handle resolution fast path)."""

    def close(self) -> None: ...


class Observer(Protocol):
    """What the registrar reports (metrics, ENRP updates to peers)."""

    def registered(self, entry: PoolEntry, new: bool) -> None: ...

    def removed(self, entry: PoolEntry, why: str) -> None: ...

    def refused(self, cause: int) -> None: ...


class Observers:
    """Tells every observer (metrics, ENRP peering) what happened."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers

    def registered(self, entry: PoolEntry, new: bool) -> None:
        for o in self.observers:
            o.registered(entry, new)

    def removed(self, entry: PoolEntry, why: str) -> None:
        for o in self.observers:
            o.removed(entry, why)

    def refused(self, cause: int) -> None:
        for o in self.observers:
            o.refused(cause)


class _Audit:
    """Keep-alive state of one PE this registrar is home for."""

    __slots__ = ("next_keep_alive", "deadline")

    def __init__(self) -> None:
        self.next_keep_alive = None
        self.deadline = None

    def cancel(self) -> None:
        for call in (self.next_keep_alive, self.deadline):
            if call is not None and call.active():
                call.cancel()
        self.next_keep_alive = self.deadline = None


class Registrar:
    def __init__(
        self,
        handlespace: Handlespace,
        clock,
        timers: Timers = Timers(),
        observers: Sequence[Observer] = (),
    ):
        self.handlespace = handlespace
        self.clock = clock
        self.timers = timers
        self.observer = Observers(list(observers))
        self._audits: dict[tuple[bytes, int], _Audit] = {}
        self._expiry = None

    @property
    def registrar_id(self) -> int:
        return self.handlespace.registrar_id

    def start(self) -> None:
        self._schedule_expiry()

    def stop(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        for audit in self._audits.values():
            audit.cancel()
        self._audits.clear()

    # ------------------------------------------------------------------ ASAP

    def handle(self, message: M.Message, association: Association) -> None:
        """One ASAP message from a PE or PU; answers go to ``association``."""
        handler = self._handlers.get(type(message))
        if handler is None:
            # A valid ASAP message a registrar does not take (e.g. COOKIE): RFC 5352
            # says answer with Unrecognized Message.
            self.observer.refused(Cause.UNRECOGNIZED_MESSAGE)
            association.send(
                M.AsapError(
                    P.OperationError.single(
                        Cause.UNRECOGNIZED_MESSAGE, M.encode(message)
                    )
                )
            )
            return
        handler(self, message, association)

    def _registration(self, msg: M.Registration, association: Association) -> None:
        pe_id = msg.pool_element.identifier
        try:
            self.handlespace.check_authentication(
                msg.pool_handle, msg.pool_element, msg.authentication
            )
            entry = self.handlespace.register(
                msg.pool_handle,
                msg.pool_element,
                now=self.clock.seconds(),
                owner=association,
                asap_transport=getattr(association, "asap_transport", None),
            )
        except HandlespaceError as err:
            log.info(
                "refused registration of PE {pe} in {pool}: {reason}",
                pe=hex_id(pe_id),
                pool=pool_name(msg.pool_handle),
                reason=err.reason,
            )
            self.observer.refused(err.cause)
            association.send(
                M.RegistrationResponse(
                    msg.pool_handle,
                    pe_id,
                    reject=True,
                    error=P.OperationError.single(err.cause, err.reason.encode()[:200]),
                )
            )
            return
        new = entry.registered_at == entry.last_update
        self.observer.registered(entry, new)
        self._audit(entry, association)
        association.send(M.RegistrationResponse(msg.pool_handle, pe_id))

    def _deregistration(self, msg: M.Deregistration, association: Association) -> None:
        try:
            held = self.handlespace.get(msg.pool_handle, msg.pe_identifier)
            if (
                held is not None
                and msg.pool_handle in self.handlespace.pool_secrets
                and held.owner != association
            ):
                # in a pool with a secret only the PE itself (the association that
                # proved the secret registering it) takes itself out
                raise HandlespaceError(
                    Cause.SECURITY_REJECTION,
                    "only the PE's own association deregisters it in a pool with a secret",
                )
            entry = self.handlespace.deregister(msg.pool_handle, msg.pe_identifier)
        except HandlespaceError as err:
            self.observer.refused(err.cause)
            association.send(
                M.DeregistrationResponse(
                    msg.pool_handle,
                    msg.pe_identifier,
                    P.OperationError.single(err.cause),
                )
            )
            return
        self._forget(entry, "deregistered")
        association.send(M.DeregistrationResponse(msg.pool_handle, msg.pe_identifier))

    def cached_resolution(self, request: bytes) -> bytes | None:
        """The answer to a HANDLE_RESOLUTION seen before in exactly these bytes, while
        the pool is unchanged and its policy would answer the same (the fast path)."""
        return self.handlespace.cached_answer(request)

    def resolution(
        self,
        msg: M.HandleResolution,
        association: Association,
        raw: bytes | None = None,
    ) -> None:
        """Answer a HANDLE_RESOLUTION. ``raw``: its bytes, when it came as them, so that an
        answer the pool's policy would repeat can be found by ``cached_resolution``."""
        try:
            answer = self.handlespace.resolution_answer(
                msg.pool_handle, msg.items, msg.ram_mb, raw
            )
        except HandlespaceError as err:
            self.observer.refused(err.cause)
            association.send(
                M.HandleResolutionResponse(
                    msg.pool_handle, error=P.OperationError.single(err.cause)
                )
            )
            return
        association.send_encoded(answer)

    def _keep_alive_ack(
        self, msg: M.EndpointKeepAliveAck, association: Association
    ) -> None:
        entry = self.handlespace.get(msg.pool_handle, msg.pe_identifier)
        if entry is not None and entry.owner is association:
            self._audit(entry, association)

    def _unreachable(
        self, msg: M.EndpointUnreachable, association: Association
    ) -> None:
        entry = self.handlespace.report_unreachable(msg.pool_handle, msg.pe_identifier)
        if entry is not None:
            self._forget(entry, "reported unreachable")

    _handlers: dict[type, Callable[..., None]] = {
        M.Registration: _registration,
        M.Deregistration: _deregistration,
        M.HandleResolution: resolution,
        M.EndpointKeepAliveAck: _keep_alive_ack,
        M.EndpointUnreachable: _unreachable,
    }

    def association_lost(self, association: Association) -> None:
        """The connection of a PE closed: its PEs go at once (fast failure detection)."""
        for entry in self.handlespace.remove_owned_by(association):
            self._forget(entry, "association lost")

    # ---------------------------------------------------------------- timers

    def _audit(self, entry: PoolEntry, association: Association) -> None:
        """(Re)start the keep-alive cycle of a PE that just showed it is alive."""
        key = (entry.pool_handle, entry.identifier)
        audit = self._audits.get(key)
        if audit is None:
            audit = self._audits[key] = _Audit()
        audit.cancel()
        audit.next_keep_alive = self.clock.callLater(
            self.timers.keep_alive_interval, self._send_keep_alive, key, association
        )

    def _send_keep_alive(
        self, key: tuple[bytes, int], association: Association
    ) -> None:
        audit = self._audits.get(key)
        if audit is None:
            return
        audit.next_keep_alive = None
        association.send(M.EndpointKeepAlive(self.registrar_id, key[0], key[1]))
        audit.deadline = self.clock.callLater(
            self.timers.keep_alive_timeout, self._keep_alive_missed, key
        )

    def _keep_alive_missed(self, key: tuple[bytes, int]) -> None:
        self._audits.pop(key, None)
        try:
            entry = self.handlespace.deregister(*key)
        except HandlespaceError:
            return
        log.warn(
            "PE {pe} in {pool} missed its keep-alive: removed",
            pe=hex_id(key[1]),
            pool=pool_name(key[0]),
        )
        self.observer.removed(entry, "keep-alive timeout")

    def _forget(self, entry: PoolEntry, why: str) -> None:
        audit = self._audits.pop((entry.pool_handle, entry.identifier), None)
        if audit is not None:
            audit.cancel()
        log.info(
            "PE {pe} in {pool} removed: {why}",
            pe=hex_id(entry.identifier),
            pool=pool_name(entry.pool_handle),
            why=why,
        )
        self.observer.removed(entry, why)

    def _schedule_expiry(self) -> None:
        self._expiry = self.clock.callLater(
            self.timers.expiry_check_interval, self._sweep
        )

    def _sweep(self) -> None:
        for entry in self.handlespace.expire(self.clock.seconds()):
            self._forget(entry, "registration life ended")
        self._schedule_expiry()
