"""ProtocolError: what every decoder error says, and the ERROR message that answers it."""

from __future__ import annotations

import struct

import pytest

from xenpool.protocol import cookie, messages, session
from xenpool.protocol import params as P
from xenpool.protocol.errors import Cause, ProtocolError
from xenpool.protocol.messages import AsapError, EnrpError, error_for
from xenpool.tools import samples

SECRET = b"test secret"
NOW = 1_700_000_000.0


def decode_error(decoder: str, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        DECODE[decoder](data)
    return caught.value


DECODE = {
    "asap": lambda b: messages.decode(b, messages.ASAP_PPID),
    "enrp": lambda b: messages.decode(b, messages.ENRP_PPID),
    "session": session.decode,
    "cookie": lambda b: cookie.unseal(
        b, SECRET, pool_handle=b"Xen", now=NOW, max_age_s=60
    ),
}


# --------------------------------------------------------------------- byte helpers


def tlv(ptype: int, value: bytes) -> bytes:
    return P.tlv(ptype, value)


def msg(mtype: int, *parts: bytes, flags: int = 0) -> bytes:
    body = b"".join(parts)
    return struct.pack("!BBH", mtype, flags, 4 + len(body)) + body


HANDLE = tlv(P.ParamType.POOL_HANDLE, b"Xen")  # 8 bytes with padding
PE_ID = tlv(P.ParamType.PE_IDENTIFIER, b"\x11\x22\x33\x44")
PE_FIXED = struct.pack("!IIi", 1, 2, 3)
TCP = tlv(
    P.ParamType.TCP_TRANSPORT,
    struct.pack("!HH", 5000, 0) + P.encode_address("127.0.0.1"),
)  # 16 bytes
POLICY = P.encode_policy(P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=7))  # 12 bytes
IDS = struct.pack("!II", 1, 2)
# In a Registration: message header 0-3, pool handle 4-11, pool element from 12 (value
# from 16, its fixed fields 16-27), user transport from 28 (value from 32, port and use
# 32-35, addresses from 36), policy after it.
PE_AT, TRANSPORT_AT, ADDRESSES_AT = 12, 28, 36


def registration(*pe_parts: bytes) -> bytes:
    return msg(
        messages.AsapType.REGISTRATION,
        HANDLE,
        tlv(P.ParamType.POOL_ELEMENT, PE_FIXED + b"".join(pe_parts)),
    )


def tcp_with(*addresses: bytes) -> bytes:
    return tlv(
        P.ParamType.TCP_TRANSPORT, struct.pack("!HH", 5000, 0) + b"".join(addresses)
    )


def sctp_with(*addresses: bytes) -> bytes:
    return tlv(
        P.ParamType.SCTP_TRANSPORT, struct.pack("!HH", 5000, 0) + b"".join(addresses)
    )


def text(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def sess(mtype: int, *parts: bytes, version: int = session.VERSION) -> bytes:
    body = b"".join(parts)
    return struct.pack("!BBHHH", mtype, 0, 8 + len(body), version, 0) + body


def create(
    server_id=b"web1", disk=b"nbd://san/web1", ips=b"10.0.0.1", ram=300, vcpus=1
) -> bytes:
    fixed = struct.pack("!IH2x", ram, vcpus)
    return sess(
        session.SessionType.CREATE_SERVER, text(server_id), text(disk), text(ips), fixed
    )


def create_field_offsets(
    server_id=b"web1", disk=b"nbd://san/web1", ips=b"10.0.0.1"
) -> dict[str, int]:
    """Where each field of ``create(...)`` starts."""
    disk_at = 8 + 2 + len(server_id)
    ips_at = disk_at + 2 + len(disk)
    ram_at = ips_at + 2 + len(ips)
    return {
        "server_id": 8,
        "disk": disk_at,
        "ips": ips_at,
        "ram_mb": ram_at,
        "vcpus": ram_at + 4,
    }


GOOD_RESOLUTION = msg(messages.AsapType.HANDLE_RESOLUTION, HANDLE)
COOKIE_STATE = cookie.SessionState(
    b"Xen", "web1", "d", ("10.0.0.1",), 1, 1, True, "pe1", 1, NOW
)
SEALED = cookie.seal(COOKIE_STATE, SECRET)
CREATE_AT = create_field_offsets()


def with_length(data: bytes) -> bytes:
    return data[:2] + struct.pack("!H", len(data)) + data[4:]


# ---------------------------------------------------------------- broken inputs
#
# (id, decoder, input, field, offset where the fault starts, cause)

INVALID = Cause.INVALID_VALUES
BROKEN = [
    # the common header
    ("truncated header", "asap", b"\x05\x00\x00", "message_length", 0, INVALID),
    ("empty input", "enrp", b"", "message_length", 0, INVALID),
    (
        "length says more",
        "asap",
        GOOD_RESOLUTION[:3] + b"\x0d" + GOOD_RESOLUTION[4:],
        "message_length",
        2,
        INVALID,
    ),
    (
        "length says less",
        "asap",
        GOOD_RESOLUTION[:3] + b"\x0b" + GOOD_RESOLUTION[4:],
        "message_length",
        2,
        INVALID,
    ),
    (
        "unknown message type",
        "asap",
        msg(0x0F, HANDLE),
        "message_type",
        0,
        Cause.UNRECOGNIZED_MESSAGE,
    ),
    (
        "unknown ENRP message type",
        "enrp",
        msg(0x00),
        "message_type",
        0,
        Cause.UNRECOGNIZED_MESSAGE,
    ),
    (
        "truncated ENRP fixed fields",
        "enrp",
        msg(messages.EnrpType.LIST_REQUEST, b"\0" * 4),
        "sender_id",
        4,
        INVALID,
    ),
    # parameter framing
    (
        "parameter length past the end",
        "asap",
        msg(5, b"\x00\x09\x00\x64Xen\x00"),
        "message.parameter_length",
        6,
        INVALID,
    ),
    (
        "parameter length below 4",
        "asap",
        msg(5, b"\x00\x09\x00\x02Xen\x00"),
        "message.parameter_length",
        6,
        INVALID,
    ),
    (
        "trailing bytes after the last parameter",
        "asap",
        msg(5, HANDLE, b"\x00\x00"),
        "message",
        12,
        INVALID,
    ),
    (
        "unknown parameter, stop",
        "asap",
        msg(5, HANDLE, tlv(0x0010, b"x")),
        "message.parameter_type",
        12,
        Cause.UNRECOGNIZED_PARAMETER,
    ),
    # pool handle, cookie
    (
        "pool handle too long",
        "asap",
        msg(5, tlv(P.ParamType.POOL_HANDLE, b"h" * 33)),
        "pool_handle",
        4,
        INVALID,
    ),
    (
        "pool handle empty",
        "asap",
        msg(5, tlv(P.ParamType.POOL_HANDLE, b"")),
        "pool_handle",
        4,
        INVALID,
    ),
    (
        "cookie over 2048 bytes",
        "asap",
        msg(messages.AsapType.COOKIE, tlv(P.ParamType.COOKIE, b"c" * 2049)),
        "cookie",
        4,
        INVALID,
    ),
    (
        "cookie empty",
        "asap",
        msg(messages.AsapType.COOKIE_ECHO, tlv(P.ParamType.COOKIE, b"")),
        "cookie",
        4,
        INVALID,
    ),
    # which parameters a message has
    (
        "wrong parameter in a message",
        "asap",
        msg(2, HANDLE, tlv(P.ParamType.COOKIE, b"c"), PE_ID),
        "parameter_type",
        12,
        INVALID,
    ),
    (
        "address at message level",
        "asap",
        msg(5, HANDLE, P.encode_address("10.0.0.1")),
        "parameter_type",
        12,
        INVALID,
    ),
    (
        "missing mandatory parameter",
        "asap",
        msg(2, HANDLE),
        "pe_identifier",
        12,
        INVALID,
    ),
    ("missing pool handle", "asap", msg(2, PE_ID), "pool_handle", 12, INVALID),
    (
        "duplicate single parameter",
        "asap",
        msg(2, HANDLE, HANDLE, PE_ID),
        "pool_handle",
        12,
        INVALID,
    ),
    (
        "duplicate optional parameter",
        "asap",
        msg(5, HANDLE, *[P.encode_handle_resolution_option(1)] * 2),
        "items",
        20,
        INVALID,
    ),
    (
        "handle table starts with a pool element",
        "enrp",
        msg(
            messages.EnrpType.HANDLE_TABLE_RESPONSE,
            IDS,
            tlv(P.ParamType.POOL_ELEMENT, PE_FIXED + TCP + POLICY),
        ),
        "handle_table.parameter_type",
        12,
        INVALID,
    ),
    # pool elements
    (
        "pool element with 1 parameter",
        "asap",
        registration(TCP),
        "pool_element",
        PE_AT,
        INVALID,
    ),
    (
        "pool element with 4 parameters",
        "asap",
        registration(TCP, POLICY, TCP, TCP),
        "pool_element",
        PE_AT,
        INVALID,
    ),
    (
        "pool element without its fixed fields",
        "asap",
        msg(1, HANDLE, tlv(P.ParamType.POOL_ELEMENT, b"\0" * 8)),
        "pool_element",
        16,
        INVALID,
    ),
    (
        "policy before the transport",
        "asap",
        registration(POLICY, TCP),
        "pool_element.user_transport",
        TRANSPORT_AT,
        INVALID,
    ),
    (
        "policy of the wrong size (short)",
        "asap",
        registration(
            TCP,
            tlv(
                P.ParamType.POOL_MEMBER_SELECTION_POLICY,
                struct.pack("!I", P.PolicyType.LEAST_USED),
            ),
        ),
        "policy.length",
        TRANSPORT_AT + 16 + 2,
        INVALID,
    ),
    (
        "policy of the wrong size (long)",
        "asap",
        registration(
            TCP,
            tlv(
                P.ParamType.POOL_MEMBER_SELECTION_POLICY,
                struct.pack("!III", P.PolicyType.RANDOM, 1, 2),
            ),
        ),
        "policy.length",
        TRANSPORT_AT + 16 + 2,
        INVALID,
    ),
    (
        "policy data too long",
        "asap",
        registration(
            TCP,
            tlv(
                P.ParamType.POOL_MEMBER_SELECTION_POLICY,
                struct.pack("!I", 0x12345678) + bytes(65),
            ),
        ),
        "policy",
        TRANSPORT_AT + 16 + 4,
        INVALID,
    ),
    (
        "too many addresses",
        "asap",
        registration(sctp_with(*[P.encode_address("10.0.0.1")] * 33), POLICY),
        "sctp_transport.address",
        ADDRESSES_AT,
        INVALID,
    ),
    (
        "no address",
        "asap",
        registration(sctp_with(), POLICY),
        "sctp_transport.address",
        ADDRESSES_AT,
        INVALID,
    ),
    (
        "two addresses in a TCP transport",
        "asap",
        registration(
            tcp_with(P.encode_address("10.0.0.1"), P.encode_address("10.0.0.2")), POLICY
        ),
        "tcp_transport.address",
        ADDRESSES_AT,
        INVALID,
    ),
    (
        "bad IPv4 length",
        "asap",
        registration(tcp_with(tlv(P.ParamType.IPV4_ADDRESS, b"\x0a\0\0\1\1")), POLICY),
        "tcp_transport.address",
        ADDRESSES_AT,
        INVALID,
    ),
    (
        "bad IPv6 length",
        "asap",
        registration(tcp_with(tlv(P.ParamType.IPV6_ADDRESS, bytes(4))), POLICY),
        "tcp_transport.address",
        ADDRESSES_AT,
        INVALID,
    ),
    (
        "not an address in a transport",
        "asap",
        registration(tcp_with(HANDLE), POLICY),
        "tcp_transport.address",
        ADDRESSES_AT,
        INVALID,
    ),
    (
        "operation error without a cause",
        "asap",
        msg(messages.AsapType.ERROR, tlv(P.ParamType.OPERATION_ERROR, b"")),
        "operation_error",
        4,
        INVALID,
    ),
    (
        "operation error with 17 causes",
        "asap",
        msg(
            messages.AsapType.ERROR,
            tlv(P.ParamType.OPERATION_ERROR, struct.pack("!HH", 1, 4) * 17),
        ),
        "operation_error",
        8 + 16 * 4,
        INVALID,
    ),
    (
        "pool authentication of 31 bytes",
        "asap",
        msg(
            1,
            HANDLE,
            tlv(P.ParamType.POOL_ELEMENT, PE_FIXED + TCP + POLICY),
            tlv(P.ParamType.POOL_AUTHENTICATION, bytes(31)),
        ),
        "pool_authentication",
        PE_AT + 44,
        INVALID,
    ),
    (
        "PE identifier of 2 bytes",
        "asap",
        msg(2, HANDLE, tlv(P.ParamType.PE_IDENTIFIER, b"\0\1")),
        "pe_identifier",
        12,
        INVALID,
    ),
    # session messages
    (
        "session truncated header",
        "session",
        b"\x20\x00\x00\x0e\x00",
        "length",
        0,
        INVALID,
    ),
    (
        "session bad length",
        "session",
        sess(0x20, text(b"web1"))[:3] + b"\x20" + sess(0x20, text(b"web1"))[4:],
        "length",
        2,
        INVALID,
    ),
    (
        "session bad version",
        "session",
        sess(0x20, text(b"web1"), version=2),
        "version",
        4,
        INVALID,
    ),
    (
        "session unknown type",
        "session",
        sess(0x7F, text(b"web1")),
        "type",
        0,
        Cause.UNRECOGNIZED_MESSAGE,
    ),
    (
        "server_id too long",
        "session",
        create(server_id=b"a" * 33),
        "server_id",
        8,
        INVALID,
    ),
    (
        "server_id not UTF-8",
        "session",
        sess(0x20, text(b"\xff\xfe")),
        "server_id",
        10,
        INVALID,
    ),
    (
        "server_id length past the end",
        "session",
        sess(0x20, b"\x00\x09web"),
        "server_id",
        8,
        INVALID,
    ),
    (
        "disk too long",
        "session",
        create(disk=b"d" * 257),
        "disk",
        CREATE_AT["disk"],
        INVALID,
    ),
    (
        "truncated fixed field",
        "session",
        sess(0x10, text(b"web1"), b"\0\0"),
        "interval_s",
        14,
        INVALID,
    ),
    (
        "code contradicts the type",
        "session",
        sess(
            session.SessionType.CREATE_SUCCESS,
            text(b"web1"),
            struct.pack("!iQ", 11, 0),
            text(b""),
        ),
        "code",
        14,
        INVALID,
    ),
    (
        "session trailing bytes",
        "session",
        sess(0x20, text(b"web1"), b"\0\0"),
        "length",
        14,
        INVALID,
    ),
    # the semantic checks of a CreateServer
    (
        "server_id invalid characters",
        "session",
        create(server_id=b"web/1"),
        "server_id",
        8,
        INVALID,
    ),
    ("server_id empty", "session", create(server_id=b""), "server_id", 8, INVALID),
    ("ram 0", "session", create(ram=0), "ram_mb", CREATE_AT["ram_mb"], INVALID),
    ("vcpus 0", "session", create(vcpus=0), "vcpus", CREATE_AT["vcpus"], INVALID),
    (
        "malformed IP in CreateServer",
        "session",
        create(ips=b"10.0.0.1 10.0.0.300"),
        "ips",
        create_field_offsets(ips=b"10.0.0.1 10.0.0.300")["ips"],
        INVALID,
    ),
    # cookies
    ("cookie too short", "cookie", SEALED[:40], "cookie", 0, Cause.SECURITY_REJECTION),
    (
        "cookie altered",
        "cookie",
        SEALED[:30] + b"X" + SEALED[31:],
        "cookie",
        len(SEALED) - 32,
        Cause.SECURITY_REJECTION,
    ),
]


def _params(rows):
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


@pytest.mark.parametrize("decoder, data, field, offset, cause", _params(BROKEN))
def test_error_names_the_field_and_an_offset_inside_the_input(
    decoder, data, field, offset, cause
):
    err = decode_error(decoder, data)
    assert err.field == field, str(err)
    assert isinstance(err.offset, int) and 0 <= err.offset <= len(data), str(err)
    assert err.cause == cause
    assert not err.fatal
    assert str(err).startswith(f"{field} at byte {err.offset}: ")


@pytest.mark.parametrize("decoder, data, field, offset, cause", _params(BROKEN))
def test_error_offset_points_at_the_fault(decoder, data, field, offset, cause):
    """ProtocolError.offset is "the byte offset in the input where it starts"."""
    assert decode_error(decoder, data).offset == offset


def test_broken_inputs_decode_once_repaired():
    """The table's inputs differ from valid ones only where it says (a sanity check of
    the helpers: their valid forms decode)."""
    messages.decode(registration(TCP, POLICY))
    messages.decode(
        registration(sctp_with(*[P.encode_address("10.0.0.1")] * 32), POLICY)
    )
    messages.decode(msg(2, HANDLE, PE_ID))
    messages.decode(
        msg(
            messages.AsapType.ERROR,
            tlv(P.ParamType.OPERATION_ERROR, struct.pack("!HH", 1, 4) * 16),
        )
    )
    messages.decode(msg(5, tlv(P.ParamType.POOL_HANDLE, b"h" * 32)))
    messages.decode(msg(messages.AsapType.COOKIE, tlv(P.ParamType.COOKIE, b"c" * 2048)))
    assert session.decode(create()) == session.CreateServer(
        "web1", "nbd://san/web1", ("10.0.0.1",), 300, 1
    )
    assert session.decode(sess(0x20, text(b"web1"))) == session.StopServer("web1")
    assert (
        cookie.unseal(SEALED, SECRET, pool_handle=b"Xen", now=NOW, max_age_s=60)
        == COOKIE_STATE
    )


# -------------------------------------------------------------------- error_for


def answer(
    err: ProtocolError, ppid: int = messages.ASAP_PPID, **ids
) -> messages.Message:
    """error_for's message, checked to survive the wire."""
    reply = error_for(err, ppid, **ids)
    assert messages.decode(messages.encode(reply), ppid) == reply
    return reply


def test_unknown_message_type_answer_carries_the_message():
    data = msg(0x0F, HANDLE)
    err = decode_error("asap", data)
    assert err.cause == Cause.UNRECOGNIZED_MESSAGE
    reply = answer(err)
    assert isinstance(reply, AsapError)
    assert reply.error == P.OperationError.single(Cause.UNRECOGNIZED_MESSAGE, data)


def test_unknown_enrp_message_type_answer_is_an_enrp_error():
    data = msg(0x0B, IDS)
    err = decode_error("enrp", data)
    reply = answer(err, messages.ENRP_PPID, sender_id=7, receiver_id=9)
    assert isinstance(reply, EnrpError)
    assert (reply.sender_id, reply.receiver_id) == (7, 9)
    assert reply.error.causes == (P.ErrorCause(Cause.UNRECOGNIZED_MESSAGE, data),)


@pytest.mark.parametrize("ptype", [0x0010, 0x4010])
def test_unrecognized_parameter_answer_carries_the_parameter(ptype):
    param = tlv(ptype, b"hello")
    err = decode_error("asap", msg(5, HANDLE, param))
    assert err.cause == Cause.UNRECOGNIZED_PARAMETER
    assert err.report is (ptype == 0x4010)
    assert err.data == param[:9]
    reply = answer(err)
    assert reply.error.causes == (
        P.ErrorCause(Cause.UNRECOGNIZED_PARAMETER, param[:9]),
    )


@pytest.mark.parametrize(
    "decoder, data, field",
    [
        ("asap", msg(5, tlv(P.ParamType.POOL_HANDLE, b"h" * 33)), "pool_handle"),
        (
            "asap",
            registration(tcp_with(tlv(P.ParamType.IPV4_ADDRESS, b"\x0a\0\0")), POLICY),
            "tcp_transport.address",
        ),
        ("asap", msg(2, HANDLE), "pe_identifier"),
        ("enrp", msg(messages.EnrpType.LIST_REQUEST, b"\0" * 4), "sender_id"),
    ],
)
def test_invalid_values_answer_names_the_field(decoder, data, field):
    err = decode_error(decoder, data)
    assert err.cause == Cause.INVALID_VALUES
    ppid = messages.ENRP_PPID if decoder == "enrp" else messages.ASAP_PPID
    reply = answer(err, ppid)
    (cause,) = reply.error.causes
    assert cause.code == Cause.INVALID_VALUES
    assert cause.info.startswith(f"{field} at byte {err.offset}: ".encode())
    assert len(cause.info) <= 256


def test_invalid_values_answer_with_explicit_data_keeps_it():
    err = ProtocolError("bad", field="x", offset=3, data=b"raw")
    assert answer(err).error.causes == (P.ErrorCause(Cause.INVALID_VALUES, b"raw"),)


def test_answer_of_a_session_error_names_the_field():
    err = decode_error("session", sess(0x20, text(b"web1"), version=2))
    assert answer(err).error.causes[0].info.startswith(b"version at byte 4")


@pytest.mark.parametrize("size", [65521, messages.MAX_MESSAGE_SIZE])
def test_answer_to_a_large_unknown_message_still_encodes(size):
    data = struct.pack("!BBH", 0x0F, 0, size) + bytes(size - 4)
    err = decode_error("asap", data)
    assert err.cause == Cause.UNRECOGNIZED_MESSAGE
    encoded = messages.encode(error_for(err))
    assert len(encoded) <= messages.MAX_MESSAGE_SIZE


def test_answer_to_a_large_unknown_parameter_still_encodes():
    param = struct.pack("!HH", 0x4010, 65521) + bytes(65517)
    err = decode_error("asap", msg(5, param))
    assert err.report and err.cause == Cause.UNRECOGNIZED_PARAMETER
    encoded = messages.encode(error_for(err))
    assert len(encoded) <= messages.MAX_MESSAGE_SIZE


def test_answer_quotes_the_start_of_an_unknown_message():
    data = struct.pack("!BBH", 0x0F, 0, 65520) + bytes(65516)
    reply = answer(decode_error("asap", data))
    assert reply.error.causes[0].info == data[: messages.MAX_ERROR_INFO]


@pytest.mark.parametrize("junk", [b"\x00", b"\xff\xff", b"abc"])
def test_bytes_after_the_policy_in_a_pool_element_are_refused(junk):
    """Only the padding of the policy (none: its length is a multiple of 4) may follow it;
    the same bytes after an ASAP transport are refused."""
    with pytest.raises(ProtocolError) as caught:
        messages.decode(registration(TCP, POLICY, junk))
    assert caught.value.field.startswith("pool_element")


@pytest.mark.parametrize("junk", [b"\x00", b"\xff\xff", b"abc"])
def test_bytes_after_the_asap_transport_in_a_pool_element_are_refused(junk):
    with pytest.raises(ProtocolError) as caught:
        messages.decode(registration(TCP, POLICY, TCP, junk))
    assert caught.value.field.startswith("pool_element")


def test_samples_decode():
    """Every sample is valid: the table's faults are the only ones."""
    for m in samples.all_messages():
        assert messages.decode(messages.encode(m), m.PPID) == m
    for m in samples.all_session_messages():
        assert session.decode(session.encode(m)) == m
