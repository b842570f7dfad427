"""Hypothesis strategies for every parameter and message of xenpool.protocol."""

from __future__ import annotations

import dataclasses
import socket

from hypothesis import strategies as st

from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol import session as S

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-(2**31), 2**31 - 1)


def _canonical(family: int, text: str) -> str:
    return socket.inet_ntop(family, socket.inet_pton(family, text))


ipv4 = st.ip_addresses(v=4).map(lambda a: _canonical(socket.AF_INET, str(a)))
ipv6 = st.ip_addresses(v=6).map(lambda a: _canonical(socket.AF_INET6, str(a)))
address = ipv4 | ipv6
one_address = st.tuples(address)

sctp = st.builds(
    P.SctpTransport,
    u16,
    st.lists(address, min_size=1, max_size=P.MAX_ADDRESSES).map(tuple),
    st.sampled_from(P.TransportUse),
)
tcp = st.builds(P.TcpTransport, u16, one_address, st.sampled_from(P.TransportUse))
udp = st.builds(P.UdpTransport, u16, one_address)
udp_lite = st.builds(P.UdpLiteTransport, u16, one_address)
dccp = st.builds(P.DccpTransport, u16, one_address, u32)
transport = sctp | tcp | udp | udp_lite | dccp


@st.composite
def known_policy(draw) -> P.PoolPolicy:
    ptype = draw(st.sampled_from(sorted(P.POLICY_FIELDS)))
    values = draw(st.tuples(*[u32] * len(P.POLICY_FIELDS[ptype])))
    return P.PoolPolicy(ptype, values)


unknown_policy = st.builds(
    P.PoolPolicy,
    u32.filter(lambda t: t not in P.POLICY_FIELDS),
    st.just(()),
    st.binary(max_size=P.MAX_POLICY_DATA).filter(lambda b: len(b) % 4 == 0),
)
policy = known_policy() | unknown_policy
pool_handle = st.binary(min_size=1, max_size=P.MAX_POOL_HANDLE)
pool_element = st.builds(
    P.PoolElement, u32, u32, i32, transport, policy, st.none() | transport
)
server_information = st.builds(P.ServerInformation, u32, transport)
error_cause = st.builds(P.ErrorCause, u16, st.binary(max_size=64))
operation_error = st.builds(
    P.OperationError,
    st.lists(error_cause, min_size=1, max_size=P.MAX_CAUSES).map(tuple),
)
cookie = st.binary(min_size=1, max_size=P.MAX_COOKIE)

PARAMETERS = {
    "sctp": sctp,
    "tcp": tcp,
    "udp": udp,
    "udp_lite": udp_lite,
    "dccp": dccp,
    "policy": policy,
    "pool_element": pool_element,
    "server_information": server_information,
    "operation_error": operation_error,
}

# Strategies by message field name; a few names need their own.
_FIELDS = {
    "pool_handle": pool_handle,
    "pool_element": pool_element,
    "pool_elements": st.lists(pool_element, max_size=4).map(tuple),
    "pe_identifier": u32,
    "error": operation_error,
    "policy": policy,
    "items": u32,
    "ram_mb": u32,
    "authentication": st.binary(min_size=32, max_size=32),
    "server_id": u32,
    "transports": st.lists(transport, max_size=3).map(tuple),
    "cookie": cookie,
    "sender_id": u32,
    "receiver_id": u32,
    "target_id": u32,
    "checksum": u16,
    "server_information": server_information,
    "servers": st.lists(server_information, max_size=3).map(tuple),
    "update_action": st.sampled_from(M.UpdateAction),
    "entries": st.lists(
        st.tuples(pool_handle, st.lists(pool_element, max_size=3).map(tuple)),
        max_size=3,
    ).map(tuple),
}


def message(cls: type[M.Message]) -> st.SearchStrategy:
    kwargs = {}
    optional = {name for name, _types, card in cls.PARAMS if card == M.OPTIONAL}
    for f in dataclasses.fields(cls):
        if f.name in cls.FLAGS:
            kwargs[f.name] = st.booleans()
        elif f.name in optional:
            kwargs[f.name] = st.none() | _FIELDS[f.name]
        else:
            kwargs[f.name] = _FIELDS[f.name]
    return st.builds(cls, **kwargs)


ALL_MESSAGES = [*M.ASAP_MESSAGES.values(), *M.ENRP_MESSAGES.values()]

server_id_text = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", fullmatch=True)
text = st.text(max_size=60)
session_messages = st.one_of(
    st.builds(
        S.CreateServer,
        server_id_text,
        st.text(max_size=80),
        st.lists(address, max_size=4).map(tuple),
        st.integers(1, 2**32 - 1),
        st.integers(1, 0xFFFF),
    ),
    st.builds(S.CreateResult, server_id_text, i32, st.integers(0, 2**64 - 1), text),
    st.builds(S.CheckRunning, server_id_text, u32),
    st.builds(S.CheckRunningResponse, server_id_text, i32),
    st.builds(S.StopServer, server_id_text),
    st.builds(S.StopResult, server_id_text, i32, text),
    st.builds(
        S.ClaimQuery,
        u32,
        server_id_text,
        st.text(max_size=80),
        st.lists(address, max_size=4).map(tuple),
    ),
    st.builds(S.ClaimAnswer, u32, st.text(max_size=40), text, st.booleans()),
    st.builds(
        S.StopResult,
        server_id_text,
        st.just(S.ResultCode.MOVED),
        text,
        st.integers(1, 2**32 - 1),
    ),
    st.builds(S.VmQuery, u32),
    st.builds(
        S.VmReport,
        u32,
        st.integers(1, 0xFFFF),
        st.integers(2**32, 2**40),
        st.integers(0, 2**32),
        u32,
        st.lists(
            st.builds(
                S.VmEntry,
                server_id_text,
                st.integers(0, 2**40),
                u32,
                u16,
                st.booleans(),
            ),
            max_size=8,
            unique_by=lambda vm: vm.server_id,
        ).map(tuple),
    ),
    st.builds(
        S.MoveRequest,
        u32,
        server_id_text,
        st.integers(1, 2**32 - 1),
        st.binary(max_size=S.MAX_MAC),
        issued_s=u32,
    ),
    st.builds(S.MoveAnswer, u32, server_id_text, i32, text),
    st.builds(
        S.LeaseRequest,
        st.binary(min_size=1, max_size=32),
        u32,
        st.text(min_size=1, max_size=40).filter(str.strip),
        st.sampled_from(list(S.LeaseAction)),
        u32,
        server_id_text,
        st.text(max_size=80),
        st.lists(address, max_size=4).map(tuple),
        st.text(max_size=40),
        st.integers(0, 2**64 - 1),
        u32,
        st.binary(max_size=S.MAX_MAC),
    ),
    st.builds(
        S.LeaseAnswer,
        u32,
        server_id_text,
        st.booleans(),
        u32,
        st.none() | st.builds(S.Holder, u32, st.text(max_size=40)),
        st.lists(st.builds(S.Holder, u32, st.text(max_size=40)), max_size=4).map(tuple),
        text,
    ),
    st.builds(
        S.PuProof,
        st.text(min_size=1, max_size=20),
        st.integers(0, 2**64 - 1),
        u32,
        st.binary(max_size=S.MAX_MAC),
    ),
)
