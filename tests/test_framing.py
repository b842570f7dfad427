"""RSerPoolStream and ShimStream: framing ASAP/ENRP and PE <-> PU session messages on TCP."""

from __future__ import annotations

import struct

import pytest

from xenpool.protocol import framing, messages, session
from xenpool.protocol import params as P
from xenpool.protocol.errors import Cause, ProtocolError
from xenpool.protocol.framing import (
    RSerPoolStream,
    ShimStream,
    frame_message,
    shim_frame,
)
from xenpool.tools import samples

ASAP = [m for m in samples.all_messages() if m.PPID == messages.ASAP_PPID]
ENRP = [m for m in samples.all_messages() if m.PPID == messages.ENRP_PPID]
SESSIONS = samples.all_session_messages()
GOOD = messages.encode(messages.HandleResolution(b"Xen", items=3))
# Well framed, but a pool handle of 0 bytes is not a pool handle.
EMPTY_HANDLE = messages.encode(messages.HandleResolution(b"Xen"))[:4] + struct.pack(
    "!HH", P.ParamType.POOL_HANDLE, 4
)
EMPTY_HANDLE = (
    EMPTY_HANDLE[:2] + struct.pack("!H", len(EMPTY_HANDLE)) + EMPTY_HANDLE[4:]
)


def drain(stream) -> list:
    """next_message() until None; ProtocolErrors become items of the list."""
    out = []
    while True:
        try:
            msg = stream.next_message()
        except ProtocolError as err:
            if err.fatal:
                raise
            out.append(err)
            continue
        if msg is None:
            return out
        out.append(msg)


def feed_all(stream, *pieces: bytes) -> list:
    out = []
    for piece in pieces:
        stream.feed(piece)
        out += drain(stream)
    return out


def with_length(data: bytes) -> bytes:
    return data[:2] + struct.pack("!H", len(data)) + data[4:]


def asap_stream_bytes() -> bytes:
    return b"".join(map(messages.encode, ASAP))


def shim_stream_bytes() -> bytes:
    return b"".join(map(frame_message, ASAP + SESSIONS))


SHIM_DECODED = [(messages.ASAP_PPID, m) for m in ASAP] + [
    (session.XENPOOL_PPID, m) for m in SESSIONS
]


# ------------------------------------------------------------------- chunk handling


@pytest.mark.parametrize(
    "make, data, expected",
    [
        (lambda: RSerPoolStream(), asap_stream_bytes(), ASAP),
        (
            lambda: RSerPoolStream(messages.ENRP_PPID),
            b"".join(map(messages.encode, ENRP)),
            ENRP,
        ),
        (ShimStream, shim_stream_bytes(), SHIM_DECODED),
    ],
    ids=["asap", "enrp", "shim"],
)
def test_split_at_every_byte_boundary_decodes_the_same(make, data, expected):
    assert feed_all(make(), data) == expected
    for cut in range(len(data) + 1):
        assert feed_all(make(), data[:cut], data[cut:]) == expected, cut
    # one byte at a time: every message appears exactly when its last byte arrives
    stream = make()
    out = []
    for i in range(len(data)):
        stream.feed(data[i : i + 1])
        out += drain(stream)
        assert stream.buffered <= stream.max_message_size + stream.header_size
    assert out == expected
    assert stream.buffered == 0


def test_several_messages_in_one_chunk():
    stream = RSerPoolStream()
    stream.feed(GOOD * 3 + messages.encode(ASAP[0]))
    assert [stream.next_message() for _ in range(4)] == [messages.decode(GOOD)] * 3 + [
        ASAP[0]
    ]
    assert stream.next_message() is None
    assert stream.buffered == 0

    shim = ShimStream()
    shim.feed(
        frame_message(SESSIONS[0])
        + frame_message(ASAP[1])
        + frame_message(SESSIONS[-1])
    )
    assert drain(shim) == [
        (session.XENPOOL_PPID, SESSIONS[0]),
        (messages.ASAP_PPID, ASAP[1]),
        (session.XENPOOL_PPID, SESSIONS[-1]),
    ]


@pytest.mark.parametrize(
    "make, frame", [(RSerPoolStream, GOOD), (ShimStream, frame_message(SESSIONS[0]))]
)
def test_partial_input_returns_none_and_waits(make, frame):
    stream = make()
    assert stream.next_message() is None
    stream.feed(b"")
    assert stream.next_message() is None
    for i in range(len(frame) - 1):
        stream.feed(frame[i : i + 1])
        assert stream.next_message() is None
        assert stream.next_message() is None  # asking again changes nothing
        assert stream.buffered == i + 1
    stream.feed(frame[-1:])
    assert stream.next_message() is not None
    assert stream.next_message() is None
    assert stream.buffered == 0


def test_message_followed_by_a_partial_one():
    stream = RSerPoolStream()
    second = messages.encode(ASAP[0])
    stream.feed(GOOD + second[:5])
    assert stream.next_message() == messages.decode(GOOD)
    assert stream.next_message() is None
    assert stream.buffered == 5
    stream.feed(second[5:])
    assert stream.next_message() == ASAP[0]


# ------------------------------------------------------------------- fatal framing


def assert_stays_broken(stream, fatal: ProtocolError) -> None:
    for _ in range(3):
        with pytest.raises(ProtocolError) as again:
            stream.next_message()
        assert again.value is fatal
        with pytest.raises(ProtocolError) as again:
            stream.feed(GOOD)
        assert again.value is fatal
        assert stream.buffered == 0


def test_over_long_length_is_refused_at_feed_before_the_rest_arrives():
    stream = RSerPoolStream(max_message_size=64)
    stream.feed(b"\x05\x00")  # half a header: nothing to judge yet
    with pytest.raises(ProtocolError) as caught:
        stream.feed(b"\x00\x41")  # 65 > 64: refused now, not when 65 bytes have come
    err = caught.value
    assert err.fatal
    assert err.field == "message_length"
    assert err.offset == 2
    assert stream.buffered == 0
    assert_stays_broken(stream, err)


def test_over_long_length_with_the_body_in_the_same_chunk():
    stream = RSerPoolStream(max_message_size=64)
    body = b"\x05\x00\x01\x00" + bytes(252)
    with pytest.raises(ProtocolError) as caught:
        stream.feed(body)
    assert caught.value.fatal and stream.buffered == 0
    assert_stays_broken(stream, caught.value)


def test_shim_over_long_length_is_refused_at_feed():
    stream = ShimStream()
    header = struct.pack("!II", session.XENPOOL_PPID, messages.MAX_MESSAGE_SIZE + 1)
    stream.feed(header[:7])
    with pytest.raises(ProtocolError) as caught:
        stream.feed(header[7:])
    err = caught.value
    assert err.fatal and err.field == "shim.length" and err.offset == 4
    assert stream.buffered == 0
    assert_stays_broken(stream, err)

    small = ShimStream(max_message_size=16)
    small.feed(shim_frame(session.XENPOOL_PPID, bytes(16)))  # 16 is allowed
    with pytest.raises(ProtocolError):
        small.next_message()  # (but not a session message)
    with pytest.raises(ProtocolError) as caught:
        small.feed(struct.pack("!II", session.XENPOOL_PPID, 17))
    assert caught.value.fatal and caught.value.offset == 24 + 4


def test_bad_length_after_good_messages_is_fatal_at_its_stream_offset():
    stream = RSerPoolStream(max_message_size=100)
    stream.feed(GOOD + GOOD + b"\x05\x00\x00\x65" + bytes(40))
    assert stream.next_message() == messages.decode(GOOD)
    assert stream.next_message() == messages.decode(GOOD)
    with pytest.raises(ProtocolError) as caught:
        stream.next_message()
    assert caught.value.fatal
    assert caught.value.offset == 2 * len(GOOD) + 2
    assert stream.buffered == 0
    assert_stays_broken(stream, caught.value)


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_below_four_is_fatal(length):
    stream = RSerPoolStream()
    with pytest.raises(ProtocolError) as caught:
        stream.feed(struct.pack("!BBH", 5, 0, length) + GOOD)
    assert caught.value.fatal
    assert caught.value.field == "message_length"
    assert caught.value.offset == 2
    assert_stays_broken(stream, caught.value)


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_below_four_after_a_message_is_fatal(length):
    stream = RSerPoolStream()
    stream.feed(GOOD)
    assert stream.next_message() is not None
    with pytest.raises(ProtocolError) as caught:
        stream.feed(struct.pack("!BBH", 5, 0, length))
    assert caught.value.fatal and caught.value.offset == len(GOOD) + 2


# --------------------------------------------------------------- non-fatal errors


def test_malformed_but_well_framed_message_is_not_fatal():
    stream = RSerPoolStream()
    stream.feed(EMPTY_HANDLE + GOOD)
    with pytest.raises(ProtocolError) as caught:
        stream.next_message()
    assert not caught.value.fatal
    assert caught.value.field == "pool_handle"
    assert stream.next_message() == messages.decode(GOOD)
    assert stream.next_message() is None
    stream.feed(GOOD)  # and the stream goes on
    assert stream.next_message() == messages.decode(GOOD)


@pytest.mark.parametrize(
    "bad",
    [
        shim_frame(messages.ASAP_PPID, EMPTY_HANDLE),
        shim_frame(
            session.XENPOOL_PPID, session.encode(SESSIONS[0])[:-1]
        ),  # inner length wrong
        shim_frame(session.XENPOOL_PPID, b""),
        shim_frame(messages.ASAP_PPID, b"\x05\x00"),
    ],
)
def test_shim_malformed_payload_is_not_fatal(bad):
    stream = ShimStream()
    stream.feed(bad + frame_message(SESSIONS[3]))
    with pytest.raises(ProtocolError) as caught:
        stream.next_message()
    assert not caught.value.fatal
    assert 0 <= caught.value.offset <= len(bad)
    assert stream.next_message() == (session.XENPOOL_PPID, SESSIONS[3])


def drain_until_error(stream) -> tuple[list, ProtocolError]:
    """The messages before the first error, and that error."""
    out = []
    while True:
        try:
            msg = stream.next_message()
        except ProtocolError as err:
            return out, err
        assert msg is not None, "no error"
        out.append(msg)


def test_error_offsets_are_stream_offsets():
    with pytest.raises(ProtocolError) as alone:
        messages.decode(EMPTY_HANDLE)
    inner = alone.value.offset
    assert inner == 4

    stream = RSerPoolStream()
    prefix = GOOD + messages.encode(ASAP[0])
    stream.feed(prefix + EMPTY_HANDLE)
    before, err = drain_until_error(stream)
    assert len(before) == 2 and not err.fatal
    assert err.offset == len(prefix) + inner

    shim = ShimStream()
    shim_prefix = frame_message(SESSIONS[0]) + frame_message(ASAP[0])
    shim.feed(shim_prefix + shim_frame(messages.ASAP_PPID, EMPTY_HANDLE))
    before, err = drain_until_error(shim)
    assert len(before) == 2 and not err.fatal
    assert err.offset == len(shim_prefix) + framing.SHIM.size + inner

    # a session payload error too: the version field at 4 in the payload
    bad_version = bytearray(session.encode(SESSIONS[0]))
    bad_version[5] = 9
    shim = ShimStream()
    shim.feed(shim_prefix + shim_frame(session.XENPOOL_PPID, bytes(bad_version)))
    _, err = drain_until_error(shim)
    assert err.field == "version"
    assert err.offset == len(shim_prefix) + framing.SHIM.size + 4


def test_unknown_ppid_in_the_shim_is_not_fatal():
    stream = ShimStream()
    first = frame_message(SESSIONS[0])
    unknown = shim_frame(messages.ENRP_PPID, messages.encode(ENRP[0]))
    stream.feed(first + unknown + frame_message(ASAP[2]))
    assert stream.next_message() == (session.XENPOOL_PPID, SESSIONS[0])
    with pytest.raises(ProtocolError) as caught:
        stream.next_message()
    err = caught.value
    assert not err.fatal
    assert err.cause == Cause.UNRECOGNIZED_MESSAGE
    assert err.field == "shim.ppid"
    assert err.offset == len(first)
    assert stream.next_message() == (messages.ASAP_PPID, ASAP[2])


# ------------------------------------------------------------------------ framing


@pytest.mark.parametrize("msg", ASAP + SESSIONS, ids=lambda m: type(m).__name__)
def test_frame_message_round_trip(msg):
    frame = frame_message(msg)
    ppid, length = framing.SHIM.unpack_from(frame)
    if isinstance(msg, messages.Message):
        assert ppid == messages.ASAP_PPID
        assert frame[8:] == messages.encode(msg)
    else:
        assert ppid == session.XENPOOL_PPID
        assert frame[8:] == session.encode(msg)
    assert length == len(frame) - 8
    assert frame == shim_frame(ppid, frame[8:])
    stream = ShimStream()
    stream.feed(frame)
    assert stream.next_message() == (ppid, msg)
    assert stream.next_message() is None


@pytest.mark.parametrize("msg", ASAP + ENRP, ids=lambda m: type(m).__name__)
def test_rserpool_stream_round_trip(msg):
    stream = RSerPoolStream(msg.PPID)
    stream.feed(messages.encode(msg))
    assert stream.next_message() == msg


def test_shim_frame_layout():
    assert shim_frame(0x01020304, b"abc") == b"\x01\x02\x03\x04\x00\x00\x00\x03abc"
    assert shim_frame(7, b"") == b"\x00\x00\x00\x07\x00\x00\x00\x00"


# -------------------------------------------------------------- unknown parameters


def resolution_with(param: bytes) -> bytes:
    return with_length(GOOD + param)


def unknown(ptype: int, value: bytes = b"abcde") -> bytes:
    return P.tlv(ptype, value)


@pytest.mark.parametrize("ptype", [0x0010, 0x3FFF])
def test_unknown_parameter_0b00_stops_without_report(ptype):
    param = unknown(ptype)
    stream = RSerPoolStream()
    stream.feed(resolution_with(param) + GOOD)
    with pytest.raises(ProtocolError) as caught:
        stream.next_message()
    err = caught.value
    assert err.cause == Cause.UNRECOGNIZED_PARAMETER
    assert err.report is False
    assert not err.fatal
    assert err.offset == len(GOOD)
    assert err.data == param[:9]  # the TLV, without its padding
    assert stream.next_message() == messages.decode(GOOD)
    assert stream.reports == []


@pytest.mark.parametrize("ptype", [0x4010, 0x7FFF])
def test_unknown_parameter_0b01_stops_and_reports(ptype):
    param = unknown(ptype)
    stream = RSerPoolStream()
    stream.feed(resolution_with(param) + GOOD)
    with pytest.raises(ProtocolError) as caught:
        stream.next_message()
    err = caught.value
    assert err.cause == Cause.UNRECOGNIZED_PARAMETER
    assert err.report is True
    assert not err.fatal
    assert err.data == param[:9]
    assert stream.next_message() == messages.decode(GOOD)


@pytest.mark.parametrize("ptype", [0x8010, 0xBFFF])
def test_unknown_parameter_0b10_is_skipped_silently(ptype):
    stream = RSerPoolStream()
    stream.feed(resolution_with(unknown(ptype)))
    assert stream.next_message() == messages.decode(GOOD)
    assert stream.reports == []


@pytest.mark.parametrize("ptype", [0xC010, 0xFFFF])
def test_unknown_parameter_0b11_is_skipped_and_reported(ptype):
    param = unknown(ptype)
    stream = RSerPoolStream()
    stream.feed(resolution_with(param) + resolution_with(unknown(0x8011)))
    assert stream.next_message() == messages.decode(GOOD)
    assert stream.next_message() == messages.decode(GOOD)
    assert stream.reports == [param[:9]]

    shim = ShimStream()
    shim.feed(shim_frame(messages.ASAP_PPID, resolution_with(param)))
    assert shim.next_message() == (messages.ASAP_PPID, messages.decode(GOOD))
    assert shim.reports == [param[:9]]


def test_unknown_parameters_inside_a_transport():
    """The same rules hold for parameters nested in a pool element's transport."""
    pe = samples.pool_element(1)
    transport = P.tlv(
        P.ParamType.TCP_TRANSPORT,
        struct.pack("!HH", 5000, 1)
        + P.encode_address("127.0.0.1")
        + unknown(0xC020, b"xy")
        + unknown(0x8020),
    )
    body = struct.pack("!IIi", pe.identifier, pe.home_registrar, pe.registration_life)
    body += transport + P.encode_policy(pe.policy)
    data = with_length(
        messages.encode(messages.Registration(b"Xen", pe))[:12]
        + P.tlv(P.ParamType.POOL_ELEMENT, body)
    )
    stream = RSerPoolStream()
    stream.feed(data)
    assert stream.next_message() == messages.Registration(b"Xen", pe)
    assert stream.reports == [unknown(0xC020, b"xy")[:6]]

    stop = data.replace(b"\xc0\x20", b"\x40\x20")
    stream = RSerPoolStream()
    stream.feed(stop)
    with pytest.raises(ProtocolError) as caught:
        stream.next_message()
    assert caught.value.report and caught.value.cause == Cause.UNRECOGNIZED_PARAMETER
    assert caught.value.offset == stop.index(b"\x40\x20")


def test_a_repeated_application_frame_decodes_to_the_same_message():
    """Heartbeats repeat byte for byte: the stream reuses the last decoded message, which
    must be exactly what decoding would give, whatever comes in between."""
    beat = session.CheckRunning("web1", 1)
    other = session.CheckRunning("web2", 1)
    broken = shim_frame(
        session.XENPOOL_PPID, session.encode(beat)[:-1]
    )  # interval cut short
    stream = ShimStream()
    stream.feed(
        frame_message(beat) * 2
        + broken
        + frame_message(beat)
        + frame_message(other)
        + frame_message(beat)
    )
    got = drain(stream)
    assert got[:2] == [(session.XENPOOL_PPID, beat)] * 2
    assert isinstance(got[2], ProtocolError)
    assert got[3:] == [
        (session.XENPOOL_PPID, beat),
        (session.XENPOOL_PPID, other),
        (session.XENPOOL_PPID, beat),
    ]


def test_asap_frames_are_decoded_every_time_and_still_report_unknown_parameters():
    stream = ShimStream()
    unknown = struct.pack("!HH", 0xCFFF, 4)  # type 11xx xxxx: skip and report
    frame = GOOD + unknown
    frame = frame[:2] + struct.pack("!H", len(frame)) + frame[4:]
    stream.feed(shim_frame(messages.ASAP_PPID, frame) * 2)
    assert [ppid for ppid, _ in drain(stream)] == [messages.ASAP_PPID] * 2
    assert len(stream.reports) == 2
