"""eager_write.write: at once on an idle plain TCP connection, Twisted's queue otherwise."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from xenpool import eager_write


@pytest.fixture
def connection():
    """A real Twisted TCP server connection (on a socketpair) under a MemoryReactor: what
    it sends at once is readable at the peer now; what it queues shows as a writer."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    reactor = MemoryReactor()
    protocol = Protocol()
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)
    protocol.makeConnection(transport)
    yield transport, peer, reactor
    ours.close()
    peer.close()


def received(peer: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def test_idle_connection_sends_at_once_without_registering_for_writing(connection):
    transport, peer, reactor = connection
    eager_write.write(transport, b"answer")
    assert received(peer) == b"answer"
    assert transport not in reactor.getWriters()
    assert transport.dataBuffer == b"" and not transport._tempDataLen


def test_queued_data_goes_first(connection):
    transport, peer, reactor = connection
    transport.write(b"first ")  # queued, waiting for the reactor
    eager_write.write(transport, b"second")
    assert received(peer) == b""
    assert transport in reactor.getWriters()
    transport.doWrite()
    assert received(peer) == b"first second"


def test_what_the_kernel_does_not_take_is_queued_in_order(connection):
    transport, peer, reactor = connection
    big = bytes(range(256)) * (1 << 14)  # 4 MB: more than a socket buffer holds
    eager_write.write(transport, big)
    assert transport in reactor.getWriters()
    got = received(peer)
    assert 0 < len(got) < len(big)
    while len(got) < len(big):
        transport.doWrite()
        got += received(peer)
    assert got == big


def test_closing_or_tls_connection_uses_twisted_write(connection):
    transport, peer, reactor = connection
    transport.TLS = True
    # With pyOpenSSL installed (twisted[tls]) Twisted's own write on a TLS connection goes
    # through its TLS protocol, which this plain socket has not: record that write instead.
    written: list[bytes] = []
    transport.write = written.append
    eager_write.write(transport, b"x")
    assert received(peer) == b"" and written == [b"x"]
    del transport.write
    transport.TLS = False
    transport.write(b"x")
    transport.doWrite()
    assert received(peer) == b"x"
    transport.loseConnection()
    eager_write.write(transport, b"late")
    assert received(peer) == b""


def test_other_transports_get_an_ordinary_write():
    transport = StringTransport()
    eager_write.write(transport, b"answer")
    assert transport.value() == b"answer"


def test_a_twisted_without_the_buffer_attributes_gets_an_ordinary_write():
    # The fallback for a Twisted whose FileDescriptor lacks what _idle reads (here: offset).
    class OtherTwistedServer(tcp.Server):
        @property
        def offset(self):
            raise AttributeError("offset")

        @offset.setter
        def offset(self, value):
            pass

    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        peer.setblocking(False)
        reactor = MemoryReactor()
        protocol = Protocol()
        transport = OtherTwistedServer(
            ours, protocol, ("127.0.0.1", 1), None, 1, reactor
        )
        protocol.makeConnection(transport)
        eager_write.write(transport, b"answer")
        assert received(peer) == b""  # queued by transport.write, not sent at once
        assert transport in reactor.getWriters()
    finally:
        ours.close()
        peer.close()
