"""Finding registrars: a configured list, and the SERVER_ANNOUNCEs registrars send by
UDP multicast (RFC 5352, section 3.6; rsplib announces once a second to 239.0.0.50:3863).

``AnnouncedRegistrars`` is sans-IO: it is told what was heard and when. The Twisted
parts are a datagram protocol that feeds it (``AnnounceListener``), a service that
announces a registrar (``Announcer``), and the endpoints PEs and PUs connect through
(``Registrars``, ``FailoverEndpoint``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.application import internet, service
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IMulticastTransport, IStreamClientEndpoint
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from .config import Setting, ipv4_address
from .logs import hex_id
from .protocol import messages as M
from .protocol import params as P
from .protocol.errors import ProtocolError

log = Logger()

DEFAULT_ANNOUNCE_GROUP = "239.0.0.50"
DEFAULT_ANNOUNCE_PORT = 3863
DEFAULT_ANNOUNCE_INTERVAL_S = 1.0  # rsplib's REGISTRAR_DEFAULT_SERVER_ANNOUNCE_CYCLE
DEFAULT_ANNOUNCE_TIMEOUT_S = 5.0  # a registrar not heard for this long is dropped
DEFAULT_REGISTRAR = "tcp:host=127.0.0.1:port=3863"


def multicast_address(text: str) -> tuple[str, int]:
    """``GROUP:PORT`` (an IPv4 multicast group), e.g. ``239.0.0.50:3863``."""
    group, sep, port = text.rpartition(":")
    if not sep:
        group, port = text, str(DEFAULT_ANNOUNCE_PORT)
    try:
        address = ipaddress.IPv4Address(group)
    except ValueError:
        raise ValueError(
            f"expected GROUP:PORT with an IPv4 multicast group, got {text!r}"
        ) from None
    if not address.is_multicast:
        raise ValueError(f"{group} is not a multicast group (224.0.0.0/4)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1..65535, got {port!r}")
    return group, int(port)


@dataclass
class _Heard:
    host: str
    port: int
    last: float


class AnnouncedRegistrars:
    """The registrars heard announcing, by registrar ID, each until ``timeout_s`` after
    its last announce. An announce's unspecified address (0.0.0.0) stands for the
    address it came from."""

    def __init__(self, timeout_s: float = DEFAULT_ANNOUNCE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._heard: dict[int, _Heard] = {}

    def heard(self, announce: M.ServerAnnounce, source: str, now: float) -> bool:
        """Take one announce; False if it offers no TCP transport (nothing to reach)."""
        for transport in announce.transports:
            if isinstance(transport, P.TcpTransport) and transport.port:
                host = P.reachable_address(transport, source)
                if announce.server_id not in self._heard:
                    log.info(
                        "registrar {id} announced at {host}:{port}",
                        id=hex_id(announce.server_id),
                        host=host,
                        port=transport.port,
                    )
                self._heard[announce.server_id] = _Heard(host, transport.port, now)
                return True
        return False

    def alive(self, now: float) -> list[tuple[str, int]]:
        """(host, port) of every registrar heard within the timeout, longest known first."""
        for server_id in [
            i for i, h in self._heard.items() if now - h.last > self.timeout_s
        ]:
            log.info("registrar {id} no longer announced", id=hex_id(server_id))
            del self._heard[server_id]
        return [(h.host, h.port) for h in self._heard.values()]


class AnnounceListener(DatagramProtocol):
    """Joins the announce group and feeds what it hears to ``registrars``. A datagram
    that is not a valid SERVER_ANNOUNCE is logged and dropped."""

    transport: IMulticastTransport  # set before any callback (listenMulticast)

    def __init__(
        self, registrars: AnnouncedRegistrars, group: str, clock, interface: str = ""
    ) -> None:
        self.registrars = registrars
        self.group = group
        self.clock = clock
        self.interface = interface

    def startProtocol(self) -> None:
        self.transport.joinGroup(self.group, self.interface or "")

    def datagramReceived(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            message = M.decode(data, M.ASAP_PPID)
        except ProtocolError as err:
            log.info(
                "ignoring a bad announce from {host}: {err}",
                host=address[0],
                err=str(err),
            )
            return
        if not isinstance(message, M.ServerAnnounce):
            log.info(
                "ignoring {kind} on the announce group from {host}",
                kind=type(message).__name__,
                host=address[0],
            )
        elif not self.registrars.heard(message, address[0], self.clock.seconds()):
            log.info(
                "ignoring an announce without a TCP transport from {host}",
                host=address[0],
            )


class Announcer(service.Service):
    """Sends this registrar's SERVER_ANNOUNCE to ``group:port`` every ``interval_s``.

    ``transports()`` gives the ASAP transports to announce; it is asked each time, so
    ports chosen by the system at start-up are announced once they are known."""

    def __init__(
        self,
        reactor,
        registrar_id: int,
        transports,
        group: str,
        port: int,
        *,
        interval_s: float = DEFAULT_ANNOUNCE_INTERVAL_S,
        interface: str = "",
        ttl: int = 1,
    ) -> None:
        self.reactor = reactor
        self.registrar_id = registrar_id
        self.transports = transports
        self.destination = (group, port)
        self.interval_s = interval_s
        self.interface = interface
        self.ttl = ttl
        self._port: IMulticastTransport | None = None
        self._loop = LoopingCall(self.announce)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._port = self.reactor.listenMulticast(
            0, DatagramProtocol(), interface=self.interface or ""
        )
        self._port.setTTL(self.ttl)
        if self.interface:
            self._port.setOutgoingInterface(self.interface)
        self._loop.start(self.interval_s, now=True)

    def announce(self) -> None:
        transports = tuple(self.transports())
        if transports:
            assert self._port is not None  # the loop runs once startService listened
            self._port.write(
                M.encode(M.ServerAnnounce(self.registrar_id, transports)),
                self.destination,
            )

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        port, self._port = self._port, None
        super().stopService()
        return port.stopListening() if port is not None else None


class Registrars:
    """The registrars a PE or PU may talk to: the configured ones in their order, then
    those heard announcing (if ``announced`` is given)."""

    def __init__(
        self,
        reactor,
        configured: list[str],
        announced: AnnouncedRegistrars | None = None,
    ) -> None:
        self.reactor = reactor
        self.configured = [endpoints.clientFromString(reactor, d) for d in configured]
        self.announced = announced

    def endpoints(self) -> list:
        if self.announced is None:
            return list(self.configured)
        heard = self.announced.alive(self.reactor.seconds())
        return self.configured + [
            endpoints.TCP4ClientEndpoint(self.reactor, host, port)
            for host, port in heard
        ]


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Connects to the first registrar that answers, trying the next one after a
    failure, so a PE whose home registrar is gone registers at another."""

    def __init__(self, registrars: Registrars) -> None:
        self.registrars = registrars
        self.index = 0

    def connect(self, factory):
        candidates = self.registrars.endpoints()
        if not candidates:
            return defer.fail(
                error.ConnectError(
                    string="no registrar configured, and none announced yet"
                )
            )
        d = candidates[self.index % len(candidates)].connect(factory)

        def failed(failure):
            self.index += 1
            return failure

        return d.addErrback(failed)


def listener_settings() -> list[Setting]:
    """The options of a PE or PU that listens for announces (after its ``--registrar``)."""
    return [
        Setting(
            "registrar-announce",
            None,
            multicast_address,
            "also use the registrars heard announcing on GROUP:PORT, e.g. 239.0.0.50:3863",
        ),
        Setting(
            "announce-interface",
            "",
            ipv4_address,
            "the local IPv4 address whose interface announces are heard on",
        ),
    ]


def registrars(
    reactor,
    configured: list[str],
    announce: tuple[str, int] | None,
    interface: str = "",
) -> tuple[Registrars, service.Service | None]:
    """The registrars a PE or PU uses: ``configured`` (by default the local one, unless it
    listens for announces), then the announced ones; and the service that listens."""
    if announce is None:
        return Registrars(reactor, configured or [DEFAULT_REGISTRAR]), None
    announced = AnnouncedRegistrars()
    protocol = AnnounceListener(announced, announce[0], reactor, interface)
    return Registrars(reactor, configured, announced), internet.MulticastServer(
        announce[1], protocol, listenMultiple=True
    )
