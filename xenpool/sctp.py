"""SCTP as a Twisted transport: one-to-one (TCP-style) sockets through pysctp, each message
sent and received as one SCTP message with its payload protocol identifier (PPID).

Endpoints: ``sctp:3863`` / ``sctp:port=3863:interface=10.0.0.1`` (server) and
``sctp:host=pr1:port=3863`` / ``sctp:pr1:3863`` (client), through the endpoint string
plugin in ``twisted/plugins/xenpool_sctp.py``, wherever xenpool takes a ``tcp:`` endpoint.

The protocols above stay what they are over TCP; the transport translates:

* A protocol writes what it writes over TCP: ASAP/ENRP messages framed by their own length
  field, or the PE<->PU session's shim frames {PPID, length, payload}. Each becomes one SCTP
  message: a message as it is with the protocol's ``sctp_ppid`` (11 ASAP by default, 12 for
  ENRP), a shim frame's payload with the shim's PPID (no shim header on the wire).
* Each SCTP message received is handed up as the protocol reads it over TCP: an ASAP/ENRP
  message as it is, or, for a protocol with ``sctp_framing = "shim"`` (the session) and for
  any other PPID, as a shim frame rebuilt from the PPID.

``Framing`` is that translation, sans-IO; the rest wires it to Twisted's TCP classes with
the socket calls swapped for ``sctp_send``/``sctp_recv``. Where the kernel has no SCTP an
endpoint fails with ``SctpUnavailable``, one line saying so.
"""

from __future__ import annotations

import errno
import functools
import socket
import struct

from twisted.internet import defer, main, tcp
from twisted.internet.endpoints import _WrappingFactory
from twisted.internet.interfaces import (
    IProtocol,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from .protocol import messages as M

SHIM = struct.Struct("!II")
RSERPOOL_PPIDS = (M.ASAP_PPID, M.ENRP_PPID)
# First byte of a shim frame: a PPID below 2**24 (11, 12) or xenpool's ("XPL1", 0x58...). An
# ASAP/ENRP message starts with its type (1..0x0e), so the two never collide.
_SHIM_FIRST_BYTES = frozenset((0x00, 0x58))
MAX_SCTP_MESSAGE = 0x10000 + SHIM.size


class SctpUnavailable(OSError):
    """This machine cannot open an SCTP socket (no kernel SCTP, or no pysctp)."""

    def __str__(self) -> str:
        return str(self.strerror)


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why SCTP cannot be used here, or None when it can."""
    try:
        import sctp  # noqa: F401 - pysctp
    except ImportError as err:
        return f"pysctp is not installed ({err})"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError as err:
        return f"this kernel has no SCTP ({err.strerror or err}); load its sctp module or use a tcp: endpoint"
    return None


def check(descriptions, what: str = "endpoint") -> None:
    """Raise ValueError (one line) if any endpoint string is ``sctp:`` and SCTP is unavailable."""
    for description in descriptions:
        if str(description).startswith("sctp:") and (reason := unavailable()):
            raise ValueError(f"{what} {description}: {reason}")


# ------------------------------------------------------------------ sans-IO framing


class Framing:
    """Between the bytes a protocol writes and reads over TCP and SCTP messages with PPIDs."""

    def __init__(self, default_ppid: int = M.ASAP_PPID) -> None:
        self.default_ppid = default_ppid

    def messages(self, data) -> tuple[list[tuple[int, bytes]], int]:
        """The whole frames at the start of ``data`` as (PPID, payload), and how many bytes
        of ``data`` they took. Raises ValueError for bytes that are no frame at all."""
        out: list[tuple[int, bytes]] = []
        view = memoryview(data)
        pos, size = 0, len(view)
        while size - pos >= 4:
            if view[pos] in _SHIM_FIRST_BYTES:
                if size - pos < SHIM.size:
                    break
                ppid, length = SHIM.unpack_from(view, pos)
                end = pos + SHIM.size + length
                if end > size:
                    break
                out.append((ppid, bytes(view[pos + SHIM.size : end])))
            else:
                length = (view[pos + 2] << 8) | view[pos + 3]
                if length < 4:
                    raise ValueError(f"a message of length {length} at byte {pos}")
                end = pos + length
                if end > size:
                    break
                out.append((self.default_ppid, bytes(view[pos:end])))
            pos = end
        return out, pos

    @staticmethod
    def received(ppid: int, payload: bytes, shim: bool) -> bytes:
        """What the protocol reads for one SCTP message: the ASAP/ENRP message itself, or
        for a session protocol (and any other PPID) the shim frame standing in for it."""
        if not shim and ppid in RSERPOOL_PPIDS:
            return payload
        return SHIM.pack(ppid, len(payload)) + payload


# -------------------------------------------------------------------- Twisted side


def _sctp_socket(raw: socket.socket):
    """pysctp's one-to-one wrapper around ``raw``, told to report each message's PPID."""
    import sctp

    wrapped = sctp.sctpsocket_tcp(raw.family, raw)
    wrapped.events.data_io = True  # sndrcvinfo (the PPID) with every message
    wrapped.events.flush()
    return wrapped


def _new_socket(family: int) -> socket.socket:
    reason = unavailable()
    if reason:
        raise SctpUnavailable(errno.EPROTONOSUPPORT, reason)
    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    s.setblocking(False)
    return s


def protocol_setting(protocol, name: str, default):
    """``name`` (``sctp_ppid``, ``sctp_framing``) of the protocol a connection carries. A
    client endpoint's connection carries a wrapper (Twisted's endpoint ``_WrappingProtocol``,
    ``ClientService``'s proxy, ``policies.ProtocolWrapper``) that does not pass attributes
    on: look through it, or an outbound ENRP association would send ENRP on ASAP's PPID and
    a PU's session would read ASAP messages without their shim frame."""
    for _depth in range(8):
        value = getattr(protocol, name, None)
        if value is not None:
            return value
        inner = getattr(protocol, "_wrappedProtocol", None) or getattr(
            protocol, "wrappedProtocol", None
        )
        if inner is None or inner is protocol:
            break
        protocol = inner
    return default


class _SctpConnection:
    """Mixed into Twisted's TCP connection classes: reads and writes whole SCTP messages."""

    protocol: IProtocol  # set by tcp.Connection, the class this mixes into

    sctp = True
    _wrapped = None
    _partial = b""

    @property
    def _sk(self):
        if self._wrapped is None:
            self._wrapped = _sctp_socket(self.socket)
        return self._wrapped

    def _framing(self) -> Framing:
        return Framing(protocol_setting(self.protocol, "sctp_ppid", M.ASAP_PPID))

    def doRead(self):
        import sctp

        try:
            _source, flags, data, info = self._sk.sctp_recv(MAX_SCTP_MESSAGE)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return None
            return main.CONNECTION_LOST
        if flags & sctp.FLAG_NOTIFICATION:
            return None
        if not data:
            return main.CONNECTION_DONE
        if not flags & sctp.FLAG_EOR:  # a part of a larger message: keep it
            self._partial += data
            if len(self._partial) > MAX_SCTP_MESSAGE:
                return main.CONNECTION_LOST
            return None
        payload, self._partial = self._partial + data, b""
        shim = protocol_setting(self.protocol, "sctp_framing", "") == "shim"
        self.protocol.dataReceived(
            Framing.received(socket.ntohl(info.ppid), payload, shim)
        )
        return None

    def writeSomeData(self, data):
        try:
            frames, _taken = self._framing().messages(data)
        except ValueError:
            return main.CONNECTION_LOST
        if not frames:
            return main.CONNECTION_LOST  # a protocol wrote less than a whole frame
        written = 0
        for ppid, payload in frames:
            try:
                self._sk.sctp_send(payload, ppid=ppid)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                    break
                return main.CONNECTION_LOST
            written += self._frame_size(data, written)
        return written

    @staticmethod
    def _frame_size(data, pos: int) -> int:
        view = memoryview(data)
        if view[pos] in _SHIM_FIRST_BYTES:
            return SHIM.size + SHIM.unpack_from(view, pos)[1]
        return (view[pos + 2] << 8) | view[pos + 3]


class SctpServer(_SctpConnection, tcp.Server):
    """One accepted SCTP association."""


class SctpClient(_SctpConnection, tcp.Client):
    """One SCTP association this side opened."""

    def createInternetSocket(self):
        return _new_socket(self.addressFamily)


class SctpPort(tcp.Port):
    """A listening one-to-one SCTP socket."""

    sctp = True
    transport = SctpServer

    def createInternetSocket(self):
        s = _new_socket(self.addressFamily)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s


class SctpConnector(tcp.Connector):
    def _makeTransport(self):
        return SctpClient(self.host, self.port, self.bindAddress, self, self.reactor)


@implementer(IStreamServerEndpoint)
class SctpServerEndpoint:
    def __init__(
        self, reactor, port: int, backlog: int = 50, interface: str = ""
    ) -> None:
        self.reactor, self.port, self.backlog, self.interface = (
            reactor,
            port,
            backlog,
            interface,
        )

    def listen(self, factory) -> defer.Deferred:
        reason = unavailable()
        if reason:
            return defer.fail(
                SctpUnavailable(errno.EPROTONOSUPPORT, f"sctp:{self.port}: {reason}")
            )
        return defer.execute(self._listen, factory)

    def _listen(self, factory) -> SctpPort:
        port = SctpPort(self.port, factory, self.backlog, self.interface, self.reactor)
        port.startListening()
        return port

    def __repr__(self) -> str:
        return f"sctp:{self.port}" + (
            f":interface={self.interface}" if self.interface else ""
        )


@implementer(IStreamClientEndpoint)
class SctpClientEndpoint:
    def __init__(
        self, reactor, host: str, port: int, timeout: float = 30, bindAddress=None
    ) -> None:
        self.reactor, self.host, self.port, self.timeout, self.bindAddress = (
            reactor,
            host,
            port,
            timeout,
            bindAddress,
        )

    def connect(self, factory) -> defer.Deferred:
        reason = unavailable()
        if reason:
            return defer.fail(
                SctpUnavailable(
                    errno.EPROTONOSUPPORT,
                    f"sctp:host={self.host}:port={self.port}: {reason}",
                )
            )
        wrapping = _WrappingFactory(factory)
        SctpConnector(
            self.host, self.port, wrapping, self.timeout, self.bindAddress, self.reactor
        ).connect()
        return wrapping._onConnection

    def __repr__(self) -> str:
        return f"sctp:host={self.host}:port={self.port}"


def server_endpoint(
    reactor, *args, port=None, backlog=50, interface=""
) -> SctpServerEndpoint:
    """``sctp:PORT[:interface=ADDR][:backlog=N]`` (the endpoint string's arguments)."""
    if args:
        port = args[0]
    if port is None:
        raise ValueError("sctp: needs a port, e.g. sctp:3863")
    return SctpServerEndpoint(reactor, int(port), int(backlog), interface)


def client_endpoint(
    reactor, *args, host=None, port=None, timeout=30, bindAddress=None
) -> SctpClientEndpoint:
    """``sctp:host=HOST:port=PORT[:timeout=S]`` or ``sctp:HOST:PORT``."""
    if args:
        host = args[0]
        if len(args) > 1:
            port = args[1]
    if host is None or port is None:
        raise ValueError("sctp: needs a host and a port, e.g. sctp:host=pr1:port=3863")
    if isinstance(bindAddress, str):
        bindAddress = (bindAddress, 0)
    return SctpClientEndpoint(reactor, host, int(port), float(timeout), bindAddress)
