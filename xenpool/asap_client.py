"""The ASAP client a pool user and a pool element share: registrars over ASAP, PEs over the session shim (TCP).

A PU resolves its pool and holds sessions with PEs through ``TcpPoolAccess``; a PE uses the
same client to ask the pool about its peers (claims, rebalancing, moves, self-fencing
membership). A session's ``deliver`` callback gets every message the PE sends, then
``LOST`` once the session ended.
"""

from __future__ import annotations

import typing
from functools import partial

from twisted.internet import defer, endpoints
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from .protocol import framing
from .protocol import messages as M
from .protocol import params as P
from .protocol import session as S
from .protocol.errors import ProtocolError

log = Logger()
LOST = object()  # delivered when a session ends


class _OneRequest(Protocol):
    """Sends one ASAP request to a registrar and waits for the answer (or just sends)."""

    transport: ITCPTransport  # set before any callback (Protocol.makeConnection)

    def __init__(self, request: M.Message, answer: defer.Deferred | None) -> None:
        self.request, self.answer = request, answer
        self.stream = framing.RSerPoolStream(M.ASAP_PPID)

    def connectionMade(self) -> None:
        self.transport.write(M.encode(self.request))
        if self.answer is None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
            message = self.stream.next_message()
        except ProtocolError as err:
            self._done(err)
            return
        if message is not None:
            self._done(message)

    def _done(self, result) -> None:
        answer, self.answer = self.answer, None
        self.transport.loseConnection()
        if answer is not None:
            (answer.errback if isinstance(result, Exception) else answer.callback)(
                result
            )

    def connectionLost(self, reason=None) -> None:
        if self.answer is not None:
            answer, self.answer = self.answer, None
            answer.errback(
                ConnectionError("registrar closed the connection without answering")
            )


class PuCredential:
    """A PU's name and secret (``--pu-name``, ``--pu-secret-file``): each create, cookie
    echo and stop it sends a PE is preceded by a PuProof of them (xenpool/pe/access.py)."""

    def __init__(self, name: str, secret: bytes, clock) -> None:
        self.name, self.secret, self.clock = name, secret, clock

    def proof(self, message: object) -> S.PuProof:
        import secrets

        encoded = (
            M.encode(message)
            if isinstance(message, M.Message)
            else S.encode(typing.cast(S.SessionMessage, message))
        )
        issued_ms = round(self.clock.seconds() * 1000)
        nonce = secrets.randbits(32)
        return S.PuProof(
            self.name,
            issued_ms,
            nonce,
            S.pu_proof_mac(self.secret, self.name, issued_ms, nonce, encoded),
        )


_PROVEN = (S.CreateServer, M.CookieEcho, S.StopServer)  # what a PU proves itself for


class _PeSession(Protocol):
    transport: FileDescriptor  # TCP or SCTP; None until connected (send checks)
    sctp_framing = "shim"  # over SCTP the PPID replaces the shim (xenpool.sctp)

    def __init__(self, deliver, credential: PuCredential | None = None) -> None:
        self.deliver = deliver
        self.credential = credential
        self.stream = framing.ShimStream()

    def send(self, message: object) -> None:
        if self.transport is not None and self.transport.connected:
            if self.credential is not None and isinstance(message, _PROVEN):
                self.transport.write(
                    framing.frame_message(self.credential.proof(message))
                )
            self.transport.write(framing.frame_message(message))

    def close(self) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
            while (item := self.stream.next_message()) is not None:
                self.deliver(item[1])
        except ProtocolError as err:
            log.warn("bad data from the PE: {err}", err=str(err))
            if err.fatal:
                self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.deliver(LOST)


class RegistrarList(typing.Protocol):
    """Where the registrars are (``discovery.Registrars``): endpoints to try in order."""

    def endpoints(self) -> list: ...


class TcpPoolAccess:
    """PoolAccess over TCP: registrars tried in order (configured, then announced), PEs
    at their user transport. ``timeout_s`` bounds a registrar's answer (and a PE's connect
    unless ``pe_connect_timeout_s`` is given: a PU sets it short, every partitioned PE
    in a round costs it that long)."""

    def __init__(
        self,
        reactor,
        registrars: RegistrarList,
        timeout_s: float = 5.0,
        pe_connect_timeout_s: float | None = None,
        pe_tls=None,
        credential: PuCredential | None = None,
    ) -> None:
        """``pe_tls``: a xenpool.tls.PeTls, PEs' session ports are reached over TLS;
        ``credential``: this PU proves who it is with it."""
        self.reactor = reactor
        self.pe_tls = pe_tls
        self.credential = credential
        self.registrars = registrars
        self.timeout_s = timeout_s
        self.pe_connect_timeout_s = (
            timeout_s if pe_connect_timeout_s is None else pe_connect_timeout_s
        )

    async def ask(self, request: M.Message) -> M.Message:
        """One ASAP request, to each registrar in turn until one answers; its answer."""
        errors = []
        for endpoint in self.registrars.endpoints():
            answer: defer.Deferred = defer.Deferred()
            try:
                await endpoint.connect(
                    Factory.forProtocol(partial(_OneRequest, request, answer))
                )
                timer = self.reactor.callLater(self.timeout_s, answer.cancel)
                try:
                    return await answer
                finally:
                    if timer.active():
                        timer.cancel()
            except Exception as err:
                errors.append(str(err) or type(err).__name__)
        raise ConnectionError(
            "; ".join(errors) or "no registrar configured, and none announced yet"
        )

    def resolve(
        self, pool_handle: bytes, items: int, ram_mb: int | None = None
    ) -> defer.Deferred:
        async def resolve() -> list[P.PoolElement]:
            answer = await self.ask(M.HandleResolution(pool_handle, items, ram_mb))
            if not isinstance(answer, M.HandleResolutionResponse):
                raise ConnectionError(f"unexpected answer {type(answer).__name__}")
            return list(answer.pool_elements)

        return defer.Deferred.fromCoroutine(resolve())

    def connect(self, element: P.PoolElement, deliver) -> defer.Deferred:
        transport = element.user_transport
        if isinstance(transport, P.SctpTransport):
            from .sctp import SctpClientEndpoint

            endpoint: IStreamClientEndpoint = SctpClientEndpoint(
                self.reactor,
                transport.addresses[0],
                transport.port,
                timeout=self.pe_connect_timeout_s,
            )
            return endpoint.connect(
                Factory.forProtocol(lambda: _PeSession(deliver, self.credential))
            )
        if not isinstance(transport, P.TcpTransport):
            return defer.fail(
                ConnectionError(
                    f"PE offers {type(transport).__name__}, this PU speaks TCP and SCTP"
                )
            )
        session = Factory.forProtocol(lambda: _PeSession(deliver, self.credential))
        if self.pe_tls is not None:
            return self.pe_tls.endpoint(
                self.reactor,
                transport.addresses[0],
                transport.port,
                self.pe_connect_timeout_s,
            ).connect(session)
        kind = (
            endpoints.TCP6ClientEndpoint
            if ":" in transport.addresses[0]
            else endpoints.TCP4ClientEndpoint
        )
        endpoint = kind(
            self.reactor,
            transport.addresses[0],
            transport.port,
            timeout=self.pe_connect_timeout_s,
        )
        return endpoint.connect(session)

    def report_unreachable(self, pool_handle: bytes, identifier: int) -> None:
        request = M.EndpointUnreachable(pool_handle, identifier)
        for endpoint in self.registrars.endpoints()[:1]:
            endpoint.connect(
                Factory.forProtocol(lambda: _OneRequest(request, None))
            ).addErrback(lambda f: None)
