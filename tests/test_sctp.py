"""SCTP transport (xenpool.sctp) without kernel SCTP: the framing between what protocols
write and read over TCP and SCTP messages with PPIDs, the transport's reads and writes
against a fake pysctp socket, endpoint strings, and the one line where SCTP is missing.
The real thing runs in the QEMU guest (tests/test_sctp_guest.py)."""

from __future__ import annotations

import errno
import socket

import pytest
import sctp as pysctp
from twisted.internet import endpoints, main
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from xenpool import sctp
from xenpool.protocol import framing
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol import session as S

RESOLUTION = M.encode(M.HandleResolution(b"Xen", 3))
PRESENCE = M.encode(M.Presence(1, 2, 0xFFFF))
HEARTBEAT = S.CheckRunning("web1", 1)


def test_messages_framed_by_their_length_go_out_one_by_one_with_the_protocol_s_ppid():
    data = RESOLUTION + RESOLUTION + RESOLUTION[:5]
    frames, taken = sctp.Framing().messages(data)
    assert frames == [(11, RESOLUTION), (11, RESOLUTION)]
    assert taken == 2 * len(RESOLUTION)  # the partial third stays for later
    assert sctp.Framing(M.ENRP_PPID).messages(PRESENCE) == (
        [(12, PRESENCE)],
        len(PRESENCE),
    )


def test_a_shim_frame_goes_out_as_its_payload_with_the_shim_s_ppid():
    session = framing.frame_message(HEARTBEAT)
    cookie = framing.frame_message(M.Cookie(b"c" * 5))
    frames, taken = sctp.Framing().messages(session + cookie)
    assert frames == [
        (S.XENPOOL_PPID, S.encode(HEARTBEAT)),
        (11, M.encode(M.Cookie(b"c" * 5))),
    ]
    assert taken == len(session) + len(cookie)
    with pytest.raises(ValueError):
        sctp.Framing().messages(b"\x05\x00\x00\x02")  # a length no message has


def test_a_received_message_is_handed_up_as_the_protocol_reads_it_over_tcp():
    assert sctp.Framing.received(11, RESOLUTION, shim=False) == RESOLUTION
    assert sctp.Framing.received(12, PRESENCE, shim=False) == PRESENCE
    # a session (or a lease request on the ASAP port) gets the shim frame back
    assert sctp.Framing.received(
        S.XENPOOL_PPID, S.encode(HEARTBEAT), shim=False
    ) == framing.frame_message(HEARTBEAT)
    assert sctp.Framing.received(
        11, M.encode(M.Cookie(b"c")), shim=True
    ) == framing.frame_message(M.Cookie(b"c"))


class FakeSctpSocket:
    """pysctp's sctpsocket_tcp as the transport uses it; PPIDs in network order, as pysctp
    hands back sinfo_ppid."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []
        self.inbox: list = []
        self.full_after: int | None = None

    def sctp_send(self, payload: bytes, ppid: int) -> int:
        if self.full_after is not None and len(self.sent) >= self.full_after:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.sent.append((ppid, payload))
        return len(payload)

    def sctp_recv(self, maxlen: int):
        item = self.inbox.pop(0)
        if isinstance(item, Exception):
            raise item
        flags, data, ppid = item
        info = pysctp.sndrcvinfo({"ppid": socket.htonl(ppid)})
        return ("10.0.2.15", 0), flags, data, info


class Recorder(Protocol):
    def __init__(self, shim: bool = False, ppid: int | None = None) -> None:
        self.data: list[bytes] = []
        if shim:
            self.sctp_framing = "shim"
        if ppid:
            self.sctp_ppid = ppid

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


class Connection(sctp._SctpConnection):
    def __init__(self, protocol) -> None:
        self.protocol = protocol
        self._wrapped = FakeSctpSocket()


def test_the_transport_sends_each_frame_as_one_sctp_message_and_counts_what_it_took():
    conn = Connection(Recorder(ppid=M.ENRP_PPID))
    assert conn.writeSomeData(PRESENCE + PRESENCE) == 2 * len(PRESENCE)
    assert conn._wrapped.sent == [(12, PRESENCE), (12, PRESENCE)]
    session = Connection(Recorder(shim=True))
    frame = framing.frame_message(HEARTBEAT)
    session._wrapped.full_after = 1  # the socket's buffer fills after one message
    assert session.writeSomeData(frame + frame) == len(
        frame
    )  # the rest stays in Twisted's buffer
    assert session._wrapped.sent == [
        (S.XENPOOL_PPID, S.encode(HEARTBEAT))
    ]  # no shim header on the wire
    assert (
        Connection(Recorder()).writeSomeData(b"\x05\x00\x00\x01")
        is main.CONNECTION_LOST
    )


def test_the_transport_reads_whole_messages_with_their_ppid():
    protocol = Recorder(shim=True)
    conn = Connection(protocol)
    payload = S.encode(HEARTBEAT)
    conn._wrapped.inbox = [
        (pysctp.FLAG_EOR, M.encode(M.Cookie(b"abc")), 11),
        (0, payload[:5], S.XENPOOL_PPID),  # a message in two parts
        (pysctp.FLAG_EOR, payload[5:], S.XENPOOL_PPID),
        (pysctp.FLAG_NOTIFICATION, b"\0" * 8, 0),  # an event: not data
        BlockingIOError(errno.EAGAIN, "nothing"),
        (pysctp.FLAG_EOR, b"", 0),  # the peer closed
    ]
    results = [conn.doRead() for _ in range(6)]
    assert results[:5] == [None] * 5 and results[5] is main.CONNECTION_DONE
    stream = framing.ShimStream()
    for data in protocol.data:
        stream.feed(data)
    assert stream.next_message() == (11, M.Cookie(b"abc"))
    assert stream.next_message() == (S.XENPOOL_PPID, HEARTBEAT)
    asap = Connection(Recorder())
    asap._wrapped.inbox = [
        (pysctp.FLAG_EOR, RESOLUTION, 11),
        ConnectionResetError(errno.ECONNRESET, "reset"),
    ]
    assert asap.doRead() is None and asap.protocol.data == [RESOLUTION]
    assert asap.doRead() is main.CONNECTION_LOST


def test_sctp_endpoint_strings_parse_like_tcp_ones():
    clock = Clock()
    server = endpoints.serverFromString(clock, "sctp:3863:interface=10.0.2.15")
    assert (server.port, server.interface) == (3863, "10.0.2.15")
    client = endpoints.clientFromString(clock, "sctp:host=pr1:port=3863:timeout=2")
    assert (client.host, client.port, client.timeout) == ("pr1", 3863, 2.0)
    assert (endpoints.clientFromString(clock, "sctp:pr1:9901").port) == 9901


@pytest.mark.skipif(sctp.unavailable() is None, reason="this kernel has SCTP")
def test_without_kernel_sctp_an_sctp_endpoint_fails_with_one_line_and_tcp_is_unchanged():
    from twisted.internet import reactor

    failures = []
    endpoints.serverFromString(reactor, "sctp:3863").listen(
        Factory.forProtocol(Protocol)
    ).addErrback(failures.append)
    endpoints.clientFromString(reactor, "sctp:host=10.0.2.15:port=3863").connect(
        Factory.forProtocol(Protocol)
    ).addErrback(failures.append)
    messages = [str(f.value) for f in failures]
    assert len(messages) == 2 and all(
        "\n" not in m and "no SCTP" in m for m in messages
    ), messages
    assert messages[0].startswith("sctp:3863: this kernel has no SCTP")
    from xenpool.registrar.tap import Options

    with pytest.raises(Exception) as refused:
        Options().parseOptions(["--asap", "sctp:3863", "--state-dir", "/tmp"])
    assert str(refused.value).startswith("endpoint sctp:3863: this kernel has no SCTP")
    assert "\n" not in str(refused.value)
    Options().parseOptions(
        ["--asap", "tcp:3863", "--state-dir", "/tmp"]
    )  # TCP as before


def test_a_pe_reached_over_sctp_is_connected_to_over_sctp(monkeypatch):
    from xenpool.asap_client import TcpPoolAccess

    made = []

    class Endpoint:
        def __init__(self, reactor, host, port, timeout) -> None:
            made.append((host, port, timeout))

        def connect(self, factory):
            return factory

    monkeypatch.setattr(sctp, "SctpClientEndpoint", Endpoint)
    access = TcpPoolAccess(Clock(), registrars=None, pe_connect_timeout_s=1.5)
    element = P.PoolElement(
        1,
        2,
        3000,
        P.SctpTransport(5001, ("10.0.2.15",)),
        P.PoolPolicy.make(P.PolicyType.ROUND_ROBIN),
    )
    factory = access.connect(element, lambda message: None)
    assert made == [("10.0.2.15", 5001, 1.5)]
    assert factory.buildProtocol(None).sctp_framing == "shim"


def test_a_client_endpoint_s_wrapped_protocol_keeps_its_ppid_and_framing():
    from twisted.application._client_service import _ReconnectingProtocolProxy
    from twisted.internet import defer
    from twisted.internet.endpoints import _WrappingProtocol

    enrp = Recorder(ppid=M.ENRP_PPID)
    # an outbound ENRP association: ClientService's proxy inside the endpoint's wrapper
    conn = Connection(
        _WrappingProtocol(
            defer.Deferred(), _ReconnectingProtocolProxy(enrp, lambda: None)
        )
    )
    assert conn.writeSomeData(PRESENCE) == len(PRESENCE)
    assert conn._wrapped.sent == [(12, PRESENCE)]
    session = Recorder(shim=True)
    conn = Connection(_WrappingProtocol(defer.Deferred(), session))
    conn._wrapped.inbox = [(pysctp.FLAG_EOR, M.encode(M.Cookie(b"abc")), 11)]
    assert conn.doRead() is None
    assert session.data == [framing.frame_message(M.Cookie(b"abc"))]
