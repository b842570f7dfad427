"""RSerPool parameters (RFC 5354, policies RFC 5356, rsplib extensions), sans-IO.

Every parameter is a TLV: type (16 bits), length (16 bits, header included, padding
excluded), value, zero padding to a multiple of four bytes. The top two bits of an
unknown type say what a receiver does with it (RFC 5354, section 2).

Decoders take the whole input buffer and absolute offsets, so every error names the
byte offset in what the peer sent.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ._construct import constructor
from .errors import Cause, ProtocolError

# Limits on untrusted input. rsplib uses the same pool handle limit.
MAX_POOL_HANDLE = 32
MAX_ADDRESSES = 32
MAX_COOKIE = 2048
MAX_CAUSES = 16
MAX_POLICY_DATA = 64


class ParamType(enum.IntEnum):
    IPV4_ADDRESS = 0x0001
    IPV6_ADDRESS = 0x0002
    DCCP_TRANSPORT = 0x0003
    SCTP_TRANSPORT = 0x0004
    TCP_TRANSPORT = 0x0005
    UDP_TRANSPORT = 0x0006
    UDP_LITE_TRANSPORT = 0x0007
    POOL_MEMBER_SELECTION_POLICY = 0x0008
    POOL_HANDLE = 0x0009
    POOL_ELEMENT = 0x000A
    SERVER_INFORMATION = 0x000B
    OPERATION_ERROR = 0x000C
    COOKIE = 0x000D
    PE_IDENTIFIER = 0x000E
    PE_CHECKSUM = 0x000F
    # rsplib: how many PEs a handle resolution wants (top bits 10: skip if unknown).
    HANDLE_RESOLUTION_OPTION = 0x803F
    # xenpool: HMAC proving a PE knows its pool's secret (top bits 10: skip if unknown).
    POOL_AUTHENTICATION = 0x8041
    # xenpool: the RAM (MB) a PU's VM needs, in a HANDLE_RESOLUTION (skip if unknown).
    REQUEST_RAM = 0x8043


class UnknownParameterAction(enum.IntEnum):
    """What the top two bits of an unknown parameter type ask for (RFC 5354)."""

    STOP = 0b00
    STOP_AND_REPORT = 0b01
    SKIP = 0b10
    SKIP_AND_REPORT = 0b11


class TransportUse(enum.IntEnum):
    DATA_ONLY = 0x0000
    DATA_PLUS_CONTROL = 0x0001


class PolicyType(enum.IntEnum):
    """Pool member selection policies: RFC 5356 and rsplib's extensions (0xb000xxxx)."""

    ROUND_ROBIN = 0x00000001
    WEIGHTED_ROUND_ROBIN = 0x00000002
    RANDOM = 0x00000003
    WEIGHTED_RANDOM = 0x00000004
    PRIORITY = 0x00000005
    LEAST_USED = 0x40000001
    LEAST_USED_DEGRADATION = 0x40000002
    PRIORITY_LEAST_USED = 0x40000003
    RANDOMIZED_LEAST_USED = 0x40000004
    # rsplib extensions (rserpool-policytypes.h)
    RANDOMIZED_PRIORITY_LEAST_USED = 0xB0001001
    RANDOMIZED_LEAST_USED_DEGRADATION = 0xB0001002
    PRIORITY_LEAST_USED_DEGRADATION = 0xB0001003
    RANDOMIZED_PRIORITY_LEAST_USED_DEGRADATION = 0xB0001004
    WEIGHTED_RANDOM_DPF = 0xB0002001
    LEAST_USED_DPF = 0xB0002002
    LEAST_USED_DEGRADATION_DPF = 0xB0002003
    # xenpool: least used among the PEs with RAM free for the request (an adaptive type)
    LEAST_USED_FREE_RAM = 0x40007801


# The 32-bit fields each policy carries, in wire order.
POLICY_FIELDS: dict[int, tuple[str, ...]] = {
    PolicyType.ROUND_ROBIN: (),
    PolicyType.WEIGHTED_ROUND_ROBIN: ("weight",),
    PolicyType.RANDOM: (),
    PolicyType.WEIGHTED_RANDOM: ("weight",),
    PolicyType.PRIORITY: ("priority",),
    PolicyType.LEAST_USED: ("load",),
    PolicyType.LEAST_USED_DEGRADATION: ("load", "load_degradation"),
    PolicyType.PRIORITY_LEAST_USED: ("load", "load_degradation"),
    PolicyType.RANDOMIZED_LEAST_USED: ("load",),
    PolicyType.RANDOMIZED_PRIORITY_LEAST_USED: ("load", "load_degradation"),
    PolicyType.RANDOMIZED_LEAST_USED_DEGRADATION: ("load", "load_degradation"),
    PolicyType.PRIORITY_LEAST_USED_DEGRADATION: ("load", "load_degradation"),
    PolicyType.RANDOMIZED_PRIORITY_LEAST_USED_DEGRADATION: ("load", "load_degradation"),
    PolicyType.WEIGHTED_RANDOM_DPF: ("weight", "weight_dpf", "distance"),
    PolicyType.LEAST_USED_DPF: ("load", "load_dpf", "distance"),
    PolicyType.LEAST_USED_DEGRADATION_DPF: (
        "load",
        "load_degradation",
        "load_dpf",
        "distance",
    ),
    PolicyType.LEAST_USED_FREE_RAM: ("load", "free_ram_mb"),
}

# Load, degradation and DPF values are fractions of 0xFFFFFFFF (rsplib's PPV_MAX_LOAD).
MAX_LOAD = 0xFFFFFFFF


def load_to_wire(fraction: float) -> int:
    """Map a load in [0, 1] to its 32-bit wire value, clamping out-of-range values."""
    return round(min(max(fraction, 0.0), 1.0) * MAX_LOAD)


def load_from_wire(value: int) -> float:
    return value / MAX_LOAD


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """A Pool Member Selection Policy parameter.

    ``values`` are the policy's 32-bit fields in wire order, named by
    ``POLICY_FIELDS[policy_type]`` and readable as attributes (``policy.load``);
    ``opaque`` carries the data of a policy type this implementation does not know.
    """

    PARAM_TYPE: ClassVar[int] = ParamType.POOL_MEMBER_SELECTION_POLICY

    policy_type: int
    values: tuple[int, ...] = ()
    opaque: bytes = b""

    @classmethod
    def make(cls, policy_type: int, **fields: int) -> PoolPolicy:
        """``PoolPolicy.make(PolicyType.LEAST_USED, load=...)``; missing fields are 0."""
        names = POLICY_FIELDS[policy_type]
        unknown = set(fields) - set(names)
        if unknown:
            raise ValueError(
                f"policy 0x{policy_type:08x} has no field {', '.join(sorted(unknown))}"
            )
        return cls(policy_type, tuple(fields.get(name, 0) for name in names))

    def field(self, name: str) -> int:
        """A field by name; 0 when this policy type does not carry it."""
        names = POLICY_FIELDS.get(self.policy_type, ())
        return self.values[names.index(name)] if name in names else 0

    weight = property(lambda self: self.field("weight"))
    priority = property(lambda self: self.field("priority"))
    load = property(lambda self: self.field("load"))
    load_degradation = property(lambda self: self.field("load_degradation"))
    load_dpf = property(lambda self: self.field("load_dpf"))
    weight_dpf = property(lambda self: self.field("weight_dpf"))
    distance = property(lambda self: self.field("distance"))
    free_ram_mb = property(lambda self: self.field("free_ram_mb"))


@dataclass(frozen=True, slots=True)
class SctpTransport:
    PARAM_TYPE: ClassVar[int] = ParamType.SCTP_TRANSPORT
    port: int
    addresses: tuple[str, ...]
    transport_use: int = TransportUse.DATA_ONLY


@dataclass(frozen=True, slots=True)
class TcpTransport:
    PARAM_TYPE: ClassVar[int] = ParamType.TCP_TRANSPORT
    port: int
    addresses: tuple[str, ...]
    transport_use: int = TransportUse.DATA_ONLY


@dataclass(frozen=True, slots=True)
class UdpTransport:
    PARAM_TYPE: ClassVar[int] = ParamType.UDP_TRANSPORT
    port: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UdpLiteTransport:
    PARAM_TYPE: ClassVar[int] = ParamType.UDP_LITE_TRANSPORT
    port: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DccpTransport:
    PARAM_TYPE: ClassVar[int] = ParamType.DCCP_TRANSPORT
    port: int
    addresses: tuple[str, ...]
    service_code: int = 0


Transport = (
    SctpTransport | TcpTransport | UdpTransport | UdpLiteTransport | DccpTransport
)
TRANSPORT_TYPES = (
    ParamType.SCTP_TRANSPORT,
    ParamType.TCP_TRANSPORT,
    ParamType.UDP_TRANSPORT,
    ParamType.UDP_LITE_TRANSPORT,
    ParamType.DCCP_TRANSPORT,
)


@dataclass(frozen=True, slots=True)
class PoolElement:
    """A Pool Element parameter: one PE with its transports and policy."""

    PARAM_TYPE: ClassVar[int] = ParamType.POOL_ELEMENT

    identifier: int
    home_registrar: int
    registration_life: int  # milliseconds, signed on the wire
    user_transport: Transport
    policy: PoolPolicy
    asap_transport: Transport | None = None


@dataclass(frozen=True, slots=True)
class ServerInformation:
    """A registrar's identity and its ENRP transport."""

    PARAM_TYPE: ClassVar[int] = ParamType.SERVER_INFORMATION

    server_id: int
    transport: Transport


@dataclass(frozen=True, slots=True)
class ErrorCause:
    code: int
    info: bytes = b""


@dataclass(frozen=True, slots=True)
class OperationError:
    PARAM_TYPE: ClassVar[int] = ParamType.OPERATION_ERROR
    causes: tuple[ErrorCause, ...]

    @classmethod
    def single(cls, cause: int, info: bytes = b"") -> OperationError:
        return cls((ErrorCause(cause, info),))


# ------------------------------------------------------------------------- encoding

_HDR = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_PORT_USE = struct.Struct("!HH")
_PE_FIXED = struct.Struct("!IIi")
_DCCP_FIXED = struct.Struct("!HHI")


def tlv(param_type: int, value: bytes) -> bytes:
    """One parameter: header, value, zero padding to four bytes."""
    length = 4 + len(value)
    if length > 0xFFFF:
        raise ValueError(f"parameter 0x{param_type:04x} too long: {length} bytes")
    return _HDR.pack(param_type, length) + value + b"\0" * (-length & 3)


def encode_address(address: str) -> bytes:
    if ":" in address:
        return tlv(ParamType.IPV6_ADDRESS, socket.inet_pton(socket.AF_INET6, address))
    return tlv(ParamType.IPV4_ADDRESS, socket.inet_pton(socket.AF_INET, address))


def _addresses(addresses: tuple[str, ...]) -> bytes:
    return b"".join(map(encode_address, addresses))


def _encode_port_use(t: SctpTransport | TcpTransport) -> bytes:
    return tlv(
        t.PARAM_TYPE, _PORT_USE.pack(t.port, t.transport_use) + _addresses(t.addresses)
    )


def _encode_port_reserved(t: UdpTransport | UdpLiteTransport) -> bytes:
    return tlv(t.PARAM_TYPE, _PORT_USE.pack(t.port, 0) + _addresses(t.addresses))


def _encode_dccp(t: DccpTransport) -> bytes:
    return tlv(
        t.PARAM_TYPE,
        _DCCP_FIXED.pack(t.port, 0, t.service_code) + _addresses(t.addresses),
    )


def encode_policy(p: PoolPolicy) -> bytes:
    expected = len(POLICY_FIELDS.get(p.policy_type, p.values))
    if len(p.values) != expected:
        raise ValueError(
            f"policy 0x{p.policy_type:08x} needs {expected} values, has {len(p.values)}"
        )
    return tlv(
        ParamType.POOL_MEMBER_SELECTION_POLICY,
        struct.pack(f"!I{len(p.values)}I", p.policy_type, *p.values) + p.opaque,
    )


def encode_pool_element(pe: PoolElement) -> bytes:
    body = (
        _PE_FIXED.pack(pe.identifier, pe.home_registrar, pe.registration_life)
        + encode_param(pe.user_transport)
        + encode_policy(pe.policy)
    )
    if pe.asap_transport is not None:
        body += encode_param(pe.asap_transport)
    return tlv(ParamType.POOL_ELEMENT, body)


def encode_server_information(si: ServerInformation) -> bytes:
    return tlv(
        ParamType.SERVER_INFORMATION,
        _U32.pack(si.server_id) + encode_param(si.transport),
    )


def encode_operation_error(oe: OperationError) -> bytes:
    body = b"".join(
        _HDR.pack(c.code, 4 + len(c.info)) + c.info + b"\0" * (-len(c.info) & 3)
        for c in oe.causes
    )
    return tlv(ParamType.OPERATION_ERROR, body)


_OBJECT_ENCODERS: dict[type, Callable] = {
    SctpTransport: _encode_port_use,
    TcpTransport: _encode_port_use,
    UdpTransport: _encode_port_reserved,
    UdpLiteTransport: _encode_port_reserved,
    DccpTransport: _encode_dccp,
    PoolPolicy: encode_policy,
    PoolElement: encode_pool_element,
    ServerInformation: encode_server_information,
    OperationError: encode_operation_error,
}


def encode_param(value) -> bytes:
    """Encode a parameter object (transport, policy, pool element, ...)."""
    return _OBJECT_ENCODERS[type(value)](value)


# Parameters whose value is a plain Python value in a message.
def encode_pool_handle(handle: bytes) -> bytes:
    return tlv(ParamType.POOL_HANDLE, handle)


def encode_cookie(cookie: bytes) -> bytes:
    return tlv(ParamType.COOKIE, cookie)


def encode_pe_identifier(identifier: int) -> bytes:
    return tlv(ParamType.PE_IDENTIFIER, _U32.pack(identifier))


def encode_pe_checksum(checksum: int) -> bytes:
    return tlv(ParamType.PE_CHECKSUM, _U16.pack(checksum))


def encode_handle_resolution_option(items: int) -> bytes:
    return tlv(ParamType.HANDLE_RESOLUTION_OPTION, _U32.pack(items))


def encode_request_ram(ram_mb: int) -> bytes:
    return tlv(ParamType.REQUEST_RAM, _U32.pack(ram_mb))


def encode_pool_authentication(mac: bytes) -> bytes:
    return tlv(ParamType.POOL_AUTHENTICATION, mac)


def reachable_address(transport, source: str) -> str:
    """Where to reach ``transport``: its first specified address; an unspecified one
    (0.0.0.0, ::) or none stands for ``source``, the address its message came from."""
    for address in transport.addresses:
        if not ipaddress.ip_address(address).is_unspecified:
            return address
    return source


def registration_mac(secret: bytes, pool_handle: bytes, element: PoolElement) -> bytes:
    """HMAC-SHA256 under the pool's secret over the pool handle and the PE parameter
    (its canonical encoding), proving the registering PE knows the secret."""
    return hmac.new(
        secret,
        b"xenpool-registration\0" + pool_handle + encode_pool_element(element),
        hashlib.sha256,
    ).digest()


VALUE_ENCODERS: dict[int, Callable] = {
    ParamType.POOL_HANDLE: encode_pool_handle,
    ParamType.COOKIE: encode_cookie,
    ParamType.PE_IDENTIFIER: encode_pe_identifier,
    ParamType.PE_CHECKSUM: encode_pe_checksum,
    ParamType.HANDLE_RESOLUTION_OPTION: encode_handle_resolution_option,
    ParamType.POOL_AUTHENTICATION: encode_pool_authentication,
    ParamType.REQUEST_RAM: encode_request_ram,
}


# ------------------------------------------------------------------------- decoding
#
# The decoders are on the hot path of every registrar and PU (100,000+ messages per
# second), so they read with precompiled structs at absolute offsets and avoid
# generators and keyword arguments.

_unpack_hdr = _HDR.unpack_from
_new_sctp = constructor(SctpTransport)
_new_tcp = constructor(TcpTransport)
_new_udp = constructor(UdpTransport)
_new_udp_lite = constructor(UdpLiteTransport)
_new_dccp = constructor(DccpTransport)
_new_policy = constructor(PoolPolicy)
_new_pool_element = constructor(PoolElement)
_unpack_u16 = _U16.unpack_from
_unpack_u32 = _U32.unpack_from
_KNOWN_TYPES = frozenset(ParamType)
_IPV4, _IPV6 = ParamType.IPV4_ADDRESS, ParamType.IPV6_ADDRESS
_POLICY_TYPE = ParamType.POOL_MEMBER_SELECTION_POLICY
_inet_ntop = socket.inet_ntop
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


def _unknown(
    buf: bytes, ptype: int, pos: int, vend: int, field: str, reports: list[bytes] | None
) -> None:
    """Handle an unknown parameter type as its top two bits say: raise, or note and skip."""
    action = ptype >> 14
    tlv_bytes = bytes(buf[pos:vend])
    if action <= UnknownParameterAction.STOP_AND_REPORT:
        raise ProtocolError(
            f"unrecognized parameter type 0x{ptype:04x}",
            field=f"{field}.parameter_type",
            offset=pos,
            cause=Cause.UNRECOGNIZED_PARAMETER,
            report=action == UnknownParameterAction.STOP_AND_REPORT,
            data=tlv_bytes,
        )
    if action == UnknownParameterAction.SKIP_AND_REPORT and reports is not None:
        reports.append(tlv_bytes)


def params_in(
    buf: bytes, start: int, end: int, field: str, reports: list[bytes] | None
) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each known parameter in buf[start:end].

    Unknown types are handled as their top two bits say; the ones to report are
    appended to ``reports`` (when given) as their whole TLV. A last parameter
    without its padding is accepted, as rsplib does.
    """
    out = []
    pos = start
    while pos < end:
        if end - pos < 4:
            raise ProtocolError("truncated parameter header", field=field, offset=pos)
        ptype, plen = _unpack_hdr(buf, pos)
        vend = pos + plen
        if plen < 4 or vend > end:
            raise ProtocolError(
                f"parameter length {plen} does not fit",
                field=f"{field}.parameter_length",
                offset=pos + 2,
            )
        if ptype in _KNOWN_TYPES:
            out.append((ptype, pos + 4, vend))
        else:
            _unknown(buf, ptype, pos, vend, field, reports)
        pos = vend + (-plen & 3)
    return out


def _need(buf_len: int, size: int, field: str, offset: int) -> None:
    if buf_len < size:
        raise ProtocolError(
            f"needs {size} bytes, has {buf_len}", field=field, offset=offset
        )


def decode_address(buf: bytes, ptype: int, start: int, end: int, field: str) -> str:
    n = end - start
    if ptype == _IPV4 and n == 4:
        return _inet_ntop(_AF_INET, buf[start:end])
    if ptype == _IPV6 and n == 16:
        return _inet_ntop(_AF_INET6, buf[start:end])
    raise ProtocolError(
        f"bad address ({n} bytes, type 0x{ptype:04x})", field=field, offset=start - 4
    )


def _decode_addresses(
    buf: bytes, start: int, end: int, field: str, reports, max_count: int
) -> tuple[str, ...]:
    if end - start >= 8:  # fast path: exactly one address parameter
        ptype, plen = _unpack_hdr(buf, start)
        if start + plen == end and (ptype == _IPV4 or ptype == _IPV6):
            return (decode_address(buf, ptype, start + 4, end, field),)
    out = []
    for ptype, vs, ve in params_in(buf, start, end, field, reports):
        if ptype != _IPV4 and ptype != _IPV6:
            raise ProtocolError(
                f"expected an address, got parameter 0x{ptype:04x}",
                field=field,
                offset=vs - 4,
            )
        out.append(decode_address(buf, ptype, vs, ve, field))
    if not 0 < len(out) <= max_count:
        raise ProtocolError(
            f"{len(out)} addresses, 1..{max_count} allowed", field=field, offset=start
        )
    return tuple(out)


# Port, transport use, then one IPv4 address: the common SCTP/TCP transport. A pool's
# transports recur in every handle resolution, so decoded ones are interned by their
# bytes (they are immutable); the table is bounded and starts afresh when full.
_PORT_USE_IPV4 = struct.Struct("!HHHH4s")
_INTERNED_TRANSPORTS: dict[tuple, Transport] = {}
MAX_INTERNED_TRANSPORTS = 4096


def _port_use_transport(new, field: str, max_addresses: int):
    interned = _INTERNED_TRANSPORTS

    def decode(buf, start, end, reports):
        if end - start == _PORT_USE_IPV4.size:
            key = (new, bytes(buf[start:end]))
            transport = interned.get(key)
            if transport is not None:
                return transport
            port, use, atype, alen, addr = _PORT_USE_IPV4.unpack_from(buf, start)
            if atype == _IPV4 and alen == 8:
                if len(interned) >= MAX_INTERNED_TRANSPORTS:
                    interned.clear()
                transport = interned[key] = new(
                    port, (_inet_ntop(_AF_INET, addr),), use
                )
                return transport
        _need(end - start, 4, field, start)
        port, use = _PORT_USE.unpack_from(buf, start)
        return new(
            port,
            _decode_addresses(
                buf, start + 4, end, f"{field}.address", reports, max_addresses
            ),
            use,
        )

    return decode


_decode_sctp = _port_use_transport(_new_sctp, "sctp_transport", MAX_ADDRESSES)
_decode_tcp = _port_use_transport(_new_tcp, "tcp_transport", 1)


def _decode_udp(buf, start, end, reports) -> UdpTransport:
    _need(end - start, 4, "udp_transport", start)
    port = _unpack_u16(buf, start)[0]
    return _new_udp(
        port,
        _decode_addresses(buf, start + 4, end, "udp_transport.address", reports, 1),
    )


def _decode_udp_lite(buf, start, end, reports) -> UdpLiteTransport:
    _need(end - start, 4, "udp_lite_transport", start)
    port = _unpack_u16(buf, start)[0]
    return _new_udp_lite(
        port,
        _decode_addresses(
            buf, start + 4, end, "udp_lite_transport.address", reports, 1
        ),
    )


def _decode_dccp(buf, start, end, reports) -> DccpTransport:
    _need(end - start, 8, "dccp_transport", start)
    port, _reserved, service = _DCCP_FIXED.unpack_from(buf, start)
    return _new_dccp(
        port,
        _decode_addresses(buf, start + 8, end, "dccp_transport.address", reports, 1),
        service,
    )


_POLICY_STRUCTS = {
    ptype: struct.Struct(f"!{len(names)}I") for ptype, names in POLICY_FIELDS.items()
}


def _decode_policy(buf, start, end, reports) -> PoolPolicy:
    _need(end - start, 4, "policy", start)
    ptype = _unpack_u32(buf, start)[0]
    values = _POLICY_STRUCTS.get(ptype)
    if values is None:
        if end - start - 4 > MAX_POLICY_DATA:
            raise ProtocolError("policy data too long", field="policy", offset=start)
        return _new_policy(ptype, (), bytes(buf[start + 4 : end]))
    if end - start != 4 + values.size:
        raise ProtocolError(
            f"policy 0x{ptype:08x} needs {4 + values.size} bytes, has {end - start}",
            field="policy.length",
            offset=start - 2,
        )
    return _new_policy(ptype, values.unpack_from(buf, start + 4), b"")


def _decode_pool_element(buf, start, end, reports) -> PoolElement:
    """PE id, home registrar, life, then user transport, policy, optional ASAP
    transport, in this order (read by position, as rsplib does)."""
    _need(end - start, 12, "pool_element", start)
    identifier, home, life = _PE_FIXED.unpack_from(buf, start)
    # Fast path for the usual shape: a known transport, then the policy, nothing after.
    pos = start + 12
    if end - pos >= 16:
        t1, l1 = _unpack_hdr(buf, pos)
        decode_user = _TRANSPORT_DECODERS.get(t1)
        p2 = pos + ((l1 + 3) & ~3)
        if decode_user is not None and l1 >= 4 and p2 + 8 <= end:
            t2, l2 = _unpack_hdr(buf, p2)
            if (
                t2 == _POLICY_TYPE
                and l2 >= 8
                and (end == p2 + l2 or end == p2 + l2 + (-l2 & 3))
            ):
                user = decode_user(buf, pos + 4, pos + l1, reports)
                return _new_pool_element(
                    identifier,
                    home,
                    life,
                    user,
                    _decode_policy(buf, p2 + 4, p2 + l2, reports),
                    None,
                )
    parts = params_in(buf, start + 12, end, "pool_element", reports)
    if not 2 <= len(parts) <= 3:
        raise ProtocolError(
            f"needs user transport, policy and optional ASAP transport, has {len(parts)} parameters",
            field="pool_element",
            offset=start - 4,
        )
    user = _decode_transport(buf, parts[0], "pool_element.user_transport", reports)
    ptype, vs, ve = parts[1]
    if ptype != ParamType.POOL_MEMBER_SELECTION_POLICY:
        raise ProtocolError(
            "expected the selection policy", field="pool_element.policy", offset=vs - 4
        )
    policy = _decode_policy(buf, vs, ve, reports)
    asap = (
        _decode_transport(buf, parts[2], "pool_element.asap_transport", reports)
        if len(parts) == 3
        else None
    )
    return _new_pool_element(identifier, home, life, user, policy, asap)


def _decode_transport(buf, part, field, reports) -> Transport:
    ptype, vs, ve = part
    decoder = _TRANSPORT_DECODERS.get(ptype)
    if decoder is None:
        raise ProtocolError(
            f"expected a transport, got parameter 0x{ptype:04x}",
            field=field,
            offset=vs - 4,
        )
    return decoder(buf, vs, ve, reports)


def _decode_server_information(buf, start, end, reports) -> ServerInformation:
    _need(end - start, 4, "server_information", start)
    server_id = _unpack_u32(buf, start)[0]
    parts = params_in(buf, start + 4, end, "server_information", reports)
    if len(parts) != 1:
        raise ProtocolError(
            "needs exactly one transport", field="server_information", offset=start - 4
        )
    return ServerInformation(
        server_id,
        _decode_transport(buf, parts[0], "server_information.transport", reports),
    )


def _decode_operation_error(buf, start, end, reports) -> OperationError:
    causes = []
    pos = start
    while pos < end:
        if end - pos < 4:
            raise ProtocolError(
                "truncated cause header", field="operation_error.cause", offset=pos
            )
        code, clen = _unpack_hdr(buf, pos)
        if clen < 4 or pos + clen > end:
            raise ProtocolError(
                f"cause length {clen} does not fit",
                field="operation_error.cause_length",
                offset=pos + 2,
            )
        causes.append(ErrorCause(code, bytes(buf[pos + 4 : pos + clen])))
        if len(causes) > MAX_CAUSES:
            raise ProtocolError(
                f"more than {MAX_CAUSES} causes", field="operation_error", offset=pos
            )
        pos += clen + (-clen & 3)
    if not causes:
        raise ProtocolError("no cause", field="operation_error", offset=start - 4)
    return OperationError(tuple(causes))


def _decode_pool_handle(buf, start, end, reports) -> bytes:
    if not 0 < end - start <= MAX_POOL_HANDLE:
        raise ProtocolError(
            f"pool handle of {end - start} bytes (1..{MAX_POOL_HANDLE})",
            field="pool_handle",
            offset=start - 4,
        )
    return bytes(buf[start:end])


def _decode_cookie(buf, start, end, reports) -> bytes:
    if not 0 < end - start <= MAX_COOKIE:
        raise ProtocolError(
            f"cookie of {end - start} bytes (1..{MAX_COOKIE})",
            field="cookie",
            offset=start - 4,
        )
    return bytes(buf[start:end])


def _fixed(struct_: struct.Struct, field: str):
    def decode(buf, start, end, reports) -> int:
        if end - start != struct_.size:
            raise ProtocolError(
                f"needs {struct_.size} bytes, has {end - start}",
                field=field,
                offset=start - 4,
            )
        return struct_.unpack_from(buf, start)[0]

    return decode


def _decode_mac(buf, start, end, reports) -> bytes:
    if end - start != 32:
        raise ProtocolError(
            f"needs 32 bytes, has {end - start}",
            field="pool_authentication",
            offset=start - 4,
        )
    return bytes(buf[start:end])


def _not_here(buf, start, end, reports):
    raise ProtocolError(
        "address outside a transport", field="address", offset=start - 4
    )


_TRANSPORT_DECODERS: dict[int, Callable] = {
    ParamType.SCTP_TRANSPORT: _decode_sctp,
    ParamType.TCP_TRANSPORT: _decode_tcp,
    ParamType.UDP_TRANSPORT: _decode_udp,
    ParamType.UDP_LITE_TRANSPORT: _decode_udp_lite,
    ParamType.DCCP_TRANSPORT: _decode_dccp,
}

# decoder(buf, value_start, value_end, reports) -> value, for each parameter type.
PARAM_DECODERS: dict[int, Callable] = {
    **_TRANSPORT_DECODERS,
    ParamType.IPV4_ADDRESS: _not_here,
    ParamType.IPV6_ADDRESS: _not_here,
    ParamType.POOL_MEMBER_SELECTION_POLICY: _decode_policy,
    ParamType.POOL_HANDLE: _decode_pool_handle,
    ParamType.POOL_ELEMENT: _decode_pool_element,
    ParamType.SERVER_INFORMATION: _decode_server_information,
    ParamType.OPERATION_ERROR: _decode_operation_error,
    ParamType.COOKIE: _decode_cookie,
    ParamType.PE_IDENTIFIER: _fixed(_U32, "pe_identifier"),
    ParamType.PE_CHECKSUM: _fixed(_U16, "pe_checksum"),
    ParamType.HANDLE_RESOLUTION_OPTION: _fixed(_U32, "handle_resolution_option"),
    ParamType.POOL_AUTHENTICATION: _decode_mac,
    ParamType.REQUEST_RAM: _fixed(_U32, "request_ram"),
}


def decode_param(data: bytes, reports: list[bytes] | None = None):
    """Decode one standalone parameter (a whole TLV, padding optional)."""
    parts = params_in(data, 0, len(data), "parameter", reports)
    if len(parts) != 1:
        raise ProtocolError(
            f"expected one parameter, found {len(parts)}", field="parameter", offset=0
        )
    ptype, vs, ve = parts[0]
    return PARAM_DECODERS[ptype](data, vs, ve, reports)
