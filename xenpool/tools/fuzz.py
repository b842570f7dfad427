"""``xenpool fuzz``: random and mutated bytes into every decoder a socket feeds.

The decoders (``DECODERS``):

* ``asap``, ``enrp``: ``messages.decode`` with PPID 11 and 12;
* ``session``: ``session.decode`` (PE <-> PU application messages);
* ``cookie``: ``cookie.unseal`` under a fixed secret, pool handle and clock;
* ``asap-stream``, ``enrp-stream``: ``framing.RSerPoolStream``, ``shim-stream``:
  ``framing.ShimStream``, fed in chunks, each feed followed by ``next_message()``
  until it returns None or raises a fatal error.

A decoder may only raise ``ProtocolError`` (``CookieError`` is one). Anything else is
a crash. So is wrong behaviour this module can see (``InvariantError``): an error whose
field or offset is not in the input, an ERROR answer (``messages.error_for``) that
cannot be encoded, an accepted message that does not survive encode and decode again,
a stream that buffers more than one frame after draining, that decodes differently
when the same bytes come in other chunks, or that stops repeating its fatal error.
An input taking more than ``HANG_S`` of CPU is a hang.

Inputs come from a seed corpus (every sample message, its framings, sealed cookies)
through bit flips, byte sets, inserts, deletes, truncation, duplicated slices,
splices, boundary values in length fields, inserted parameters, plus fully random
bytes. Everything is drawn from ``random.Random(seed)``: a seed always gives the same
inputs, so the same accepted/rejected counts and input digest.

From tests: ``fuzz_one(decoder, data, chunks=None, max_message_size=None)`` runs one
input with all checks and raises what a crash raises; ``mutate`` and ``corpus`` give
the mutator and the seed corpus; ``campaign`` runs a whole seeded campaign.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import random
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

from ..protocol import cookie, framing, messages, session
from ..protocol import params as P
from ..protocol.errors import Cause, ProtocolError
from . import samples

# The cookie decoder's fixed world: everything the fuzzer seals is for this pool,
# under this secret, issued around this time.
SECRET = b"xenpool fuzz secret"
COOKIE_POOL_HANDLE = b"Xen"
COOKIE_NOW = 1_700_000_000.0
COOKIE_MAX_AGE_S = 3600.0

HANG_S = 1.0  # CPU seconds one input may take
STUCK_S = 5.0  # a case still running after this much CPU is interrupted as a hang
ROUND_TRIP_LIMIT = 32_768  # larger messages may not re-encode (the encoder pads)
MAX_STORED_CRASHES = 100
MAX_PRINTED_CRASHES = 20

DECODERS = (
    "asap",
    "enrp",
    "session",
    "cookie",
    "asap-stream",
    "enrp-stream",
    "shim-stream",
)
STREAM_DECODERS = frozenset(("asap-stream", "enrp-stream", "shim-stream"))


class InvariantError(AssertionError):
    """A decoder returned or raised, but not what it must."""


class _Stuck(BaseException):
    """Raised into a case that has been running for STUCK_S of CPU."""


# ------------------------------------------------------------------------ decoders


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one input did: ``accepted`` when no ProtocolError was raised at all."""

    accepted: bool
    messages: int = 0  # messages decoded
    errors: int = 0  # ProtocolErrors raised (a stream goes on after non-fatal ones)
    fatal: bool = False  # a stream raised a fatal error


def _check_error(err: ProtocolError, size: int, where: str) -> None:
    """Every ProtocolError names a field and a byte offset inside the input."""
    if not isinstance(err.field, str) or not err.field:
        raise InvariantError(f"{where}: error without a field: {err!r}")
    if type(err.offset) is not int or not 0 <= err.offset <= size:
        raise InvariantError(
            f"{where}: offset {err.offset!r} outside the {size}-byte input: {err}"
        )
    if not isinstance(err.cause, Cause):
        raise InvariantError(f"{where}: cause {err.cause!r} is not a Cause")


# The protocol a decoder's errors are answered in (with messages.error_for).
_ANSWER_PPID = {
    "asap": messages.ASAP_PPID,
    "enrp": messages.ENRP_PPID,
    "asap-stream": messages.ASAP_PPID,
    "enrp-stream": messages.ENRP_PPID,
    "shim-stream": messages.ASAP_PPID,
}


def _check_answer(err: ProtocolError, where: str, answers: bool) -> None:
    """A daemon answers a reportable error with ``error_for``: that must go on the wire."""
    ppid = _ANSWER_PPID.get(where)
    if ppid is None or not err.report or not answers:
        return
    try:
        messages.encode(messages.error_for(err, ppid))
    except Exception as exc:
        raise InvariantError(
            f"{where}: the answer to {err} does not encode: {exc!r}"
        ) from exc


def _round_trip(where: str, msg: object, encode: Callable, decode: Callable) -> None:
    try:
        again = decode(encode(msg))
    except Exception as exc:
        raise InvariantError(
            f"{where}: accepted {msg!r} does not encode and decode again: {exc!r}"
        ) from exc
    if again != msg:
        raise InvariantError(
            f"{where}: accepted {msg!r}, re-encoded it decodes as {again!r}"
        )


def _message_decoder(ppid: int, name: str) -> Callable[[bytes], object]:
    def decode(data: bytes) -> object:
        msg = messages.decode(data, ppid, [])
        if len(data) <= ROUND_TRIP_LIMIT:
            _round_trip(name, msg, messages.encode, lambda b: messages.decode(b, ppid))
        return msg

    return decode


def _decode_session(data: bytes) -> object:
    msg = session.decode(data)
    _round_trip("session", msg, session.encode, session.decode)
    return msg


def unseal(data: bytes) -> cookie.SessionState:
    """``cookie.unseal`` in the fuzzer's fixed world."""
    return cookie.unseal(
        data,
        SECRET,
        pool_handle=COOKIE_POOL_HANDLE,
        now=COOKIE_NOW,
        max_age_s=COOKIE_MAX_AGE_S,
    )


def reseal(body: bytes) -> bytes:
    """A cookie body with a valid MAC under ``SECRET`` (so the parser behind it runs)."""
    return body + hmac.new(SECRET, body, hashlib.sha256).digest()


def _decode_cookie(data: bytes) -> object:
    state = unseal(data)
    _round_trip("cookie", state, lambda s: cookie.seal(s, SECRET), unseal)
    return state


_SINGLE: dict[str, Callable[[bytes], object]] = {
    "asap": _message_decoder(messages.ASAP_PPID, "asap"),
    "enrp": _message_decoder(messages.ENRP_PPID, "enrp"),
    "session": _decode_session,
    "cookie": _decode_cookie,
}
_STREAMS: dict[str, Callable[[int], framing._Framer]] = {
    "asap-stream": lambda size: framing.RSerPoolStream(messages.ASAP_PPID, size),
    "enrp-stream": lambda size: framing.RSerPoolStream(messages.ENRP_PPID, size),
    "shim-stream": lambda size: framing.ShimStream(size),
}


def _chunked(data: bytes, chunks: Sequence[int] | None) -> list[bytes]:
    """``data`` cut into pieces of the given sizes; what is left over is one more piece."""
    if chunks is None:
        return [data]
    out, pos = [], 0
    for size in chunks:
        out.append(data[pos : pos + size])
        pos += size
        if pos >= len(data):
            break
    if pos < len(data):
        out.append(data[pos:])
    return out


def _same_fatal(a: ProtocolError, b: ProtocolError) -> bool:
    def key(e: ProtocolError) -> tuple:
        return (type(e), e.reason, e.field, e.offset, e.fatal)

    return a is b or key(a) == key(b)


def _run_stream(
    decoder: str,
    data: bytes,
    chunks: Sequence[int] | None,
    max_size: int,
    answers: bool,
) -> tuple[list, Outcome]:
    stream = _STREAMS[decoder](max_size)
    limit = stream.max_message_size + stream.header_size
    events: list = []
    fed = 0
    errors = decoded = 0
    fatal: ProtocolError | None = None
    where = decoder
    for piece in _chunked(data, chunks):
        try:
            stream.feed(piece)
        except ProtocolError as err:
            fatal = err
            fed += len(piece)
            break
        fed += len(piece)
        while True:
            before = stream.buffered
            try:
                msg = stream.next_message()
            except ProtocolError as err:
                if err.fatal:
                    fatal = err
                    break
                _check_error(err, fed, where)
                _check_answer(err, where, answers)
                if stream.buffered >= before:
                    raise InvariantError(
                        f"{where}: error {err} consumed nothing"
                    ) from None
                errors += 1
                events.append(
                    ("error", err.field, err.offset, int(err.cause), err.report)
                )
                continue
            if msg is None:
                break
            if stream.buffered >= before:
                raise InvariantError(f"{where}: message {msg!r} consumed nothing")
            decoded += 1
            events.append(msg)
        if fatal is not None:
            break
        if stream.buffered > limit:
            raise InvariantError(
                f"{where}: {stream.buffered} bytes buffered after draining, limit {limit}"
            )
    if fatal is not None:
        if not fatal.fatal:
            raise InvariantError(f"{where}: feed() raised a non-fatal error: {fatal}")
        _check_error(fatal, fed, where)
        _check_answer(fatal, where, answers)
        if stream.buffered:
            raise InvariantError(
                f"{where}: {stream.buffered} bytes still buffered after fatal error {fatal}"
            )
        for again in (stream.next_message, lambda: stream.feed(b"\0")):
            try:
                again()
            except ProtocolError as err:
                if not _same_fatal(err, fatal):
                    raise InvariantError(
                        f"{where}: after fatal {fatal!r} raised {err!r}"
                    ) from None
            else:
                raise InvariantError(
                    f"{where}: stream goes on after fatal error {fatal}"
                )
        errors += 1
        events.append(("fatal", fatal.field, fatal.offset))
    reports = cast(Any, stream).reports  # every framer of _STREAMS keeps them
    events.append(("reports", tuple(reports)))
    return events, Outcome(errors == 0, decoded, errors, fatal is not None)


def fuzz_one(
    decoder: str,
    data: bytes,
    chunks: Sequence[int] | None = None,
    max_message_size: int | None = None,
    *,
    answers: bool = True,
) -> Outcome:
    """Feed one input to one decoder with every check.

    Returns the outcome when the decoder behaved: it decoded, or it raised a
    ProtocolError that names a field and an offset in the input (and whose ERROR
    answer, if it gets one, can be sent). Raises anything
    else the decoder raised, or ``InvariantError`` for wrong behaviour. A stream
    decoder gets ``data`` in pieces of the sizes in ``chunks`` (the rest as a last
    piece); it must then produce what it produces from one piece. ``answers=False``
    skips the check of the ERROR answers.
    """
    single = _SINGLE.get(decoder)
    if single is not None:
        try:
            single(data)
        except ProtocolError as err:
            _check_error(err, len(data), decoder)
            _check_answer(err, decoder, answers)
            if err.fatal:
                raise InvariantError(
                    f"{decoder}: fatal error from a message decoder: {err}"
                ) from None
            return Outcome(False, 0, 1)
        return Outcome(True, 1, 0)
    if decoder not in _STREAMS:
        raise ValueError(f"unknown decoder {decoder!r}, one of {', '.join(DECODERS)}")
    size = messages.MAX_MESSAGE_SIZE if max_message_size is None else max_message_size
    events, outcome = _run_stream(decoder, data, chunks, size, answers)
    if chunks is not None:
        whole, _ = _run_stream(decoder, data, None, size, answers)
        if whole != events:
            raise InvariantError(
                f"{decoder}: chunks {list(chunks)} give {events!r}, one piece gives {whole!r}"
            )
    return outcome


# -------------------------------------------------------------------------- corpus


def _cookie_states() -> list[cookie.SessionState]:
    S = cookie.SessionState
    return [
        S(
            COOKIE_POOL_HANDLE,
            "web1",
            "nbd://san:10809/web1",
            ("10.0.5.1",),
            300,
            1,
            True,
            "pe1.example",
            0x11223344,
            COOKIE_NOW - 10,
        ),
        S(
            COOKIE_POOL_HANDLE,
            "db-2",
            "",
            ("10.0.5.2", "fd00::2"),
            4096,
            4,
            False,
            "h",
            1,
            COOKIE_NOW,
        ),
        S(COOKIE_POOL_HANDLE, "x", "d", (), 1, 1, False, "", 0, COOKIE_NOW - 3000),
    ]


def _with_params(msg: messages.Message, *extra: bytes) -> bytes:
    """``msg`` encoded with extra raw parameters appended (length fixed up)."""
    data = messages.encode(msg) + b"".join(extra)
    return data[:2] + struct.pack("!H", len(data)) + data[4:]


def _unusual_messages() -> tuple[list[bytes], list[bytes]]:
    """Valid ASAP and ENRP messages the samples do not show: other transports, several
    addresses, opaque and multi-field policies, skipped parameters, refusals."""
    pe = samples.pool_element(7)
    policies = [
        P.PoolPolicy(0x12345678, (), b"\x01\x02\x03\x04\x05"),
        P.PoolPolicy.make(
            P.PolicyType.LEAST_USED_DEGRADATION_DPF,
            load=1,
            load_degradation=2,
            load_dpf=3,
            distance=4,
        ),
        P.PoolPolicy.make(P.PolicyType.ROUND_ROBIN),
    ]
    transports: list[P.Transport] = [
        P.SctpTransport(
            1, ("10.0.0.1", "10.0.0.2", "fd00::3"), P.TransportUse.DATA_PLUS_CONTROL
        ),
        P.UdpTransport(2, ("fd00::1",)),
        P.UdpLiteTransport(3, ("192.0.2.1",)),
        P.DccpTransport(4, ("192.0.2.2",), 0xDEADBEEF),
    ]
    elements = [
        P.PoolElement(
            0x100 + i,
            1,
            -1,
            t,
            policies[i % len(policies)],
            transports[(i + 1) % len(transports)],
        )
        for i, t in enumerate(transports)
    ]
    error = P.OperationError(
        (P.ErrorCause(Cause.INVALID_VALUES, b"why"), P.ErrorCause(0x1234))
    )
    server = P.ServerInformation(9, P.TcpTransport(9901, ("192.0.2.9",)))
    skip = P.tlv(0x8010, b"skip")
    report = P.tlv(0xC011, b"report me")
    asap = [
        messages.encode(m)
        for m in (
            messages.Registration(b"p" * P.MAX_POOL_HANDLE, elements[0]),
            messages.Registration(b"\x00", elements[1]),
            messages.Registration(
                b"Xen", pe, authentication=P.registration_mac(SECRET, b"Xen", pe)
            ),
            messages.RegistrationResponse(b"Xen", 1, reject=True, error=error),
            messages.HandleResolutionResponse(b"Xen", (), error=error),
            messages.HandleResolutionResponse(b"Xen", tuple(elements), policies[1]),
            messages.ServerAnnounce(1, tuple(transports)),
            messages.BusinessCard(b"Xen", (pe, elements[2])),
            messages.CookieEcho(cookie.seal(_cookie_states()[0], SECRET)),
        )
    ] + [
        _with_params(messages.HandleResolution(b"Xen"), skip, report),
        _with_params(messages.EndpointKeepAlive(1, b"Xen", 2), report),
    ]
    enrp = [
        messages.encode(m)
        for m in (
            messages.Presence(1, 2, 0),
            messages.HandleUpdate(
                1,
                2,
                messages.UpdateAction.DEL_PE,
                b"Xen",
                elements[3],
                takeover_suggested=True,
            ),
            messages.HandleTableResponse(
                1, 2, ((b"a", tuple(elements[:2])), (b"b", ())), reject=True
            ),
            messages.ListResponse(
                1, 2, (server, P.ServerInformation(10, transports[0]))
            ),
        )
    ] + [_with_params(messages.ListRequest(1, 2), skip)]
    return asap, enrp


@lru_cache(maxsize=1)
def corpus() -> dict[str, tuple[bytes, ...]]:
    """The seed inputs of each decoder, and ``cookie-body`` (cookies without a MAC)."""
    asap = [
        messages.encode(m)
        for m in samples.all_messages()
        if m.PPID == messages.ASAP_PPID
    ]
    enrp = [
        messages.encode(m)
        for m in samples.all_messages()
        if m.PPID == messages.ENRP_PPID
    ]
    more_asap, more_enrp = _unusual_messages()
    asap += more_asap
    enrp += more_enrp
    sessions = [session.encode(m) for m in samples.all_session_messages()]
    sessions.append(
        session.encode(
            session.CreateServer("a" * 32, "", ("fd00::1", "10.0.0.1"), 1, 64)
        )
    )
    cookies = [cookie.seal(state, SECRET) for state in _cookie_states()]

    def streams(frames: list[bytes]) -> list[bytes]:
        n = len(frames)
        return (
            frames
            + [frames[i] + frames[(i + 1) % n] for i in range(n)]
            + [b"".join(frames)]
        )

    shim = [
        framing.frame_message(m)
        for m in samples.all_messages()
        if m.PPID == messages.ASAP_PPID
    ]
    shim += [framing.shim_frame(messages.ASAP_PPID, m) for m in more_asap]
    shim += [framing.frame_message(m) for m in samples.all_session_messages()]
    shim.append(
        framing.shim_frame(messages.ENRP_PPID, enrp[0])
    )  # a PPID the shim does not carry
    return {
        "asap": tuple(asap),
        "enrp": tuple(enrp),
        "session": tuple(sessions),
        "cookie": tuple(cookies),
        "cookie-body": tuple(c[: -cookie.MAC_SIZE] for c in cookies),
        "asap-stream": tuple(streams(asap)),
        "enrp-stream": tuple(streams(enrp)),
        "shim-stream": tuple(streams(shim)),
    }


# -------------------------------------------------------------------- length fields
#
# Where the length fields are, so a mutation can put boundary values in them or grow a
# field with its enclosing lengths kept right. Each is (offset, width, base, start, tag):
# the field at ``offset`` counts the bytes from ``base`` on (``len(data) - base`` would
# exactly fit), its item (header included) starts at ``start``; ``tag`` is "tlv" (padded
# to four bytes), "msg", "text" or "shim". An enclosing length field always comes
# before the fields it encloses.

_NESTED = {
    P.ParamType.POOL_ELEMENT: 12,
    P.ParamType.SERVER_INFORMATION: 4,
    P.ParamType.SCTP_TRANSPORT: 4,
    P.ParamType.TCP_TRANSPORT: 4,
    P.ParamType.UDP_TRANSPORT: 4,
    P.ParamType.UDP_LITE_TRANSPORT: 4,
    P.ParamType.DCCP_TRANSPORT: 8,
    P.ParamType.OPERATION_ERROR: 0,  # its causes are laid out like parameters
}
_FIXED_SIZE = {
    ppid: {
        t: struct.calcsize(cls.FIXED[0]) if cls.FIXED[0] else 0
        for t, cls in table.items()
    }
    for ppid, table in messages.MESSAGES_BY_PPID.items()
}
_SESSION_LAYOUT: dict[int, tuple] = {
    session.SessionType.CREATE_SERVER: ("t", "t", "t", 8),
    session.SessionType.CREATE_FAILED: ("t", 12, "t"),
    session.SessionType.CREATE_SUCCESS: ("t", 12, "t"),
    session.SessionType.CHECK_RUNNING: ("t", 4),
    session.SessionType.CHECK_RUNNING_RESPONSE: ("t", 4),
    session.SessionType.STOP_SERVER: ("t",),
    session.SessionType.STOP_RESULT: ("t", 4, "t"),
}
_u16 = struct.Struct("!H").unpack_from


def _walk_tlvs(data, start, end, fields, cuts, depth) -> None:
    pos = start
    while pos + 4 <= end:
        cuts.append(pos)
        ptype, plen = struct.unpack_from("!HH", data, pos)
        fields.append((pos + 2, 2, pos, pos, "tlv"))
        if plen < 4 or pos + plen > end:
            return
        skip = _NESTED.get(ptype)
        if skip is not None and depth < 4:
            _walk_tlvs(data, pos + 4 + skip, pos + plen, fields, cuts, depth + 1)
        pos += (plen + 3) & ~3
    if pos <= end:
        cuts.append(pos)


def _walk_message(data, base, end, ppid, fields, cuts) -> None:
    if end - base < 4:
        return
    fields.append((base + 2, 2, base, base, "msg"))
    length = _u16(data, base + 2)[0]
    stop = min(end, base + length) if length >= 4 else end
    _walk_tlvs(
        data, base + 4 + _FIXED_SIZE[ppid].get(data[base], 0), stop, fields, cuts, 0
    )


def _walk_texts(data, pos, end, layout, fields, cuts) -> None:
    for item in layout:
        if pos > end:
            return
        cuts.append(pos)
        if item == "t":
            if pos + 2 > end:
                return
            fields.append((pos, 2, pos + 2, pos, "text"))
            pos += 2 + _u16(data, pos)[0]
        else:
            pos += item


def _walk_session(data, base, end, fields, cuts) -> None:
    if end - base < 8:
        return
    fields.append((base + 2, 2, base, base, "msg"))
    _walk_texts(data, base + 8, end, _SESSION_LAYOUT.get(data[base], ()), fields, cuts)


def structure(
    data: bytes | bytearray, kind: str
) -> tuple[list[tuple[int, int, int, int, str]], list[int]]:
    """The length fields (offset, width, base, start, tag) and the parameter boundaries of ``data``
    read as ``kind`` (a decoder name or ``cookie-body``), as far as it makes sense."""
    fields: list[tuple[int, int, int, int, str]] = []
    cuts: list[int] = []
    end = len(data)
    if kind in ("asap", "enrp"):
        _walk_message(
            data,
            0,
            end,
            messages.ENRP_PPID if kind == "enrp" else messages.ASAP_PPID,
            fields,
            cuts,
        )
    elif kind == "session":
        _walk_session(data, 0, end, fields, cuts)
    elif kind in ("cookie", "cookie-body"):
        stop = end - cookie.MAC_SIZE if kind == "cookie" else end
        _walk_texts(data, 24, stop, ("t",) * 5, fields, cuts)
    elif kind in ("asap-stream", "enrp-stream"):
        ppid = messages.ENRP_PPID if kind == "enrp-stream" else messages.ASAP_PPID
        pos = 0
        while pos + 4 <= end:
            cuts.append(pos)
            length = _u16(data, pos + 2)[0]
            _walk_message(data, pos, min(end, pos + max(length, 4)), ppid, fields, cuts)
            if length < 4:
                break
            pos += length
    elif kind == "shim-stream":
        pos = 0
        while pos + 8 <= end:
            cuts.append(pos)
            ppid, length = framing.SHIM.unpack_from(data, pos)
            fields.append((pos + 4, 4, pos + 8, pos, "shim"))
            stop = min(end, pos + 8 + length)
            if ppid == messages.ASAP_PPID:
                _walk_message(data, pos + 8, stop, ppid, fields, cuts)
            elif ppid == session.XENPOOL_PPID:
                _walk_session(data, pos + 8, stop, fields, cuts)
            pos += 8 + length
    return fields, cuts


# ------------------------------------------------------------------------ mutations

_INTERESTING_32 = (
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    *map(int, P.PolicyType),
)
_UNKNOWN_TYPES = (0x0010, 0x3FFF, 0x4010, 0x7FFF, 0x8010, 0xBFFF, 0xC010, 0xFFFF)
_PARAM_TYPES = tuple(map(int, P.ParamType)) + _UNKNOWN_TYPES
_FIXABLE = frozenset(("asap", "enrp", "session"))


class _Mutator:
    """The byte-level mutations; each takes and returns a bytearray."""

    def __init__(self, rng: random.Random, kind: str, pool: Sequence[bytes]) -> None:
        self.rng = rng
        self.kind = kind
        self.pool = pool
        self.length_touched = False

    def flip_bit(self, d: bytearray) -> bytearray:
        if d:
            d[self.rng.randrange(len(d))] ^= 1 << self.rng.randrange(8)
        return d

    def set_byte(self, d: bytearray) -> bytearray:
        if d:
            rng = self.rng
            value = (0x00, 0xFF, rng.randrange(256))[rng.randrange(3)]
            d[rng.randrange(len(d))] = value
        return d

    def insert(self, d: bytearray) -> bytearray:
        rng = self.rng
        n = rng.choice((1, 1, 2, 3, 4, 8, rng.randrange(1, 64)))
        fill = (
            rng.randbytes(n)
            if rng.random() < 0.5
            else bytes([rng.choice((0, 0xFF, rng.randrange(256)))]) * n
        )
        i = rng.randrange(len(d) + 1)
        d[i:i] = fill
        return d

    def delete(self, d: bytearray) -> bytearray:
        if d:
            rng = self.rng
            i = rng.randrange(len(d))
            del d[i : i + rng.randrange(1, min(len(d) - i, 16) + 1)]
        return d

    def truncate(self, d: bytearray) -> bytearray:
        del d[self.rng.randrange(len(d) + 1) :]
        return d

    def duplicate(self, d: bytearray) -> bytearray:
        if d:
            rng = self.rng
            i = rng.randrange(len(d))
            piece = d[i : i + rng.randrange(1, len(d) - i + 1)]
            j = rng.randrange(len(d) + 1)
            d[j:j] = piece
        return d

    def splice(self, d: bytearray) -> bytearray:
        rng = self.rng
        other = rng.choice(self.pool)
        return d[: rng.randrange(len(d) + 1)] + other[rng.randrange(len(other) + 1) :]

    def length(self, d: bytearray) -> bytearray:
        fields, _ = structure(d, self.kind)
        if not fields:
            return self.set_byte(d)
        rng = self.rng
        offset, width, base, _start, _tag = rng.choice(fields)
        if offset + width > len(d):
            return d
        current = int.from_bytes(d[offset : offset + width], "big")
        fit = len(d) - base
        values = [
            0,
            1,
            2,
            3,
            4,
            5,
            8,
            current - 1,
            current + 1,
            fit - 1,
            fit,
            fit + 1,
            0x7FFF,
            0x8000,
            0xFFFF,
        ]
        if width == 4:
            values += [0x10000, messages.MAX_MESSAGE_SIZE + 1, 0x7FFFFFFF, 0xFFFFFFFF]
        value = rng.choice(values) & ((1 << (8 * width)) - 1)
        d[offset : offset + width] = value.to_bytes(width, "big")
        self.length_touched = True
        return d

    def grow(self, d: bytearray) -> bytearray:
        """Lengthen a field or repeat a whole item, adjusting every enclosing length:
        the well-formed way to too long handles and cookies, too many addresses,
        causes or parameters, duplicated parameters."""
        fields, _ = structure(d, self.kind)
        if not fields:
            return self.insert(d)
        rng = self.rng

        def value(f) -> int:
            return int.from_bytes(d[f[0] : f[0] + f[1]], "big")

        target = rng.choice(fields)
        offset, width, base, start, tag = target
        if offset + width > len(d):
            return d
        size = value(target)
        if rng.random() < 0.4:  # repeat the item
            size += base - start
            if tag == "tlv":
                size = (size + 3) & ~3
            item = bytes(d[start : start + size])
            if len(item) != size or not item:
                return d
            blob = item * rng.choice((1, 1, 1, 2, 15, 16, 17, 31, 32, 33))
            at = start
            grown = [
                f for f in fields if f[0] < offset and f[2] <= at < f[2] + value(f)
            ]
        else:  # add bytes at the end of its value
            n = rng.choice(
                (
                    1,
                    2,
                    3,
                    4,
                    8,
                    29,
                    60,
                    61,
                    65,
                    200,
                    2045,
                    2049,
                    rng.randrange(1, 300),
                    -1,
                )
            )
            if n < 0:  # up to (or just past) the largest message
                n = max(
                    1,
                    messages.MAX_MESSAGE_SIZE
                    - len(d)
                    + rng.choice((-16, -8, -4, -3, -2, -1, 0, 1)),
                )
            blob = (
                rng.randbytes(n)
                if rng.random() < 0.3
                else bytes([rng.choice((0, 0x41, 0xFF))]) * n
            )
            at = min(base + size, len(d))
            grown = [target] + [
                f
                for f in fields
                if f[0] < offset and f[2] <= base and f[2] + value(f) >= at
            ]
        for f in grown:
            d[f[0] : f[0] + f[1]] = (
                (value(f) + len(blob)) & ((1 << (8 * f[1])) - 1)
            ).to_bytes(f[1], "big")
        d[at:at] = blob
        return d

    def word(self, d: bytearray) -> bytearray:
        if len(d) >= 4:
            rng = self.rng
            i = (
                rng.randrange(len(d) - 3) & ~3
                if rng.random() < 0.8
                else rng.randrange(len(d) - 3)
            )
            d[i : i + 4] = rng.choice(_INTERESTING_32).to_bytes(4, "big")
        return d

    def insert_param(self, d: bytearray) -> bytearray:
        rng = self.rng
        _, cuts = structure(d, self.kind)
        at = rng.choice(cuts) if cuts else rng.randrange(len(d) + 1)
        ptype = (
            rng.choice(_PARAM_TYPES) if rng.random() < 0.9 else rng.randrange(0x10000)
        )
        value = rng.choice(
            (b"", b"\0" * 4, rng.randbytes(rng.randrange(1, 24)), b"Xen")
        )
        d[at:at] = P.tlv(ptype, value)
        return d

    def fix_length(self, d: bytearray) -> bytearray:
        """Make the message's own length field say its size (so the rest is parsed)."""
        if len(d) >= 4:
            d[2:4] = (len(d) & 0xFFFF).to_bytes(2, "big")
        return d

    OPS: tuple[tuple[str, int], ...] = (
        ("flip_bit", 12),
        ("set_byte", 10),
        ("insert", 6),
        ("delete", 6),
        ("truncate", 4),
        ("duplicate", 4),
        ("splice", 4),
        ("length", 14),
        ("grow", 10),
        ("word", 6),
        ("insert_param", 8),
    )


_OP_NAMES = tuple(name for name, _ in _Mutator.OPS)
_OP_WEIGHTS = tuple(weight for _, weight in _Mutator.OPS)


def mutate(
    data: bytes, rng: random.Random, kind: str, rounds: int | None = None
) -> bytes:
    """``data`` after ``rounds`` (default: 1 to 8, each one half as likely) random mutations
    chosen with ``rng``. ``kind`` (a decoder name or ``cookie-body``) says where the
    length fields and parameter boundaries are and which corpus entries to splice in.
    For a message kind, its length field is often fixed up afterwards so the mutated
    inside gets parsed."""
    if rounds is None:
        rounds = 1
        while rounds < 8 and rng.random() < 0.5:
            rounds += 1
    m = _Mutator(rng, kind, corpus().get(kind) or corpus()["asap"])
    d = bytearray(data)
    for name in rng.choices(_OP_NAMES, _OP_WEIGHTS, k=rounds):
        d = getattr(m, name)(d)
    if kind in _FIXABLE and not m.length_touched and rng.random() < 0.6:
        d = m.fix_length(d)
    return bytes(d)


def random_bytes(rng: random.Random) -> bytes:
    limit = rng.choices((8, 32, 128, 1024, 8192, 70_000), (3, 4, 4, 2, 1, 0.2))[0]
    return rng.randbytes(rng.randrange(limit + 1))


@dataclass(frozen=True, slots=True)
class Case:
    decoder: str
    data: bytes
    chunks: tuple[int, ...] | None = None
    max_message_size: int | None = None

    def describe(self) -> str:
        extra = ""
        if self.chunks is not None:
            extra += f", chunks {list(self.chunks)}"
        if self.max_message_size is not None:
            extra += f", max_message_size {self.max_message_size}"
        return f"{self.decoder} ({len(self.data)} bytes{extra})"


class Generator:
    """The inputs of a campaign, drawn from ``rng``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.corpus = corpus()
        self.shim_payloads = [(messages.ASAP_PPID, b) for b in self.corpus["asap"]] + [
            (session.XENPOOL_PPID, b) for b in self.corpus["session"]
        ]

    def case(self, decoder: str) -> Case:
        if decoder in STREAM_DECODERS:
            return self._stream_case(decoder)
        rng = self.rng
        if decoder == "cookie":
            r = rng.random()
            if r < 0.55:
                return Case(
                    decoder,
                    reseal(
                        mutate(
                            rng.choice(self.corpus["cookie-body"]), rng, "cookie-body"
                        )
                    ),
                )
            if r < 0.95:
                return Case(
                    decoder, mutate(rng.choice(self.corpus["cookie"]), rng, "cookie")
                )
            return Case(decoder, random_bytes(rng))
        if rng.random() < 0.08:
            data = random_bytes(rng)
            if len(data) >= 4 and rng.random() < 0.5:
                data = data[:2] + struct.pack("!H", len(data) & 0xFFFF) + data[4:]
            return Case(decoder, data)
        return Case(decoder, mutate(rng.choice(self.corpus[decoder]), rng, decoder))

    def _stream_case(self, decoder: str) -> Case:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            data = random_bytes(rng)
        elif r < 0.5:
            data = mutate(rng.choice(self.corpus[decoder]), rng, decoder)
        else:  # several frames, each maybe mutated inside (with its length right)
            parts = []
            for _ in range(rng.randint(1, 4)):
                if decoder == "shim-stream":
                    ppid, payload = rng.choice(self.shim_payloads)
                    if rng.random() < 0.6:
                        payload = mutate(
                            payload,
                            rng,
                            "asap" if ppid == messages.ASAP_PPID else "session",
                        )
                    if rng.random() < 0.05:
                        ppid = rng.choice((0, messages.ENRP_PPID, rng.getrandbits(32)))
                    parts.append(framing.shim_frame(ppid, payload))
                else:
                    kind = "enrp" if decoder == "enrp-stream" else "asap"
                    frame = rng.choice(self.corpus[kind])
                    parts.append(
                        mutate(frame, rng, kind) if rng.random() < 0.6 else frame
                    )
            data = b"".join(parts)
        max_size = None
        if rng.random() < 0.3:
            max_size = rng.choice((0, 4, 8, 12, 20, 64, 256, 2048))
        return Case(decoder, data, self._chunks(len(data)), max_size)

    def _chunks(self, size: int) -> tuple[int, ...] | None:
        rng = self.rng
        r = rng.random()
        if r < 0.2 or size == 0:
            return None
        if r < 0.3 and size <= 512:
            return (1,) * size
        top = 32 if r < 0.6 else size
        out, total = list[int](), 0
        while total < size and len(out) < 256:
            n = rng.randrange(top + 1)
            out.append(n)
            total += n
        return tuple(out)


# ------------------------------------------------------------------------ campaigns


@dataclass(frozen=True, slots=True)
class Crash:
    case: Case
    kind: str  # "crash" or "hang"
    error: str  # "ValueError: ..." or the CPU time
    where: str  # innermost frame, "file:line in function"
    signature: tuple
    cpu_s: float
    minimal: bytes | None = None

    def describe(self) -> str:
        where = f" at {self.where}" if self.where else ""
        lines = [
            f"{self.kind.upper()} in {self.case.describe()}: {self.error}{where}",
            f"  input: {self.case.data.hex()}",
        ]
        if self.minimal is not None and self.minimal != self.case.data:
            lines.append(
                f"  smaller input, same {self.kind} in one piece: {self.minimal.hex()}"
            )
        return "\n".join(lines)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"


def _signature(decoder: str, exc: BaseException) -> tuple:
    return (decoder, type(exc).__name__, _where(exc))


def _crash_signature(case: Case, dog: _Watchdog | None = None) -> tuple | None:
    if dog is not None:
        dog.begin()
    try:
        fuzz_one(case.decoder, case.data, case.chunks, case.max_message_size)
    except _Stuck:
        return (case.decoder, "hang")
    except Exception as exc:
        return _signature(case.decoder, exc)
    finally:
        if dog is not None:
            dog.end()
    return None


def shrink(
    case: Case, signature: tuple, budget: int = 2000, dog: _Watchdog | None = None
) -> bytes | None:
    """A smaller input that, fed in one piece, crashes the same way (or None)."""
    data = case.data

    def same(candidate: bytes) -> bool:
        return (
            _crash_signature(
                Case(case.decoder, candidate, None, case.max_message_size), dog
            )
            == signature
        )

    if not same(data):
        return None
    size = max(len(data) // 2, 1)
    while size >= 1 and budget > 0:
        i = 0
        while i < len(data) and budget > 0:
            candidate = data[:i] + data[i + size :]
            budget -= 1
            if same(candidate):
                data = candidate
            else:
                i += size
        size //= 2
    return data


@dataclass
class Report:
    """What a campaign found. ``outcome()`` is everything but the timings: the same
    for the same seed and case count."""

    seed: int
    cases: int = 0
    crash_count: int = 0
    hang_count: int = 0
    crashes: list[Crash] = field(default_factory=list)  # the first MAX_STORED_CRASHES
    signatures: dict[tuple, int] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(
        default_factory=lambda: {d: [0, 0] for d in DECODERS}
    )
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    slowest_s: float = 0.0
    slowest: str = ""
    elapsed_s: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.crash_count or self.hang_count)

    def outcome(self) -> tuple:
        return (
            self.seed,
            self.cases,
            self.crash_count,
            self.hang_count,
            tuple(sorted(self.signatures.items())),
            tuple((d, tuple(c)) for d, c in self.counts.items()),
            self.digest.hexdigest(),
        )

    def summary(self) -> str:
        rate = self.cases / self.elapsed_s if self.elapsed_s > 0 else 0.0
        counts = ", ".join(f"{d} {a}/{r}" for d, (a, r) in self.counts.items())
        return (
            f"fuzz seed {self.seed}: {self.cases} cases, {self.crash_count} crashes, {self.hang_count} hangs "
            f"({len(self.signatures)} distinct); "
            f"accepted/rejected {counts}; inputs sha256 {self.digest.hexdigest()[:16]}; "
            f"slowest input {self.slowest_s * 1000:.1f} ms CPU ({self.slowest}); "
            f"{self.elapsed_s:.1f} s, {rate:,.0f} cases/s"
        )


class _Watchdog:
    """Interrupts a case that runs for STUCK_S of CPU (a real hang never returns to be
    timed). Only in the main thread, where signals are delivered."""

    def __init__(self) -> None:
        self.current: int | None = None  # what is running; None: nothing to interrupt
        self._seen: int | None = None
        self._runs = 0
        self._old: Callable[..., Any] | int | None = None
        self.active = threading.current_thread() is threading.main_thread() and hasattr(
            signal, "setitimer"
        )

    def _fire(self, signum, frame) -> None:
        if self.current is not None and self.current == self._seen:
            self._seen = None
            code = frame.f_code if frame is not None else None
            raise _Stuck(
                f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} in {code.co_name}"
                if code
                else ""
            )
        self._seen = self.current

    def begin(self) -> None:
        self._runs += 1
        self.current = self._runs

    def end(self) -> None:
        self.current = None

    def __enter__(self) -> _Watchdog:
        if self.active:
            self._old = signal.signal(signal.SIGPROF, self._fire)
            signal.setitimer(signal.ITIMER_PROF, STUCK_S, STUCK_S)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_PROF, 0, 0)
            signal.signal(signal.SIGPROF, self._old)


def campaign(
    cases: int,
    seed: int,
    *,
    emit: Callable[[str], None] = print,
    on_progress: Callable[[int, Report], None] | None = None,
) -> Report:
    """Run ``cases`` inputs drawn from ``seed`` through the decoders in turn."""
    report = Report(seed)
    gen = Generator(random.Random(seed))
    printed = 0
    clock = time.process_time
    wall = time.perf_counter()
    with _Watchdog() as dog:
        for i in range(cases):
            decoder = DECODERS[i % len(DECODERS)]
            case = gen.case(decoder)
            h = report.digest
            h.update(
                f"{decoder}|{len(case.data)}|{case.chunks}|{case.max_message_size}|".encode()
            )
            h.update(case.data)
            failure: BaseException | None = None
            dog.begin()
            start = clock()
            try:
                outcome = fuzz_one(
                    decoder, case.data, case.chunks, case.max_message_size
                )
            except _Stuck as exc:
                failure = exc
            except Exception as exc:
                failure = exc
            finally:
                dog.end()
            took = clock() - start
            report.cases += 1
            if took > report.slowest_s:
                report.slowest_s, report.slowest = took, decoder
            crash = None
            if isinstance(failure, _Stuck) or took > HANG_S:
                report.hang_count += 1
                signature = (decoder, "hang")
                where = (
                    str(failure) if failure else ""
                )  # a _Stuck says where it was interrupted
                crash = Crash(
                    case, "hang", f"{took:.2f} s of CPU", where, signature, took
                )
            elif failure is not None:
                report.crash_count += 1
                signature = _signature(decoder, failure)
                crash = Crash(
                    case,
                    "crash",
                    f"{type(failure).__name__}: {failure}",
                    _where(failure),
                    signature,
                    took,
                )
            else:
                report.counts[decoder][0 if outcome.accepted else 1] += 1
            if crash is not None:
                new = signature not in report.signatures
                report.signatures[signature] = report.signatures.get(signature, 0) + 1
                if new or printed < MAX_PRINTED_CRASHES:
                    if new and crash.kind == "crash":
                        crash = dataclasses.replace(
                            crash, minimal=shrink(case, signature, dog=dog)
                        )
                    printed += 1
                    emit(crash.describe())
                if len(report.crashes) < MAX_STORED_CRASHES:
                    report.crashes.append(crash)
            if on_progress is not None and (i & 127 == 127 or i == cases - 1):
                on_progress(i + 1, report)
    report.elapsed_s = time.perf_counter() - wall
    return report


def run(cases: int, seed: int, progress: bool) -> int:
    """``xenpool fuzz``: 0 when every input was handled, 1 on a crash or a hang."""
    if not progress:
        report = campaign(cases, seed)
    else:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task) -> Text:
                elapsed = task.elapsed or 0.0
                return Text(
                    f"{task.completed / elapsed if elapsed else 0:,.0f} cases/s"
                )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
        ) as bar:
            task = bar.add_task(f"fuzz seed {seed}", total=cases)

            def emit(text: str) -> None:
                bar.console.print(text, markup=False, highlight=False, soft_wrap=True)

            def on_progress(done: int, report: Report) -> None:
                failures = report.crash_count + report.hang_count
                bar.update(
                    task,
                    completed=done,
                    description=f"fuzz seed {seed}, {failures} crashes",
                )

            report = campaign(cases, seed, emit=emit, on_progress=on_progress)
    print(report.summary())
    return 1 if report.failed else 0
