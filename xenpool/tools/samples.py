"""One valid example of every ASAP, ENRP and application message.

Used by the demo, the benchmarks and the fuzzer (as its seed corpus).
"""

from __future__ import annotations

from ..protocol import messages as M
from ..protocol import params as P
from ..protocol import session as S
from ..protocol.errors import Cause


def pool_element(
    identifier: int, port: int = 5000, load: float = 0.25
) -> P.PoolElement:
    return P.PoolElement(
        identifier=identifier,
        home_registrar=0x0A0A0A0A,
        registration_life=300_000,
        user_transport=P.TcpTransport(
            port, ("127.0.0.1",), P.TransportUse.DATA_PLUS_CONTROL
        ),
        policy=P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=P.load_to_wire(load)),
    )


def handle_resolution_response(count: int = 3) -> M.HandleResolutionResponse:
    return M.HandleResolutionResponse(
        b"Xen",
        tuple(pool_element(0x1000 + i, 5000 + i, 0.1 * i) for i in range(count)),
        policy=P.PoolPolicy.make(P.PolicyType.LEAST_USED),
    )


def all_messages() -> list[M.Message]:
    pe = pool_element(0x11223344)
    with_asap = P.PoolElement(
        pe.identifier,
        pe.home_registrar,
        pe.registration_life,
        pe.user_transport,
        pe.policy,
        P.TcpTransport(3863, ("127.0.0.1",)),
    )
    server = P.ServerInformation(
        0x0A0A0A0A, P.SctpTransport(9901, ("10.0.0.1", "fd00::1"))
    )
    error = P.OperationError.single(Cause.UNKNOWN_POOL_HANDLE)
    return [
        M.Registration(b"Xen", pe),
        M.Deregistration(b"Xen", pe.identifier),
        M.RegistrationResponse(b"Xen", pe.identifier),
        M.DeregistrationResponse(b"Xen", pe.identifier, error),
        M.HandleResolution(b"Xen", items=3),
        handle_resolution_response(),
        M.EndpointKeepAlive(0xDEADBEEF, b"Xen", pe.identifier, home=True),
        M.EndpointKeepAliveAck(b"Xen", pe.identifier),
        M.EndpointUnreachable(b"Xen", pe.identifier),
        M.ServerAnnounce(0x0A0A0A0A, (P.TcpTransport(3863, ("127.0.0.1",)),)),
        M.Cookie(b"opaque session state"),
        M.CookieEcho(b"opaque session state"),
        M.BusinessCard(b"Xen", (pe,), P.PoolPolicy.make(P.PolicyType.LEAST_USED)),
        M.AsapError(error),
        M.Presence(0x0A0A0A0A, 0x0B0B0B0B, 0xABCD, server, reply_required=True),
        M.HandleTableRequest(0x0A0A0A0A, 0x0B0B0B0B, own_children_only=True),
        M.HandleTableResponse(
            0x0B0B0B0B, 0x0A0A0A0A, ((b"Xen", (with_asap,)),), more_to_send=True
        ),
        M.HandleUpdate(
            0x0A0A0A0A, 0x0B0B0B0B, M.UpdateAction.ADD_PE, b"Xen", with_asap
        ),
        M.ListRequest(0x0A0A0A0A, 0x0B0B0B0B),
        M.ListResponse(0x0B0B0B0B, 0x0A0A0A0A, (server,)),
        M.InitTakeover(0x0A0A0A0A, 0x0B0B0B0B, 0x0C0C0C0C),
        M.InitTakeoverAck(0x0B0B0B0B, 0x0A0A0A0A, 0x0C0C0C0C),
        M.TakeoverServer(0x0A0A0A0A, 0x0B0B0B0B, 0x0C0C0C0C),
        M.EnrpError(
            0x0A0A0A0A,
            0x0B0B0B0B,
            P.OperationError.single(Cause.NON_UNIQUE_PE_IDENTIFIER),
        ),
    ]


def all_session_messages() -> list[S.SessionMessage]:
    return [
        S.CreateServer("web1", "nbd://san:10809/web1", ("10.0.5.1",), 300, 1),
        S.CreateResult("web1", S.ResultCode.STARTED, 512_000, "started on pe1"),
        S.CreateResult(
            "web1", S.ResultCode.NO_RAM, 100_000, "needs 307200 KB, 100000 KB free"
        ),
        S.CheckRunning("web1", 1),
        S.CheckRunningResponse("web1", 1),
        S.StopServer("web1"),
        S.StopResult("web1", S.ResultCode.NORMAL_END, "shut down"),
        S.ClaimQuery(2, "web1", "nbd://san:10809/web1", ("10.0.5.1",)),
        S.ClaimAnswer(1, "host1", "web1 runs", pending=False),
        S.LeaseRequest(
            b"Xen",
            2,
            "host2",
            S.LeaseAction.ACQUIRE,
            15_000,
            "web1",
            "nbd://san:10809/web1",
            ("10.0.5.1",),
            "host1",
            1_700_000_000_000,
            7,
            b"\x01" * 32,
        ),
        S.LeaseAnswer(0x0A0A0A0A, "web1", True, 15_000, None, (S.Holder(1, "host1"),)),
        S.LeaseAnswer(
            0x0A0A0A0A, "web1", False, 9_000, S.Holder(1, "host1"), (), "host1 holds it"
        ),
    ]
