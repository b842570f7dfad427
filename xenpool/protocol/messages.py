"""ASAP (RFC 5352) and ENRP (RFC 5353) messages, sans-IO.

Each message is a frozen dataclass that declares its wire layout: the type code, its
flag bits, the fixed fields after the common header, and which parameters it carries.
One generic encoder and one generic decoder work from those declarations.

Common header: type (8 bits), flags (8 bits), length (16 bits, whole message).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from . import params as P
from ._construct import constructor
from .errors import Cause, ProtocolError
from .params import (
    ErrorCause,
    OperationError,
    PoolElement,
    PoolPolicy,
    ServerInformation,
    Transport,
)

ASAP_PPID = 11
ENRP_PPID = 12
ASAP_PORT = 3863
ENRP_PORT = 9901
MAX_MESSAGE_SIZE = 0xFFFF
# The most PEs one HANDLE_RESOLUTION asks for and one answer carries: rsplib 3.4.4 refuses
# an answer with more (MAX_MAX_HANDLE_RESOLUTION_ITEMS).
MAX_RESOLUTION_ITEMS = 128

ONE, OPTIONAL, MANY = "one", "optional", "many"


class AsapType(enum.IntEnum):
    REGISTRATION = 0x01
    DEREGISTRATION = 0x02
    REGISTRATION_RESPONSE = 0x03
    DEREGISTRATION_RESPONSE = 0x04
    HANDLE_RESOLUTION = 0x05
    HANDLE_RESOLUTION_RESPONSE = 0x06
    ENDPOINT_KEEP_ALIVE = 0x07
    ENDPOINT_KEEP_ALIVE_ACK = 0x08
    ENDPOINT_UNREACHABLE = 0x09
    SERVER_ANNOUNCE = 0x0A
    COOKIE = 0x0B
    COOKIE_ECHO = 0x0C
    BUSINESS_CARD = 0x0D
    ERROR = 0x0E


class EnrpType(enum.IntEnum):
    PRESENCE = 0x01
    HANDLE_TABLE_REQUEST = 0x02
    HANDLE_TABLE_RESPONSE = 0x03
    HANDLE_UPDATE = 0x04
    LIST_REQUEST = 0x05
    LIST_RESPONSE = 0x06
    INIT_TAKEOVER = 0x07
    INIT_TAKEOVER_ACK = 0x08
    TAKEOVER_SERVER = 0x09
    ERROR = 0x0A


class UpdateAction(enum.IntEnum):
    ADD_PE = 0x0000
    DEL_PE = 0x0001


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every ASAP and ENRP message.

    ``FLAGS`` maps a boolean attribute to its bit in the flags byte; ``FIXED`` is a
    struct format and the attributes it fills (fixed fields after the header);
    ``PARAMS`` lists (attribute, parameter types, cardinality).
    """

    PPID: ClassVar[int]
    TYPE: ClassVar[int]
    FLAGS: ClassVar[dict[str, int]] = {}
    FIXED: ClassVar[tuple[str, tuple[str, ...]]] = ("", ())
    PARAMS: ClassVar[tuple[tuple[str, tuple[int, ...], str], ...]] = ()


class AsapMessage(Message):
    __slots__ = ()
    PPID = ASAP_PPID


class EnrpMessage(Message):
    __slots__ = ()
    PPID = ENRP_PPID


_HANDLE = (P.ParamType.POOL_HANDLE,)
_PE = (P.ParamType.POOL_ELEMENT,)
_PE_ID = (P.ParamType.PE_IDENTIFIER,)
_ERROR = (P.ParamType.OPERATION_ERROR,)
_COOKIE = (P.ParamType.COOKIE,)
_POLICY = (P.ParamType.POOL_MEMBER_SELECTION_POLICY,)
_SERVER_INFO = (P.ParamType.SERVER_INFORMATION,)
_CHECKSUM = (P.ParamType.PE_CHECKSUM,)
_ENRP_IDS = ("!II", ("sender_id", "receiver_id"))
_ENRP_TARGET = ("!III", ("sender_id", "receiver_id", "target_id"))

# ---------------------------------------------------------------------------- ASAP


@dataclass(frozen=True, slots=True)
class Registration(AsapMessage):
    """``authentication``: xenpool's Pool Authentication parameter (an HMAC under the
    pool's secret, see ``params.registration_mac``), for pools that require it. It goes
    between the pool handle and the Pool Element: rsplib 3.4.4 skips an unknown parameter
    only while it looks for an expected one, so as the last parameter it would fail."""

    TYPE = AsapType.REGISTRATION
    PARAMS = (
        ("pool_handle", _HANDLE, ONE),
        ("authentication", (P.ParamType.POOL_AUTHENTICATION,), OPTIONAL),
        ("pool_element", _PE, ONE),
    )
    pool_handle: bytes
    pool_element: PoolElement
    authentication: bytes | None = None


@dataclass(frozen=True, slots=True)
class Deregistration(AsapMessage):
    TYPE = AsapType.DEREGISTRATION
    PARAMS = (("pool_handle", _HANDLE, ONE), ("pe_identifier", _PE_ID, ONE))
    pool_handle: bytes
    pe_identifier: int


@dataclass(frozen=True, slots=True)
class RegistrationResponse(AsapMessage):
    TYPE = AsapType.REGISTRATION_RESPONSE
    FLAGS = {"reject": 0x01}
    PARAMS = (
        ("pool_handle", _HANDLE, ONE),
        ("pe_identifier", _PE_ID, ONE),
        ("error", _ERROR, OPTIONAL),
    )
    pool_handle: bytes
    pe_identifier: int
    reject: bool = False
    error: OperationError | None = None


@dataclass(frozen=True, slots=True)
class DeregistrationResponse(AsapMessage):
    """No reject bit (rsplib, Wireshark): a refusal carries an Operation Error."""

    TYPE = AsapType.DEREGISTRATION_RESPONSE
    PARAMS = RegistrationResponse.PARAMS
    pool_handle: bytes
    pe_identifier: int
    error: OperationError | None = None


@dataclass(frozen=True, slots=True)
class HandleResolution(AsapMessage):
    """xenpool's Request RAM goes first, before the pool handle: rsplib 3.4.4 skips an
    unknown parameter only while it looks for an expected one (the pool handle here);
    after the last standard parameter it fails with "message length invalid"."""

    TYPE = AsapType.HANDLE_RESOLUTION
    PARAMS = (
        ("ram_mb", (P.ParamType.REQUEST_RAM,), OPTIONAL),
        ("pool_handle", _HANDLE, ONE),
        ("items", (P.ParamType.HANDLE_RESOLUTION_OPTION,), OPTIONAL),
    )
    pool_handle: bytes
    items: int | None = None  # rsplib's Handle Resolution Option: PEs wanted
    ram_mb: int | None = (
        None  # xenpool: the RAM the PU's VM needs, for policies that fit it
    )


@dataclass(frozen=True, slots=True)
class HandleResolutionResponse(AsapMessage):
    """A refusal carries an Operation Error and no PEs (flags 0, as rsplib sends)."""

    TYPE = AsapType.HANDLE_RESOLUTION_RESPONSE
    PARAMS = (
        ("pool_handle", _HANDLE, ONE),
        ("policy", _POLICY, OPTIONAL),
        ("pool_elements", _PE, MANY),
        ("error", _ERROR, OPTIONAL),
    )
    pool_handle: bytes
    pool_elements: tuple[PoolElement, ...] = ()
    policy: PoolPolicy | None = None  # the pool's overall selection policy
    error: OperationError | None = None


@dataclass(frozen=True, slots=True)
class EndpointKeepAlive(AsapMessage):
    """``home``: the sending registrar wants to be the PE's home. The PE Identifier
    parameter is rsplib's addition to RFC 5352, which only has the pool handle."""

    TYPE = AsapType.ENDPOINT_KEEP_ALIVE
    FLAGS = {"home": 0x01}
    FIXED = ("!I", ("server_id",))
    PARAMS = (("pool_handle", _HANDLE, ONE), ("pe_identifier", _PE_ID, OPTIONAL))
    server_id: int
    pool_handle: bytes
    pe_identifier: int | None = None
    home: bool = False


@dataclass(frozen=True, slots=True)
class EndpointKeepAliveAck(AsapMessage):
    TYPE = AsapType.ENDPOINT_KEEP_ALIVE_ACK
    PARAMS = Deregistration.PARAMS
    pool_handle: bytes
    pe_identifier: int


@dataclass(frozen=True, slots=True)
class EndpointUnreachable(AsapMessage):
    TYPE = AsapType.ENDPOINT_UNREACHABLE
    PARAMS = Deregistration.PARAMS
    pool_handle: bytes
    pe_identifier: int


@dataclass(frozen=True, slots=True)
class ServerAnnounce(AsapMessage):
    TYPE = AsapType.SERVER_ANNOUNCE
    FIXED = ("!I", ("server_id",))
    PARAMS = (("transports", P.TRANSPORT_TYPES, MANY),)
    server_id: int
    transports: tuple[Transport, ...] = ()


@dataclass(frozen=True, slots=True)
class Cookie(AsapMessage):
    TYPE = AsapType.COOKIE
    PARAMS = (("cookie", _COOKIE, ONE),)
    cookie: bytes


@dataclass(frozen=True, slots=True)
class CookieEcho(AsapMessage):
    TYPE = AsapType.COOKIE_ECHO
    PARAMS = Cookie.PARAMS
    cookie: bytes


@dataclass(frozen=True, slots=True)
class BusinessCard(AsapMessage):
    TYPE = AsapType.BUSINESS_CARD
    PARAMS = (
        ("pool_handle", _HANDLE, ONE),
        ("policy", _POLICY, OPTIONAL),
        ("pool_elements", _PE, MANY),
    )
    pool_handle: bytes
    pool_elements: tuple[PoolElement, ...] = ()
    policy: PoolPolicy | None = None


@dataclass(frozen=True, slots=True)
class AsapError(AsapMessage):
    TYPE = AsapType.ERROR
    PARAMS = (("error", _ERROR, ONE),)
    error: OperationError


# ---------------------------------------------------------------------------- ENRP


@dataclass(frozen=True, slots=True)
class Presence(EnrpMessage):
    TYPE = EnrpType.PRESENCE
    FLAGS = {"reply_required": 0x01}
    FIXED = _ENRP_IDS
    PARAMS = (
        ("checksum", _CHECKSUM, ONE),
        ("server_information", _SERVER_INFO, OPTIONAL),
    )
    sender_id: int
    receiver_id: int
    checksum: int
    server_information: ServerInformation | None = None
    reply_required: bool = False


@dataclass(frozen=True, slots=True)
class HandleTableRequest(EnrpMessage):
    TYPE = EnrpType.HANDLE_TABLE_REQUEST
    FLAGS = {"own_children_only": 0x01}
    FIXED = _ENRP_IDS
    sender_id: int
    receiver_id: int
    own_children_only: bool = False


@dataclass(frozen=True, slots=True)
class HandleTableResponse(EnrpMessage):
    TYPE = EnrpType.HANDLE_TABLE_RESPONSE
    FLAGS = {"reject": 0x01, "more_to_send": 0x02}
    FIXED = _ENRP_IDS
    # Pool handles and pool elements alternate: handle, its PEs, next handle, ...
    PARAMS = (("entries", (P.ParamType.POOL_HANDLE, P.ParamType.POOL_ELEMENT), MANY),)
    sender_id: int
    receiver_id: int
    entries: tuple[tuple[bytes, tuple[PoolElement, ...]], ...] = ()
    reject: bool = False
    more_to_send: bool = False


@dataclass(frozen=True, slots=True)
class HandleUpdate(EnrpMessage):
    """``takeover_suggested`` is rsplib's T flag (draft-dreibholz-rserpool-enrp-takeover)."""

    TYPE = EnrpType.HANDLE_UPDATE
    FLAGS = {"takeover_suggested": 0x01}
    FIXED = ("!IIH2x", ("sender_id", "receiver_id", "update_action"))
    PARAMS = (("pool_handle", _HANDLE, ONE), ("pool_element", _PE, ONE))
    sender_id: int
    receiver_id: int
    update_action: int
    pool_handle: bytes
    pool_element: PoolElement
    takeover_suggested: bool = False


@dataclass(frozen=True, slots=True)
class ListRequest(EnrpMessage):
    TYPE = EnrpType.LIST_REQUEST
    FIXED = _ENRP_IDS
    sender_id: int
    receiver_id: int


@dataclass(frozen=True, slots=True)
class ListResponse(EnrpMessage):
    TYPE = EnrpType.LIST_RESPONSE
    FLAGS = {"reject": 0x01}
    FIXED = _ENRP_IDS
    PARAMS = (("servers", _SERVER_INFO, MANY),)
    sender_id: int
    receiver_id: int
    servers: tuple[ServerInformation, ...] = ()
    reject: bool = False


@dataclass(frozen=True, slots=True)
class InitTakeover(EnrpMessage):
    TYPE = EnrpType.INIT_TAKEOVER
    FIXED = _ENRP_TARGET
    sender_id: int
    receiver_id: int
    target_id: int


@dataclass(frozen=True, slots=True)
class InitTakeoverAck(EnrpMessage):
    TYPE = EnrpType.INIT_TAKEOVER_ACK
    FIXED = _ENRP_TARGET
    sender_id: int
    receiver_id: int
    target_id: int


@dataclass(frozen=True, slots=True)
class TakeoverServer(EnrpMessage):
    TYPE = EnrpType.TAKEOVER_SERVER
    FIXED = _ENRP_TARGET
    sender_id: int
    receiver_id: int
    target_id: int


@dataclass(frozen=True, slots=True)
class EnrpError(EnrpMessage):
    TYPE = EnrpType.ERROR
    FIXED = _ENRP_IDS
    PARAMS = (("error", _ERROR, ONE),)
    sender_id: int
    receiver_id: int
    error: OperationError


ASAP_MESSAGES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Registration,
        Deregistration,
        RegistrationResponse,
        DeregistrationResponse,
        HandleResolution,
        HandleResolutionResponse,
        EndpointKeepAlive,
        EndpointKeepAliveAck,
        EndpointUnreachable,
        ServerAnnounce,
        Cookie,
        CookieEcho,
        BusinessCard,
        AsapError,
    )
}
ENRP_MESSAGES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Presence,
        HandleTableRequest,
        HandleTableResponse,
        HandleUpdate,
        ListRequest,
        ListResponse,
        InitTakeover,
        InitTakeoverAck,
        TakeoverServer,
        EnrpError,
    )
}
MESSAGES_BY_PPID = {ASAP_PPID: ASAP_MESSAGES, ENRP_PPID: ENRP_MESSAGES}

# --------------------------------------------------------------------------- layout


class _Layout:
    """What the generic codec needs of one message class, computed once."""

    __slots__ = (
        "cls",
        "flags",
        "fixed",
        "fixed_slots",
        "params",
        "accepted",
        "defaults",
        "make",
    )

    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        fields = [f.name for f in dataclasses.fields(cls)]
        index = {name: i for i, name in enumerate(fields)}
        self.flags = tuple((name, bit, index[name]) for name, bit in cls.FLAGS.items())
        fmt, names = cls.FIXED
        self.fixed = struct.Struct(fmt) if fmt else None
        self.fixed_slots = slice(0, len(names))
        assert fields[: len(names)] == list(names), cls  # fixed fields come first
        self.params = tuple(
            (name, types, card, index[name]) for name, types, card in cls.PARAMS
        )
        # parameter type -> (field position, cardinality)
        self.accepted = {
            t: (index[name], card, name)
            for name, types, card in cls.PARAMS
            for t in types
        }
        self.defaults = [None] * len(fields)
        self.make = constructor(cls)


_LAYOUTS: dict[type, _Layout] = {
    cls: _Layout(cls)
    for table in (ASAP_MESSAGES, ENRP_MESSAGES)
    for cls in table.values()
}
_DECODE_LAYOUTS = {
    ppid: {t: _LAYOUTS[cls] for t, cls in table.items()}
    for ppid, table in MESSAGES_BY_PPID.items()
}
_HEADER = struct.Struct("!BBH")


def _encode_value(types: tuple[int, ...], value: Any) -> bytes:
    encoder = P.VALUE_ENCODERS.get(types[0])
    return encoder(value) if encoder else P.encode_param(value)


def encode(msg: Message) -> bytes:
    """The wire bytes of one ASAP or ENRP message."""
    layout = _LAYOUTS[type(msg)]
    flags = 0
    for name, bit, _ in layout.flags:
        if getattr(msg, name):
            flags |= bit
    parts = []
    if layout.fixed:
        parts.append(layout.fixed.pack(*(getattr(msg, n) for n in msg.FIXED[1])))
    for name, types, card, _ in layout.params:
        value = getattr(msg, name)
        if name == "entries":
            for handle, elements in value:
                parts.append(P.encode_pool_handle(handle))
                parts.extend(map(P.encode_pool_element, elements))
        elif card == MANY:
            parts.extend(_encode_value(types, v) for v in value)
        elif value is not None:
            parts.append(_encode_value(types, value))
    body = b"".join(parts)
    length = 4 + len(body)
    if length > MAX_MESSAGE_SIZE:
        raise ValueError(
            f"{type(msg).__name__} of {length} bytes exceeds {MAX_MESSAGE_SIZE}"
        )
    return _HEADER.pack(msg.TYPE, flags, length) + body


def decode(
    data: bytes, ppid: int = ASAP_PPID, reports: list[bytes] | None = None
) -> Message:
    """Decode exactly one message. ``ppid`` says ASAP (11) or ENRP (12).

    Unknown parameters whose type says "skip and report" are appended to ``reports``.
    Raises ProtocolError on anything malformed.
    """
    size = len(data)
    if size < 4:
        raise ProtocolError(
            f"{size} bytes, a header needs 4", field="message_length", offset=0
        )
    mtype, flags, length = _HEADER.unpack_from(data, 0)
    if length != size:
        raise ProtocolError(
            f"says {length} bytes, has {size}", field="message_length", offset=2
        )
    layout = _DECODE_LAYOUTS[ppid].get(mtype)
    if layout is None:
        raise ProtocolError(
            f"unknown message type 0x{mtype:02x}",
            field="message_type",
            offset=0,
            cause=Cause.UNRECOGNIZED_MESSAGE,
            data=bytes(data),
        )
    values: list[Any] = layout.defaults.copy()  # the dataclass fields, in order
    for _name, bit, i in layout.flags:
        values[i] = bool(flags & bit)
    pos = 4
    if layout.fixed:
        if size < 4 + layout.fixed.size:
            raise ProtocolError(
                "truncated fixed fields", field=layout.cls.FIXED[1][0], offset=4
            )
        values[layout.fixed_slots] = layout.fixed.unpack_from(data, 4)
        pos += layout.fixed.size
    if layout.cls is HandleTableResponse:
        values[2] = _decode_table_entries(data, pos, size, reports)
        return layout.make(*values)
    accepted = layout.accepted
    decoders = P.PARAM_DECODERS
    for ptype, vs, ve in P.params_in(data, pos, size, "message", reports):
        slot = accepted.get(ptype)
        if slot is None:
            raise ProtocolError(
                f"parameter 0x{ptype:04x} does not belong in {layout.cls.__name__}",
                field="parameter_type",
                offset=vs - 4,
            )
        i, card, name = slot
        value = decoders[ptype](data, vs, ve, reports)
        if card == MANY:
            if values[i] is None:
                values[i] = [value]
            else:
                values[i].append(value)
        elif values[i] is None:
            values[i] = value
        else:
            raise ProtocolError(
                f"more than one in {layout.cls.__name__}", field=name, offset=vs - 4
            )
    for name, _types, card, i in layout.params:
        if card == MANY:
            values[i] = tuple(values[i]) if values[i] else ()
        elif card == ONE and values[i] is None:
            raise ProtocolError(
                f"missing in {layout.cls.__name__}", field=name, offset=size
            )
    return layout.make(*values)


def _decode_table_entries(data: bytes, pos: int, end: int, reports) -> tuple:
    entries: list[tuple[bytes, list[PoolElement]]] = []
    for ptype, vs, ve in P.params_in(data, pos, end, "handle_table", reports):
        if ptype == P.ParamType.POOL_HANDLE:
            entries.append((P.PARAM_DECODERS[ptype](data, vs, ve, reports), []))
        elif ptype == P.ParamType.POOL_ELEMENT and entries:
            entries[-1][1].append(P.PARAM_DECODERS[ptype](data, vs, ve, reports))
        else:
            raise ProtocolError(
                "expected a pool handle followed by its pool elements",
                field="handle_table.parameter_type",
                offset=vs - 4,
            )
    return tuple((handle, tuple(pes)) for handle, pes in entries)


# The offending bytes an ERROR quotes are cut to this, so the answer to a huge
# unrecognized message still fits in one message.
MAX_ERROR_INFO = 1024


def error_for(
    err: ProtocolError, ppid: int = ASAP_PPID, sender_id: int = 0, receiver_id: int = 0
) -> Message:
    """The ERROR message that answers a ProtocolError (RFC 5354 cause and its info)."""
    info = err.data[:MAX_ERROR_INFO]
    if not info and err.cause == Cause.INVALID_VALUES:
        info = f"{err.field} at byte {err.offset}: {err.reason}".encode()[:256]
    error = OperationError.single(err.cause, info)
    if ppid == ENRP_PPID:
        return EnrpError(sender_id, receiver_id, error)
    return AsapError(error)


def unrecognized_parameters(reports: list[bytes]) -> OperationError:
    """One Operation Error reporting skipped-and-reported parameters (a few, cut short)."""
    return OperationError(
        tuple(
            ErrorCause(Cause.UNRECOGNIZED_PARAMETER, tlv[:MAX_ERROR_INFO])
            for tlv in reports[:8]
        )
    )
