"""The registrar's handlespace and ASAP behaviour on a Clock, with no sockets."""

from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock

from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol.errors import Cause
from xenpool.registrar.core import Registrar, Timers
from xenpool.registrar.handlespace import Handlespace, HandlespaceError, checksum_of

REGISTRAR_ID = 0x0A0A0A0A


class Association:
    def __init__(self) -> None:
        self.sent: list[M.Message] = []
        self.closed = False

    def send(self, message: M.Message) -> None:
        self.sent.append(message)

    def send_encoded(self, data: bytes) -> None:
        self.sent.append(M.decode(data))

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def policies():
    plugins = load_plugins()
    return {
        p.policy_type: p
        for p in (plugins.create("policy", n) for n in plugins.names("policy"))
    }


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registrar(policies, clock):
    handlespace = Handlespace(REGISTRAR_ID, policies, rng=random.Random(1))
    registrar = Registrar(
        handlespace,
        clock,
        Timers(keep_alive_interval=5, keep_alive_timeout=2, expiry_check_interval=1),
    )
    registrar.start()
    yield registrar
    registrar.stop()


def element(
    identifier: int, load: float = 0.0, life_ms: int = 60_000, port: int | None = None
) -> P.PoolElement:
    return P.PoolElement(
        identifier,
        0,
        life_ms,
        P.TcpTransport(port or 5000 + identifier, ("127.0.0.1",)),
        P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=P.load_to_wire(load)),
    )


def register(registrar, association, identifier, **kwargs) -> M.Message:
    registrar.handle(M.Registration(b"Xen", element(identifier, **kwargs)), association)
    return association.sent[-1]


def test_registration_makes_this_registrar_home(registrar):
    pe = Association()
    assert register(registrar, pe, 1) == M.RegistrationResponse(b"Xen", 1)
    entry = registrar.handlespace.get(b"Xen", 1)
    assert entry.home_registrar == REGISTRAR_ID and entry.owner is pe


def test_keep_alive_audit(registrar, clock):
    pe = Association()
    register(registrar, pe, 1)
    clock.advance(4.9)
    assert pe.sent[-1] == M.RegistrationResponse(b"Xen", 1)
    clock.advance(0.1)
    assert pe.sent[-1] == M.EndpointKeepAlive(REGISTRAR_ID, b"Xen", 1)
    registrar.handle(M.EndpointKeepAliveAck(b"Xen", 1), pe)
    clock.advance(4.9)
    assert len(registrar.handlespace) == 1 and len(pe.sent) == 2
    clock.advance(0.1)  # next keep-alive, which goes unanswered
    assert len(pe.sent) == 3
    clock.advance(1.9)
    assert len(registrar.handlespace) == 1
    clock.advance(0.1)
    assert len(registrar.handlespace) == 0


def test_an_ack_from_another_association_does_not_count(registrar, clock):
    pe, impostor = Association(), Association()
    register(registrar, pe, 1)
    clock.advance(5)
    registrar.handle(M.EndpointKeepAliveAck(b"Xen", 1), impostor)
    clock.advance(2)
    assert len(registrar.handlespace) == 0


def test_registration_life_ends(registrar, clock):
    pe = Association()
    register(registrar, pe, 1, life_ms=3_000)
    clock.advance(2.5)
    registrar.handle(M.EndpointKeepAliveAck(b"Xen", 1), pe)  # alive, but life is over
    clock.advance(1)
    assert registrar.handlespace.get(b"Xen", 1) is None


def test_unreachable_reports_remove_after_the_limit(registrar):
    pe, pu = Association(), Association()
    register(registrar, pe, 1)
    for _ in range(2):
        registrar.handle(M.EndpointUnreachable(b"Xen", 1), pu)
    assert registrar.handlespace.get(b"Xen", 1) is not None
    registrar.handle(M.EndpointUnreachable(b"Xen", 1), pu)
    assert registrar.handlespace.get(b"Xen", 1) is None
    assert pu.sent == []  # no answer to a report


def test_association_lost_removes_its_pes_only(registrar):
    a, b = Association(), Association()
    register(registrar, a, 1)
    register(registrar, a, 2)
    register(registrar, b, 3)
    registrar.association_lost(a)
    assert [e.identifier for e in registrar.handlespace.entries()] == [3]


def test_resolution_by_least_used_and_items(registrar):
    pe, pu = Association(), Association()
    for i, load in enumerate((0.5, 0.2, 0.9, 0.1, 0.3), start=1):
        register(registrar, pe, i, load=load)
    registrar.handle(M.HandleResolution(b"Xen"), pu)
    assert [e.identifier for e in pu.sent[-1].pool_elements] == [4, 2, 5]
    registrar.handle(M.HandleResolution(b"Xen", items=0xFFFFFFFF), pu)
    assert [e.identifier for e in pu.sent[-1].pool_elements] == [4, 2, 5, 1, 3]
    assert pu.sent[-1].policy.policy_type == P.PolicyType.LEAST_USED


def test_refusals_carry_their_causes(registrar):
    pe = Association()
    register(registrar, pe, 1)
    registrar.handle(M.Registration(b"Xen", element(1, port=9999)), Association())
    # same identifier from another transport
    # (the refused association got the answer, not the first PE)
    assert pe.sent == [M.RegistrationResponse(b"Xen", 1)]
    other = Association()
    registrar.handle(M.Registration(b"Xen", element(1, port=9999)), other)
    assert (
        other.sent[-1].reject
        and other.sent[-1].error.causes[0].code == Cause.NON_UNIQUE_PE_IDENTIFIER
    )
    registrar.handle(M.Deregistration(b"nope", 1), other)
    assert other.sent[-1].error.causes[0].code == Cause.UNKNOWN_POOL_HANDLE
    registrar.handle(M.Cookie(b"not for a registrar"), other)
    assert other.sent[-1].error.causes[0].code == Cause.UNRECOGNIZED_MESSAGE


def test_unsupported_policy_is_inconsistent(policies):
    handlespace = Handlespace(1, {})
    with pytest.raises(HandlespaceError) as info:
        handlespace.register(b"Xen", element(1), now=0, owner=None)
    assert info.value.cause == Cause.INCONSISTENT_POLICY


def test_checksum_follows_the_pes_homed_here(registrar):
    pe = Association()
    empty = registrar.handlespace.checksum()
    register(registrar, pe, 1)
    register(registrar, pe, 2)
    with_two = registrar.handlespace.checksum()
    assert with_two != empty
    registrar.handle(M.Deregistration(b"Xen", 2), pe)
    register(registrar, pe, 2)
    assert registrar.handlespace.checksum() == with_two  # order does not matter
    assert empty == 0xFFFF  # ~0


def test_checksum_matches_the_internet_checksum_definition():
    class Entry:
        def __init__(self, handle, identifier):
            self.pool_handle, self.identifier = handle, identifier

    # "Xen" + 0x00000001: words 0x5865, 0x6e00, 0x0000, 0x0001
    expected = ~(0x5865 + 0x6E00 + 0x0000 + 0x0001) & 0xFFFF
    assert checksum_of([Entry(b"Xen", 1)]) == expected


def test_a_pool_with_a_secret_takes_only_pes_that_prove_it(policies, clock):
    secret = b"sixteen byte secret"
    handlespace = Handlespace(REGISTRAR_ID, policies, pool_secrets={b"Xen": secret})
    registrar = Registrar(handlespace, clock)
    pe = Association()
    registrar.handle(M.Registration(b"Xen", element(1)), pe)
    assert (
        pe.sent[-1].reject
        and pe.sent[-1].error.causes[0].code == Cause.SECURITY_REJECTION
    )
    assert b"missing" in pe.sent[-1].error.causes[0].info
    forged = P.registration_mac(b"another secret!!", b"Xen", element(1))
    registrar.handle(M.Registration(b"Xen", element(1), forged), pe)
    assert pe.sent[-1].reject and b"wrong" in pe.sent[-1].error.causes[0].info
    # a proof for another PE does not carry over
    other = P.registration_mac(secret, b"Xen", element(2))
    registrar.handle(M.Registration(b"Xen", element(1), other), pe)
    assert pe.sent[-1].reject
    registrar.handle(
        M.Registration(
            b"Xen", element(1), P.registration_mac(secret, b"Xen", element(1))
        ),
        pe,
    )
    assert pe.sent[-1] == M.RegistrationResponse(b"Xen", 1)
    # other pools need no proof
    registrar.handle(M.Registration(b"Open", element(3)), pe)
    assert not pe.sent[-1].reject
    # only the PE's own association takes it out of a pool with a secret
    stranger = Association()
    registrar.handle(M.Deregistration(b"Xen", 1), stranger)
    assert stranger.sent[-1].error.causes[0].code == Cause.SECURITY_REJECTION
    assert handlespace.get(b"Xen", 1) is not None
    registrar.handle(M.Deregistration(b"Open", 3), stranger)  # a pool without a secret
    assert stranger.sent[-1].error is None
    registrar.handle(M.Deregistration(b"Xen", 1), pe)
    assert pe.sent[-1] == M.DeregistrationResponse(b"Xen", 1)
    assert handlespace.get(b"Xen", 1) is None
    registrar.stop()
