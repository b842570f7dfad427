"""Byte-exact wire vectors for every ASAP and ENRP message and for the parameters.

Each vector below was assembled and checked by hand against /work/wire-notes.md (and
so against rsplib and the Wireshark 4.0.17 dissector), not copied from our encoder:

* header ``type u8 | flags u8 | length u16``; the length counts the header, the body
  and the padding of the last parameter (so it is a multiple of 4);
* TLV ``type u16 | length u16 | value``: the length is 4 + value and never includes the
  parameter's own padding, but an outer parameter's length includes the padding of the
  parameters nested in it;
* PE Checksum TLV ``000f 0006 cccc 0000`` (length 6, 2 pad bytes);
* policy type codes (RFC 5356 + rsplib 0xb000xxxx), loads scaled to 0xffffffff;
* ENRP sender/receiver server ids at offsets 4 and 8; HANDLE_UPDATE action u16 +
  reserved u16; M flag of HANDLE_TABLE_RESPONSE is 0x02, every other flag 0x01.

The spaces inside the hex strings only group the fields for the reader.
"""

from __future__ import annotations

import pytest

from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol.errors import Cause
from xenpool.tools import samples


def h(text: str) -> bytes:
    """Bytes from hex written with grouping spaces."""
    return bytes.fromhex("".join(text.split()))


# Reused pieces of the sample messages (see xenpool/samples.py).
PH_XEN = "0009 0007 58656e 00"  # pool handle "Xen": length 7, one pad byte
PEID = "000e 0008 11223344"  # PE identifier 0x11223344
# TCP 127.0.0.1 port P, transport use 1 (data plus control): 4 + 4 + IPv4 TLV 8 = 16.
TCP_LOCAL_CTRL = "0005 0010 {port} 0001  0001 0008 7f000001"
# Pool element: id, home 0x0a0a0a0a, life 300000 ms (0x000493e0), TCP, LU policy.
PE_FIXED = "{id} 0a0a0a0a 000493e0"
# Least Used policy: type 0x40000001 and the load (4 + 4 + 4 = 12).
LU = "0008 000c 40000001 {load}"
# 0.25 * 0xffffffff rounded = 0x40000000.
PE_SAMPLE = (
    "000a 002c "
    + PE_FIXED.format(id="11223344")
    + TCP_LOCAL_CTRL.format(port="1388")
    + LU.format(load="40000000")
)
# The same PE with the registrator (ASAP) transport: TCP 127.0.0.1:3863 data only.
# Length 4 + 12 + 16 + 12 + 16 = 60.
PE_SAMPLE_ASAP = (
    "000a 003c "
    + PE_FIXED.format(id="11223344")
    + TCP_LOCAL_CTRL.format(port="1388")
    + LU.format(load="40000000")
    + "0005 0010 0f17 0000  0001 0008 7f000001"
)
# Server information: id 0x0a0a0a0a; SCTP port 9901 (0x26ad) data only, multi-homed
# 10.0.0.1 + fd00::1: SCTP length 4 + 4 + 8 + 20 = 36, server info 4 + 4 + 36 = 44.
SERVER_INFO = (
    "000b 002c 0a0a0a0a"
    "  0004 0024 26ad 0000"
    "    0001 0008 0a000001"
    "    0002 0014 fd000000 00000000 00000000 00000001"
)

SAMPLE_VECTORS: dict[str, str] = {
    # ------------------------------------------------------------------ ASAP
    # 4 + PH 8 + PE 44 = 56 = 0x38
    "Registration": "01 00 0038 " + PH_XEN + PE_SAMPLE,
    "Deregistration": "02 00 0014 " + PH_XEN + PEID,
    "RegistrationResponse": "03 00 0014 " + PH_XEN + PEID,
    # Operation Error: one cause 0x9 (unknown pool handle) of length 4 -> OE length 8.
    "DeregistrationResponse": "04 00 001c " + PH_XEN + PEID + "000c 0008 0009 0004",
    # rsplib Handle Resolution Option 0x803f, items 3.
    "HandleResolution": "05 00 0014 " + PH_XEN + "803f 0008 00000003",
    # 4 + PH 8 + overall LU policy 12 + 3 PEs of 44 = 156 = 0x9c. Loads 0, 0.1, 0.2:
    # round(0.1 * 0xffffffff) = 0x1999999a, 0.2 * 0xffffffff = 0x33333333 exactly.
    "HandleResolutionResponse": "06 00 009c "
    + PH_XEN
    + LU.format(load="00000000")
    + "000a 002c "
    + PE_FIXED.format(id="00001000")
    + TCP_LOCAL_CTRL.format(port="1388")
    + LU.format(load="00000000")
    + "000a 002c "
    + PE_FIXED.format(id="00001001")
    + TCP_LOCAL_CTRL.format(port="1389")
    + LU.format(load="1999999a")
    + "000a 002c "
    + PE_FIXED.format(id="00001002")
    + TCP_LOCAL_CTRL.format(port="138a")
    + LU.format(load="33333333"),
    # H flag 0x01, server id at offset 4, then PH and rsplib's PE identifier.
    "EndpointKeepAlive": "07 01 0018 deadbeef " + PH_XEN + PEID,
    "EndpointKeepAliveAck": "08 00 0014 " + PH_XEN + PEID,
    "EndpointUnreachable": "09 00 0014 " + PH_XEN + PEID,
    # server id, then TCP 127.0.0.1:3863 (0x0f17) data only.
    "ServerAnnounce": "0a 00 0018 0a0a0a0a  0005 0010 0f17 0000  0001 0008 7f000001",
    # "opaque session state" is 20 bytes: TLV length 24, no padding.
    "Cookie": "0b 00 001c  000d 0018 6f70617175652073657373696f6e207374617465",
    "CookieEcho": "0c 00 001c  000d 0018 6f70617175652073657373696f6e207374617465",
    # 4 + PH 8 + policy 12 + PE 44 = 68 = 0x44
    "BusinessCard": "0d 00 0044 " + PH_XEN + LU.format(load="00000000") + PE_SAMPLE,
    "AsapError": "0e 00 000c  000c 0008 0009 0004",
    # ------------------------------------------------------------------ ENRP
    # R (reply required) 0x01; 4 + 8 + checksum 8 + server info 44 = 64 = 0x40.
    "Presence": "01 01 0040 0a0a0a0a 0b0b0b0b  000f 0006 abcd 0000 " + SERVER_INFO,
    "HandleTableRequest": "02 01 000c 0a0a0a0a 0b0b0b0b",  # W flag
    # M flag 0x02; 4 + 8 + PH 8 + PE 60 = 80 = 0x50.
    "HandleTableResponse": "03 02 0050 0b0b0b0b 0a0a0a0a " + PH_XEN + PE_SAMPLE_ASAP,
    # action 0 (ADD_PE) + reserved 0; 4 + 8 + 4 + 8 + 60 = 84 = 0x54.
    "HandleUpdate": "04 00 0054 0a0a0a0a 0b0b0b0b 0000 0000 " + PH_XEN + PE_SAMPLE_ASAP,
    "ListRequest": "05 00 000c 0a0a0a0a 0b0b0b0b",
    "ListResponse": "06 00 0038 0b0b0b0b 0a0a0a0a " + SERVER_INFO,  # 4 + 8 + 44 = 56
    "InitTakeover": "07 00 0010 0a0a0a0a 0b0b0b0b 0c0c0c0c",
    "InitTakeoverAck": "08 00 0010 0b0b0b0b 0a0a0a0a 0c0c0c0c",
    "TakeoverServer": "09 00 0010 0a0a0a0a 0b0b0b0b 0c0c0c0c",
    # cause 0x4 (non-unique PE identifier)
    "EnrpError": "0a 00 0014 0a0a0a0a 0b0b0b0b  000c 0008 0004 0004",
}

SAMPLES = samples.all_messages()


def test_every_sample_has_a_vector():
    names = [type(m).__name__ for m in SAMPLES]
    assert len(names) == len(set(names)) == 24
    assert sorted(names) == sorted(SAMPLE_VECTORS)
    assert sum(m.PPID == M.ASAP_PPID for m in SAMPLES) == 14
    assert sum(m.PPID == M.ENRP_PPID for m in SAMPLES) == 10


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_sample_vector(msg):
    expected = h(SAMPLE_VECTORS[type(msg).__name__])
    # The vector itself is well formed: length field = size, a multiple of 4.
    assert int.from_bytes(expected[2:4], "big") == len(expected)
    assert len(expected) % 4 == 0
    assert M.encode(msg).hex() == expected.hex()
    assert M.decode(expected, msg.PPID) == msg


# ------------------------------------------------- wire-notes.md section 8 examples

WIRE_NOTES_REGISTRATION = h(
    "010000380009000758656e00000a002c1122334400000000000493e00005001013880000000100080a000001"
    "0008000c4000000180000000"
)
WIRE_NOTES_REGISTRATION_RESPONSE = h(
    "0301001c0009000758656e00000e000811223344000c000800090004"
)
WIRE_NOTES_KEEP_ALIVE = h("07010018deadbeef0009000758656e00000e000811223344")
WIRE_NOTES_HANDLE_RESOLUTION = h("050000140009000758656e00803f000800000003")
WIRE_NOTES_PRESENCE = h(
    "0101002c0a0a0a0a0b0b0b0b000f0006abcd0000000b00180a0a0a0a0004001026ad0000000100080a000001"
)


def test_wire_notes_registration():
    msg = M.decode(WIRE_NOTES_REGISTRATION, M.ASAP_PPID)
    assert isinstance(msg, M.Registration)
    assert msg.pool_handle == b"Xen"
    pe = msg.pool_element
    assert (pe.identifier, pe.home_registrar, pe.registration_life) == (
        0x11223344,
        0,
        300_000,
    )
    assert isinstance(pe.user_transport, P.TcpTransport)
    assert pe.user_transport.port == 5000
    assert pe.user_transport.addresses == ("10.0.0.1",)
    assert pe.user_transport.transport_use == P.TransportUse.DATA_ONLY
    assert pe.policy.policy_type == P.PolicyType.LEAST_USED
    assert pe.policy.values == (0x80000000,)
    assert pe.policy.load == 0x80000000
    assert pe.asap_transport is None
    expected = M.Registration(
        b"Xen",
        P.PoolElement(
            0x11223344,
            0,
            300_000,
            P.TcpTransport(5000, ("10.0.0.1",)),
            P.PoolPolicy(P.PolicyType.LEAST_USED, (0x80000000,)),
        ),
    )
    assert msg == expected
    assert M.encode(expected) == WIRE_NOTES_REGISTRATION


def test_wire_notes_registration_response_rejected():
    msg = M.decode(WIRE_NOTES_REGISTRATION_RESPONSE, M.ASAP_PPID)
    assert isinstance(msg, M.RegistrationResponse)
    assert msg.reject is True
    assert (msg.pool_handle, msg.pe_identifier) == (b"Xen", 0x11223344)
    assert msg.error == P.OperationError(
        (P.ErrorCause(Cause.UNKNOWN_POOL_HANDLE, b""),)
    )
    expected = M.RegistrationResponse(
        b"Xen",
        0x11223344,
        reject=True,
        error=P.OperationError.single(Cause.UNKNOWN_POOL_HANDLE),
    )
    assert M.encode(expected) == WIRE_NOTES_REGISTRATION_RESPONSE


def test_wire_notes_endpoint_keep_alive():
    msg = M.decode(WIRE_NOTES_KEEP_ALIVE, M.ASAP_PPID)
    assert msg == M.EndpointKeepAlive(0xDEADBEEF, b"Xen", 0x11223344, home=True)
    assert msg.home is True and msg.server_id == 0xDEADBEEF
    assert M.encode(msg) == WIRE_NOTES_KEEP_ALIVE


def test_wire_notes_handle_resolution():
    msg = M.decode(WIRE_NOTES_HANDLE_RESOLUTION, M.ASAP_PPID)
    assert msg == M.HandleResolution(b"Xen", items=3)
    assert M.encode(msg) == WIRE_NOTES_HANDLE_RESOLUTION


def test_wire_notes_presence():
    msg = M.decode(WIRE_NOTES_PRESENCE, M.ENRP_PPID)
    assert isinstance(msg, M.Presence)
    assert msg.reply_required is True
    assert (msg.sender_id, msg.receiver_id, msg.checksum) == (
        0x0A0A0A0A,
        0x0B0B0B0B,
        0xABCD,
    )
    si = msg.server_information
    assert si.server_id == 0x0A0A0A0A
    assert si.transport == P.SctpTransport(
        9901, ("10.0.0.1",), P.TransportUse.DATA_ONLY
    )
    expected = M.Presence(
        0x0A0A0A0A,
        0x0B0B0B0B,
        0xABCD,
        P.ServerInformation(0x0A0A0A0A, P.SctpTransport(9901, ("10.0.0.1",))),
        reply_required=True,
    )
    assert M.encode(expected) == WIRE_NOTES_PRESENCE


# ------------------------------------------------------------- parameter vectors
#
# (object, hand-written TLV, encoder). Cover every transport kind, IPv6, every policy
# type with its data words in wire order, padding of odd-sized values, causes.

PARAM_VECTORS = [
    pytest.param(
        P.SctpTransport(
            9901, ("10.0.0.1", "2001:db8::1"), P.TransportUse.DATA_PLUS_CONTROL
        ),
        "0004 0024 26ad 0001  0001 0008 0a000001  0002 0014 20010db8 00000000 00000000 00000001",
        id="sctp-multihomed",
    ),
    pytest.param(
        P.TcpTransport(80, ("::1",)),
        "0005 001c 0050 0000  0002 0014 00000000 00000000 00000000 00000001",
        id="tcp-ipv6",
    ),
    pytest.param(
        P.UdpTransport(53, ("192.0.2.1",)),
        "0006 0010 0035 0000  0001 0008 c0000201",
        id="udp",
    ),
    pytest.param(
        P.UdpLiteTransport(5001, ("192.0.2.2",)),
        "0007 0010 1389 0000  0001 0008 c0000202",
        id="udplite",
    ),
    pytest.param(
        P.DccpTransport(5002, ("192.0.2.3",), 0x01020304),
        "0003 0014 138a 0000 01020304  0001 0008 c0000203",  # port, reserved, service code
        id="dccp",
    ),
    pytest.param(P.PoolPolicy(0x00000001), "0008 0008 00000001", id="policy-rr"),
    pytest.param(
        P.PoolPolicy(0x00000002, (5,)), "0008 000c 00000002 00000005", id="policy-wrr"
    ),
    pytest.param(P.PoolPolicy(0x00000003), "0008 0008 00000003", id="policy-rand"),
    pytest.param(
        P.PoolPolicy(0x00000004, (7,)), "0008 000c 00000004 00000007", id="policy-wrand"
    ),
    pytest.param(
        P.PoolPolicy(0x00000005, (2,)),
        "0008 000c 00000005 00000002",
        id="policy-priority",
    ),
    pytest.param(
        P.PoolPolicy(0x40000001, (0xFFFFFFFF,)),
        "0008 000c 40000001 ffffffff",
        id="policy-lu",
    ),
    pytest.param(
        P.PoolPolicy(0x40000002, (1, 2)),
        "0008 0010 40000002 00000001 00000002",
        id="policy-lud",
    ),
    pytest.param(
        P.PoolPolicy(0x40000003, (3, 4)),
        "0008 0010 40000003 00000003 00000004",
        id="policy-plu",
    ),
    pytest.param(
        P.PoolPolicy(0x40000004, (5,)), "0008 000c 40000004 00000005", id="policy-rlu"
    ),
    pytest.param(
        P.PoolPolicy(0xB0001001, (1, 2)),
        "0008 0010 b0001001 00000001 00000002",
        id="policy-rplu",
    ),
    pytest.param(
        P.PoolPolicy(0xB0001002, (1, 2)),
        "0008 0010 b0001002 00000001 00000002",
        id="policy-rlud",
    ),
    pytest.param(
        P.PoolPolicy(0xB0001003, (1, 2)),
        "0008 0010 b0001003 00000001 00000002",
        id="policy-plud",
    ),
    pytest.param(
        P.PoolPolicy(0xB0001004, (1, 2)),
        "0008 0010 b0001004 00000001 00000002",
        id="policy-rplud",
    ),
    pytest.param(
        P.PoolPolicy(0xB0002001, (10, 0x80000000, 25)),  # weight, weight DPF, distance
        "0008 0014 b0002001 0000000a 80000000 00000019",
        id="policy-wrand-dpf",
    ),
    pytest.param(
        P.PoolPolicy(
            0xB0002002, (0x40000000, 0x20000000, 50)
        ),  # load, load DPF, distance
        "0008 0014 b0002002 40000000 20000000 00000032",
        id="policy-lu-dpf",
    ),
    pytest.param(
        P.PoolPolicy(0xB0002003, (1, 2, 3, 4)),  # load, degradation, load DPF, distance
        "0008 0018 b0002003 00000001 00000002 00000003 00000004",
        id="policy-lud-dpf",
    ),
    pytest.param(
        # PE with a negative life and the registrator transport (as in ENRP); the
        # outer length counts the nested parameters' padding.
        P.PoolElement(
            0xCAFEBABE,
            0x01020304,
            -1,
            P.UdpTransport(7, ("127.0.0.2",)),
            P.PoolPolicy(0x00000001),
            P.SctpTransport(3863, ("127.0.0.1",), P.TransportUse.DATA_PLUS_CONTROL),
        ),
        "000a 0038 cafebabe 01020304 ffffffff"
        "  0006 0010 0007 0000 0001 0008 7f000002"
        "  0008 0008 00000001"
        "  0004 0010 0f17 0001 0001 0008 7f000001",
        id="pool-element-asap-transport",
    ),
    pytest.param(
        P.ServerInformation(0x01020304, P.SctpTransport(9901, ("10.0.0.2",))),
        "000b 0018 01020304  0004 0010 26ad 0000 0001 0008 0a000002",
        id="server-information",
    ),
    pytest.param(
        # causes: 0x1 with a 7-byte unknown TLV (length 11 + 1 pad), then 0x9 (no info)
        P.OperationError(
            (
                P.ErrorCause(Cause.UNRECOGNIZED_PARAMETER, h("4123 0007 616263")),
                P.ErrorCause(Cause.UNKNOWN_POOL_HANDLE),
            )
        ),
        "000c 0014  0001 000b 4123 0007 616263 00  0009 0004",
        id="operation-error",
    ),
]


@pytest.mark.parametrize(("value", "wire"), PARAM_VECTORS)
def test_parameter_vector(value, wire):
    data = h(wire)
    assert P.encode_param(value).hex() == data.hex()
    assert P.decode_param(data) == value


@pytest.mark.parametrize(
    ("encoder", "value", "wire"),
    [
        pytest.param(
            P.encode_pool_handle, b"pool", "0009 0008 706f6f6c", id="handle-4"
        ),
        pytest.param(
            P.encode_pool_handle, b"pool1", "0009 0009 706f6f6c 31000000", id="handle-5"
        ),
        pytest.param(
            P.encode_pool_handle, b"\x00\xff", "0009 0006 00ff 0000", id="handle-binary"
        ),
        pytest.param(
            P.encode_cookie,
            b"\x01\x02\x03\x04\x05",
            "000d 0009 01020304 05000000",
            id="cookie-5",
        ),
        pytest.param(
            P.encode_pe_identifier, 0xFFFFFFFF, "000e 0008 ffffffff", id="pe-identifier"
        ),
        pytest.param(
            P.encode_pe_checksum, 0x1234, "000f 0006 1234 0000", id="pe-checksum"
        ),
        pytest.param(
            P.encode_handle_resolution_option,
            0xFFFFFFFF,
            "803f 0008 ffffffff",
            id="hropt-max",
        ),
    ],
)
def test_value_parameter_vector(encoder, value, wire):
    data = h(wire)
    assert encoder(value).hex() == data.hex()
    assert P.decode_param(data) == value


def test_last_parameter_without_padding_is_accepted():
    # rsplib's parser accepts a message whose length stops before the last pad bytes.
    data = h("05 00 000b 0009 0007 58656e")
    assert M.decode(data, M.ASAP_PPID) == M.HandleResolution(b"Xen")


def test_load_scaling():
    assert P.load_to_wire(0.0) == 0
    assert P.load_to_wire(1.0) == 0xFFFFFFFF
    assert P.load_to_wire(0.5) == 0x80000000  # 2147483647.5 rounds to even
    assert P.load_to_wire(0.25) == 0x40000000


def test_endpoint_keep_alive_without_pe_identifier_is_accepted():
    # RFC 5352 ENDPOINT_KEEP_ALIVE is server id + pool handle only; the PE Identifier
    # is rsplib's custom addition, which rsplib itself omits when the id is 0 and
    # treats as optional when parsing (scanEndpointKeepAliveMessage: missing -> 0).
    data = h("07 00 0010 deadbeef " + PH_XEN)
    msg = M.decode(data, M.ASAP_PPID)
    assert isinstance(msg, M.EndpointKeepAlive)
    assert (msg.server_id, msg.pool_handle, msg.home) == (0xDEADBEEF, b"Xen", False)
    assert msg.pe_identifier in (0, None)
