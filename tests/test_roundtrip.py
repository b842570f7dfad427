"""encode -> decode -> equal, for every message and parameter."""

from __future__ import annotations

import pytest
from hypothesis import given

from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol import session as S

from . import strategies as xst


@pytest.mark.parametrize("cls", xst.ALL_MESSAGES, ids=lambda c: c.__name__)
def test_message_round_trip(cls):
    @given(xst.message(cls))
    def check(msg):
        data = M.encode(msg)
        assert len(data) % 4 == 0  # every parameter padded, as rsplib sends
        assert int.from_bytes(data[2:4], "big") == len(data)
        assert M.decode(data, msg.PPID) == msg

    check()


@pytest.mark.parametrize("name", sorted(xst.PARAMETERS))
def test_parameter_round_trip(name):
    @given(xst.PARAMETERS[name])
    def check(value):
        data = P.encode_param(value)
        assert (
            int.from_bytes(data[2:4], "big")
            <= len(data)
            < int.from_bytes(data[2:4], "big") + 4
        )
        assert P.decode_param(data) == value

    check()


@given(xst.pool_handle)
def test_pool_handle_round_trip(handle):
    assert P.decode_param(P.encode_pool_handle(handle)) == handle


@given(xst.cookie)
def test_cookie_param_round_trip(cookie):
    assert P.decode_param(P.encode_cookie(cookie)) == cookie


@given(xst.u32)
def test_pe_identifier_and_hropt_round_trip(value):
    assert P.decode_param(P.encode_pe_identifier(value)) == value
    assert P.decode_param(P.encode_handle_resolution_option(value)) == value


@given(xst.u16)
def test_pe_checksum_round_trip(value):
    data = P.encode_pe_checksum(value)
    assert data[:4] == b"\x00\x0f\x00\x06"  # 16-bit checksum, length 6, 2 bytes padding
    assert P.decode_param(data) == value


@given(xst.session_messages)
def test_session_message_round_trip(msg):
    assert S.decode(S.encode(msg)) == msg


def test_policy_fields_by_name():
    lud = P.PoolPolicy.make(
        P.PolicyType.LEAST_USED_DEGRADATION, load=7, load_degradation=9
    )
    assert (lud.load, lud.load_degradation, lud.weight) == (7, 9, 0)
    assert P.PoolPolicy.make(
        P.PolicyType.WEIGHTED_RANDOM_DPF, weight=3, distance=20
    ).values == (3, 0, 20)
    with pytest.raises(ValueError, match="has no field load"):
        P.PoolPolicy.make(P.PolicyType.ROUND_ROBIN, load=1)
    with pytest.raises(ValueError, match="needs 1 values"):
        P.encode_policy(P.PoolPolicy(P.PolicyType.LEAST_USED))


def test_load_scaling():
    assert P.load_to_wire(1.0) == 0xFFFFFFFF
    assert P.load_to_wire(0.5) == 0x80000000
    assert P.load_to_wire(-3) == 0 and P.load_to_wire(7) == 0xFFFFFFFF
    assert P.load_from_wire(P.load_to_wire(0.25)) == pytest.approx(0.25)


def test_the_session_codec_table_covers_every_message_and_type():
    from xenpool.protocol import session as S

    messages = {
        cls
        for cls in vars(S).values()
        if isinstance(cls, type) and issubclass(cls, S.SessionMessage)
    }
    assert set(S._ENCODERS) == messages - {S.SessionMessage}
    assert set(S._DECODERS) == set(S.SessionType)
