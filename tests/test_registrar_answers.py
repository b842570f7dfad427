"""The registrar's answer cache: a HANDLE_RESOLUTION the pool's policy would answer the
same way again is answered from its bytes, without decoding, until the pool changes.

The cache must never change what a PU gets: the equivalence test runs the same
operations against a registrar that caches and one that does not, for every policy."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol.errors import Cause
from xenpool.registrar import handlespace as hs
from xenpool.registrar.core import Registrar, Timers
from xenpool.registrar.handlespace import Handlespace
from xenpool.registrar.service import AsapProtocol, Metrics

REGISTRAR_ID = 0x0A0A0A0A
POLICIES = {
    p.policy_type: p
    for p in (lambda pl: (pl.create("policy", n) for n in pl.names("policy")))(
        load_plugins()
    )
}
LOADS = (0.0, 0.25, 0.5)  # few values, so ties are common


def policy(policy_type: int, load: float, free_ram_mb: int = 1000) -> P.PoolPolicy:
    fields = {}
    for name in P.POLICY_FIELDS[policy_type]:
        if name == "load":
            fields[name] = P.load_to_wire(load)
        elif name == "free_ram_mb":
            fields[name] = free_ram_mb
        elif name in ("weight", "priority"):
            fields[name] = 1 + int(load * 4)
        elif name in ("load_degradation", "load_dpf", "weight_dpf"):
            fields[name] = P.load_to_wire(0.1)
        # distance stays 0
    return P.PoolPolicy.make(policy_type, **fields)


def element(identifier: int, policy_type: int, load: float) -> P.PoolElement:
    return P.PoolElement(
        identifier,
        0,
        60_000,
        P.TcpTransport(5000 + identifier, ("10.0.0.1",)),
        policy(policy_type, load),
    )


def handlespace() -> Handlespace:
    return Handlespace(REGISTRAR_ID, POLICIES, rng=random.Random(7))


def request(items: int | None = None, ram_mb: int | None = None) -> bytes:
    return M.encode(M.HandleResolution(b"Xen", items, ram_mb))


# ------------------------------------------------------------- the handlespace


def answer(space: Handlespace, raw: bytes) -> bytes:
    """What the registrar answers: from the cache if it can, else computed (and kept)."""
    cached = space.cached_answer(raw)
    if cached is not None:
        return cached
    msg = M.decode(raw)
    return space.resolution_answer(msg.pool_handle, msg.items, msg.ram_mb, raw)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.integers(1, 6), st.sampled_from(LOADS)),
        st.tuples(st.just("deregister"), st.integers(1, 6), st.just(0)),
        st.tuples(
            st.just("resolve"),
            st.sampled_from([None, 1, 2, 5]),
            st.sampled_from([None, 100, 900]),
        ),
    ),
    max_size=40,
)


@pytest.mark.parametrize(
    "policy_type", sorted(POLICIES), ids=lambda t: POLICIES[t].name
)
@settings(max_examples=60, deadline=None)
@given(ops=operations)
def test_the_cache_never_changes_an_answer(policy_type, ops):
    caching, computing = handlespace(), handlespace()
    for op, a, b in ops:
        if op == "register":
            for space in (caching, computing):
                space.register(b"Xen", element(a, policy_type, b), now=0, owner=None)
        elif op == "deregister":
            for space in (caching, computing):
                if space.get(b"Xen", a) is not None:
                    space.deregister(b"Xen", a)
        elif computing.pools:
            raw = request(a, b)
            msg = M.decode(raw)
            expected = computing.resolution_answer(
                msg.pool_handle, msg.items, msg.ram_mb
            )
            assert answer(caching, raw) == expected
    assert caching.resolutions == computing.resolutions


def test_least_used_with_distinct_loads_is_answered_from_the_cache():
    space = handlespace()
    for i, load in enumerate((0.5, 0.2, 0.9, 0.1), start=1):
        space.register(
            b"Xen", element(i, P.PolicyType.LEAST_USED, load), now=0, owner=None
        )
    raw = request()
    assert space.cached_answer(raw) is None
    first = answer(space, raw)
    assert [e.identifier for e in M.decode(first).pool_elements] == [4, 2, 1]
    assert space.cached_answer(raw) == first
    assert space.resolutions == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.register(
            b"Xen", element(5, P.PolicyType.LEAST_USED, 0.0), now=0, owner=None
        ),  # a new PE
        lambda s: s.register(
            b"Xen", element(2, P.PolicyType.LEAST_USED, 0.8), now=0, owner=None
        ),  # a load update
        lambda s: s.deregister(b"Xen", 4),
        lambda s: (
            s.report_unreachable(b"Xen", 4)
            or s.report_unreachable(b"Xen", 4)
            or s.report_unreachable(b"Xen", 4)
        ),
        lambda s: s.expire(now=61),
        lambda s: s.set_home(
            s.get(b"Xen", 4), 0x0B0B0B0B
        ),  # takeover: the answer carries the home
    ],
    ids=[
        "new PE",
        "load update",
        "deregistration",
        "unreachable",
        "expiry",
        "takeover",
    ],
)
def test_every_change_of_the_pool_drops_its_cached_answers(change):
    space = handlespace()
    for i, load in enumerate((0.5, 0.2, 0.9, 0.1), start=1):
        space.register(
            b"Xen", element(i, P.PolicyType.LEAST_USED, load), now=0, owner=None
        )
    raw = request()
    before = answer(space, raw)
    change(space)
    assert space.cached_answer(raw) is None
    if space.pools:
        msg = M.decode(raw)
        assert answer(space, raw) == space.resolution_answer(
            msg.pool_handle, msg.items, msg.ram_mb
        )
    assert before  # the first answer was a real one


@pytest.mark.parametrize(
    "policy_type, loads",
    [
        (P.PolicyType.ROUND_ROBIN, (0, 0, 0)),
        (
            P.PolicyType.LEAST_USED,
            (0.1, 0.1, 0.1, 0.1),
        ),  # ties: round robin among equals
        (P.PolicyType.LEAST_USED_DEGRADATION, (0.1, 0.5, 0.9)),
        (P.PolicyType.WEIGHTED_ROUND_ROBIN, (0.5, 0.5, 0.5)),
        (P.PolicyType.RANDOM, (0, 0, 0)),
    ],
    ids=[
        "round robin",
        "least used ties",
        "degradation",
        "weighted round robin",
        "random",
    ],
)
def test_answers_that_would_change_are_not_kept(policy_type, loads):
    space = handlespace()
    for i, load in enumerate(loads, start=1):
        space.register(b"Xen", element(i, policy_type, load), now=0, owner=None)
    raw = request(items=1)
    answer(space, raw)
    assert space.cached_answer(raw) is None


def test_a_request_that_books_ram_is_not_kept():
    space = handlespace()
    for i in (1, 2):
        space.register(
            b"Xen",
            element(i, P.PolicyType.LEAST_USED_FREE_RAM, 0.1 * i),
            now=0,
            owner=None,
        )
    raw = request(ram_mb=300)
    answer(space, raw)
    assert space.cached_answer(raw) is None
    plain = request()
    answer(space, plain)
    assert space.cached_answer(plain) is not None


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(hs, "ANSWER_CACHE_SIZE", 4)
    space = handlespace()
    space.register(b"Xen", element(1, P.PolicyType.LEAST_USED, 0.1), now=0, owner=None)
    requests = [request(items=n) for n in range(1, 10)]
    for raw in requests:
        answer(space, raw)
    assert len(space._answers) <= 4
    assert space.cached_answer(requests[-1]) is not None


# ------------------------------------------------------- the ASAP connection


@pytest.fixture
def connection():
    space = handlespace()
    registrar = Registrar(space, Clock(), Timers())
    metrics = Metrics(space)
    protocol = AsapProtocol(
        registrar, idle_timeout=0, max_message_size=M.MAX_MESSAGE_SIZE, metrics=metrics
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    for i, load in enumerate((0.5, 0.2, 0.9, 0.1), start=1):
        space.register(
            b"Xen", element(i, P.PolicyType.LEAST_USED, load), now=0, owner=None
        )
    yield protocol, transport, space, metrics
    protocol.connectionLost()


def answers(transport: StringTransport) -> list[M.Message]:
    data, out = transport.value(), []
    transport.clear()
    while data:
        length = (data[2] << 8) | data[3]
        out.append(M.decode(data[:length]))
        data = data[length:]
    return out


def test_repeated_requests_in_one_read_get_one_answer_each(connection):
    protocol, transport, space, metrics = connection
    protocol.dataReceived(request() * 5)
    got = answers(transport)
    assert len(got) == 5 and all(
        [e.identifier for e in m.pool_elements] == [4, 2, 1] for m in got
    )
    assert space.resolutions == 5
    assert b"xenpool_handle_resolutions_total 5.0" in __import__(
        "prometheus_client"
    ).generate_latest(metrics.registry)


def test_answers_keep_the_order_of_mixed_requests_and_partial_frames(connection):
    protocol, transport, space, _ = connection
    registration = M.encode(
        M.Registration(b"Xen", element(9, P.PolicyType.LEAST_USED, 0.0))
    )
    data = request() + registration + request() + request(items=1)
    for i in range(0, len(data), 7):  # arrives in pieces that split every frame
        protocol.dataReceived(data[i : i + 7])
    got = answers(transport)
    assert [type(m) for m in got] == [
        M.HandleResolutionResponse,
        M.RegistrationResponse,
        M.HandleResolutionResponse,
        M.HandleResolutionResponse,
    ]
    assert [e.identifier for e in got[0].pool_elements] == [4, 2, 1]
    assert [e.identifier for e in got[2].pool_elements] == [
        9,
        4,
        2,
    ]  # the new PE is in the answer at once
    assert [e.identifier for e in got[3].pool_elements] == [9]


def test_an_unknown_pool_is_refused_and_the_connection_goes_on(connection):
    protocol, transport, _, _ = connection
    protocol.dataReceived(M.encode(M.HandleResolution(b"nope")) + request())
    refused, answered = answers(transport)
    assert refused.error.causes[0].code == Cause.UNKNOWN_POOL_HANDLE
    assert [e.identifier for e in answered.pool_elements] == [4, 2, 1]
    assert not transport.disconnecting


def test_a_malformed_resolution_is_refused_and_the_next_one_answered(connection):
    protocol, transport, _, _ = connection
    bad = (
        bytes([M.AsapType.HANDLE_RESOLUTION, 0, 0, 8]) + b"\x00\x01\x00\x09"
    )  # a parameter longer than the message
    protocol.dataReceived(bad + request())
    got = answers(transport)
    assert isinstance(got[0], M.AsapError)
    assert [e.identifier for e in got[-1].pool_elements] == [4, 2, 1]
    assert not transport.disconnecting


def test_unknown_parameters_are_reported_every_time(connection):
    protocol, transport, space, _ = connection
    unknown = bytes.fromhex("c099000800000000")  # type 0xc099: skip and report
    body = request()[4:] + unknown
    raw = (
        bytes([M.AsapType.HANDLE_RESOLUTION, 0])
        + (4 + len(body)).to_bytes(2, "big")
        + body
    )
    protocol.dataReceived(raw)
    protocol.dataReceived(raw)
    kinds = [type(m) for m in answers(transport)]
    assert kinds == [M.HandleResolutionResponse, M.AsapError] * 2
    assert space.cached_answer(raw) is None


def test_a_bad_length_still_closes_the_connection(connection):
    protocol, transport, _, _ = connection
    protocol.dataReceived(request() + bytes([M.AsapType.HANDLE_RESOLUTION, 0, 0, 2]))
    got = answers(transport)
    assert isinstance(got[0], M.HandleResolutionResponse)
    assert transport.disconnecting
