"""ENRP between registrars (RFC 5353): presence, handle table sync, updates, takeover.

No sockets here: a *channel* is anything with ``send(message)``; the daemon gives one per
ENRP connection. Time comes from an injected IReactorTime.

- Every ``heartbeat_interval`` each registrar sends PRESENCE with the checksum of the PEs
  it is home for. A peer heard for the first time, or whose checksum differs from what we
  hold for it, is asked for its own PEs (HANDLE_TABLE_REQUEST, W bit); the answer (in
  parts, M bit) replaces what we held for it.
- Local registrations and removals go to every peer as HANDLE_UPDATE.
- Peers come from the configuration, or from PRESENCEs heard by multicast (``discovered``).
- A peer not heard for ``peer_timeout`` is taken over: INIT_TAKEOVER to the others, and
  once all acknowledged (or ``takeover_timeout`` passed) TAKEOVER_SERVER, and its PEs
  are ours. Two registrars taking over the same peer: the higher server ID wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.logger import Logger

from ..logs import hex_id, pool_name
from ..protocol import messages as M
from ..protocol import params as P
from .handlespace import Handlespace, HandlespaceError, PoolEntry

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

log = Logger()
TABLE_CHUNK = 64  # PEs per HANDLE_TABLE_RESPONSE part (keeps each well under 64 KiB)


class Channel(Protocol):
    def send(self, message: M.Message) -> None: ...


@dataclass(frozen=True)
class PeerTimers:
    heartbeat_interval: float = 2.0
    peer_timeout: float = 5.0
    takeover_timeout: float = 5.0


@dataclass(eq=False)
class Peer:
    server_id: int
    channel: Channel
    last_heard: float
    information: P.ServerInformation | None = None
    # HANDLE_TABLE_RESPONSE parts received so far: (handle, PE id) pairs
    table_in_progress: set[tuple[bytes, int]] | None = None


@dataclass(eq=False)
class Takeover:
    target: int
    waiting_for: set[int]
    deadline: IDelayedCall | None = None
    acks: set[int] = field(default_factory=set)


class Peering:
    def __init__(
        self,
        handlespace: Handlespace,
        clock,
        own_information: P.ServerInformation | None = None,
        timers: PeerTimers = PeerTimers(),
        observer=None,
    ) -> None:
        self.handlespace = handlespace
        self.clock = clock
        self.timers = timers
        self.own_information = own_information
        self.observer = observer
        self.peers: dict[int, Peer] = {}
        self.unidentified: set[Channel] = (
            set()
        )  # outbound connections not yet heard from
        self.takeovers: dict[int, Takeover] = {}
        self._heartbeat = None

    @property
    def server_id(self) -> int:
        return self.handlespace.registrar_id

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._heartbeat = self.clock.callLater(0, self._beat)

    def stop(self) -> None:
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        for takeover in self.takeovers.values():
            if takeover.deadline is not None and takeover.deadline.active():
                takeover.deadline.cancel()

    def channel_opened(self, channel: Channel) -> None:
        """An outbound connection to a configured peer is up: introduce ourselves."""
        self.unidentified.add(channel)
        channel.send(self._presence(0, reply_required=True))

    def discovered(self, msg: M.Presence, source: str) -> tuple[str, int] | None:
        """A PRESENCE heard by multicast: the (host, port) to open an ENRP connection to,
        or None. Only the registrar with the lower ID connects, so two registrars that
        hear each other open one connection between them; an unspecified address in the
        Server Information stands for the announce's source."""
        info = msg.server_information
        if (
            msg.sender_id <= self.server_id
            or msg.sender_id in self.peers
            or info is None
        ):
            return None
        if (
            info.server_id != msg.sender_id
            or not isinstance(info.transport, P.TcpTransport)
            or not info.transport.port
        ):
            return None
        return P.reachable_address(info.transport, source), info.transport.port

    def channel_closed(self, channel: Channel) -> None:
        self.unidentified.discard(channel)
        # The peer itself may still be alive on another connection; its timeout decides.

    # ------------------------------------------------------------- messages

    def handle(self, message: M.Message, channel: Channel) -> None:
        sender = cast(Any, message).sender_id  # every ENRP message has one
        if sender == self.server_id or sender == 0:
            return  # our own echo, or nonsense
        now = self.clock.seconds()
        self.unidentified.discard(channel)
        peer = self.peers.get(sender)
        new = peer is None
        if peer is None:
            peer = self.peers[sender] = Peer(sender, channel, now)
            log.info("ENRP peer {peer} is up", peer=hex_id(sender))
            self._peers_changed()
        peer.channel, peer.last_heard = channel, now
        if sender in self.takeovers:  # it was only slow: stop taking it over
            self._abort_takeover(sender)
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(self, message, peer, new)

    def _on_presence(self, msg: M.Presence, peer: Peer, new: bool) -> None:
        if msg.server_information is not None:
            peer.information = msg.server_information
        if new or msg.checksum != self.handlespace.checksum(peer.server_id):
            peer.channel.send(
                M.HandleTableRequest(
                    self.server_id, peer.server_id, own_children_only=True
                )
            )
        if msg.reply_required:
            peer.channel.send(self._presence(peer.server_id))

    def _on_table_request(
        self, msg: M.HandleTableRequest, peer: Peer, new: bool
    ) -> None:
        entries = [
            e
            for e in self.handlespace.entries()
            if not msg.own_children_only or e.home_registrar == self.server_id
        ]
        parts = [
            entries[i : i + TABLE_CHUNK] for i in range(0, len(entries), TABLE_CHUNK)
        ] or [[]]
        for n, part in enumerate(parts):
            grouped: dict[bytes, list[P.PoolElement]] = {}
            for entry in part:
                grouped.setdefault(entry.pool_handle, []).append(entry.enrp_element)
            peer.channel.send(
                M.HandleTableResponse(
                    self.server_id,
                    peer.server_id,
                    tuple((handle, tuple(pes)) for handle, pes in grouped.items()),
                    more_to_send=n < len(parts) - 1,
                )
            )

    def _on_table_response(
        self, msg: M.HandleTableResponse, peer: Peer, new: bool
    ) -> None:
        if msg.reject:
            return
        if peer.table_in_progress is None:
            peer.table_in_progress = set()
        for handle, elements in msg.entries:
            for element in elements:
                if self._learn(handle, element):
                    peer.table_in_progress.add((handle, element.identifier))
        if not msg.more_to_send:
            # What the peer is home for is exactly what it sent: drop the rest.
            keep, peer.table_in_progress = peer.table_in_progress, None
            for entry in list(self.handlespace.entries()):
                if (
                    entry.home_registrar == peer.server_id
                    and (entry.pool_handle, entry.identifier) not in keep
                ):
                    self.handlespace.deregister(entry.pool_handle, entry.identifier)

    def _on_update(self, msg: M.HandleUpdate, peer: Peer, new: bool) -> None:
        if msg.update_action == M.UpdateAction.ADD_PE:
            self._learn(msg.pool_handle, msg.pool_element)
            return
        entry = self.handlespace.get(msg.pool_handle, msg.pool_element.identifier)
        if entry is not None and entry.home_registrar != self.server_id:
            self.handlespace.deregister(msg.pool_handle, entry.identifier)

    def _on_list_request(self, msg: M.ListRequest, peer: Peer, new: bool) -> None:
        servers = [self.own_information] if self.own_information else []
        servers += [
            p.information for p in self.peers.values() if p.information is not None
        ]
        peer.channel.send(
            M.ListResponse(self.server_id, peer.server_id, tuple(servers))
        )

    def _on_init_takeover(self, msg: M.InitTakeover, peer: Peer, new: bool) -> None:
        target = msg.target_id
        if target == self.server_id:  # "you are dead?" No: answer with a presence.
            peer.channel.send(self._presence(peer.server_id))
            return
        ours = self.takeovers.get(target)
        if ours is not None and self.server_id > peer.server_id:
            return  # both of us started; the higher ID goes on, so no ack
        if ours is not None:
            self._abort_takeover(target)
        peer.channel.send(M.InitTakeoverAck(self.server_id, peer.server_id, target))

    def _on_init_takeover_ack(
        self, msg: M.InitTakeoverAck, peer: Peer, new: bool
    ) -> None:
        takeover = self.takeovers.get(msg.target_id)
        if takeover is not None:
            takeover.acks.add(peer.server_id)
            if takeover.waiting_for <= takeover.acks:
                self._complete_takeover(msg.target_id)

    def _on_takeover_server(self, msg: M.TakeoverServer, peer: Peer, new: bool) -> None:
        self._rehome(msg.target_id, peer.server_id)
        self._drop_peer(msg.target_id)

    _handlers: dict[type, Callable[..., None]] = {
        M.Presence: _on_presence,
        M.HandleTableRequest: _on_table_request,
        M.HandleTableResponse: _on_table_response,
        M.HandleUpdate: _on_update,
        M.ListRequest: _on_list_request,
        M.InitTakeover: _on_init_takeover,
        M.InitTakeoverAck: _on_init_takeover_ack,
        M.TakeoverServer: _on_takeover_server,
    }

    def _learn(self, handle: bytes, element: P.PoolElement) -> bool:
        """Take a PE a peer is home for; never let a peer override one homed here."""
        existing = self.handlespace.get(handle, element.identifier)
        if element.home_registrar == self.server_id or (
            existing is not None and existing.owner is not None
        ):
            return False
        try:
            self.handlespace.register(
                handle,
                element,
                now=self.clock.seconds(),
                owner=None,
                home=element.home_registrar,
            )
        except HandlespaceError as err:
            log.warn(
                "peer's PE {pe} in {pool} not taken: {reason}",
                pe=hex_id(element.identifier),
                pool=pool_name(handle),
                reason=err.reason,
            )
            return False
        return True

    # ---------------------------------------------- local changes to peers

    def registered(self, entry: PoolEntry, new: bool) -> None:
        self._broadcast(M.UpdateAction.ADD_PE, entry)

    def removed(self, entry: PoolEntry, why: str) -> None:
        if entry.home_registrar == self.server_id:
            self._broadcast(M.UpdateAction.DEL_PE, entry)

    def refused(self, cause: int) -> None:
        pass

    def _broadcast(self, action: int, entry: PoolEntry) -> None:
        for peer in self.peers.values():
            peer.channel.send(
                M.HandleUpdate(
                    self.server_id,
                    peer.server_id,
                    action,
                    entry.pool_handle,
                    entry.enrp_element,
                )
            )

    # ------------------------------------------------------ heartbeat, takeover

    def announcement(self) -> M.Presence | None:
        """The PRESENCE to multicast: it must say where our ENRP endpoint is."""
        return self._presence(0) if self.own_information is not None else None

    def _presence(self, receiver: int, reply_required: bool = False) -> M.Presence:
        return M.Presence(
            self.server_id,
            receiver,
            self.handlespace.checksum(),
            self.own_information,
            reply_required,
        )

    def _beat(self) -> None:
        now = self.clock.seconds()
        for channel in list(self.unidentified):
            channel.send(self._presence(0, reply_required=True))
        for peer in list(self.peers.values()):
            if now - peer.last_heard >= self.timers.peer_timeout:
                if peer.server_id not in self.takeovers:
                    self._start_takeover(peer.server_id)
            else:
                peer.channel.send(self._presence(peer.server_id))
        self._heartbeat = self.clock.callLater(
            self.timers.heartbeat_interval, self._beat
        )

    def _start_takeover(self, target: int) -> None:
        others = {
            p.server_id
            for p in self.peers.values()
            if p.server_id != target and p.server_id not in self.takeovers
        }
        others = {
            s
            for s in others
            if self.clock.seconds() - self.peers[s].last_heard
            < self.timers.peer_timeout
        }
        log.warn(
            "ENRP peer {peer} silent for {t} s: taking over its PEs",
            peer=hex_id(target),
            t=self.timers.peer_timeout,
        )
        takeover = self.takeovers[target] = Takeover(target, others)
        for server_id in others:
            self.peers[server_id].channel.send(
                M.InitTakeover(self.server_id, server_id, target)
            )
        if not others:
            self._complete_takeover(target)
        else:
            takeover.deadline = self.clock.callLater(
                self.timers.takeover_timeout, self._complete_takeover, target
            )

    def _abort_takeover(self, target: int) -> None:
        takeover = self.takeovers.pop(target, None)
        if (
            takeover is not None
            and takeover.deadline is not None
            and takeover.deadline.active()
        ):
            takeover.deadline.cancel()

    def _complete_takeover(self, target: int) -> None:
        takeover = self.takeovers.pop(target, None)
        if takeover is None:
            return
        if takeover.deadline is not None and takeover.deadline.active():
            takeover.deadline.cancel()
        for peer in self.peers.values():
            if peer.server_id != target:
                peer.channel.send(
                    M.TakeoverServer(self.server_id, peer.server_id, target)
                )
        count = self._rehome(target, self.server_id)
        self._drop_peer(target)
        log.warn("took over {n} PEs of ENRP peer {peer}", n=count, peer=hex_id(target))
        if self.observer is not None:
            self.observer.took_over(target, count)

    def _rehome(self, old: int, new: int) -> int:
        moved = 0
        for entry in self.handlespace.entries():
            if entry.home_registrar == old:
                self.handlespace.set_home(entry, new)
                moved += 1
        return moved

    def _drop_peer(self, server_id: int) -> None:
        if self.peers.pop(server_id, None) is not None:
            self._peers_changed()

    def _peers_changed(self) -> None:
        if self.observer is not None:
            self.observer.peers_changed(len(self.peers))
