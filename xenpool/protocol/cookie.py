"""The session-state cookie a PE hands its PU (carried in an ASAP Cookie parameter).

It says what to start on failover, whether the VM may be running, and which host ran it
(whom to fence). It is authenticated with HMAC-SHA256 under the pool's secret and carries
its issue time, so a forged, altered, foreign or stale cookie is refused.

Layout: magic "XPC" | version (8) | flags (8, bit 0 = running) | cpu (8) |
vcpus (16) | ram_mb (32) | pe_identifier (32) | issued_at_ms (64) |
pool_handle, server_id, disk, ips, host: each 16-bit length + UTF-8/bytes |
HMAC-SHA256 over all of the above (32 bytes).

The cpu byte (once reserved, and still 0 from older PEs) is the CPU the VM used as its
PE measured it, in hundredths of a core (1-255); 0 means not measured. A PE that moves a
VM away to even out the pool sets it, so the next PE counts the VM at its measured use at
once instead of guessing it from its RAM. In cores, not in shares of a host, because the
next host may have another number of CPUs.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from .errors import Cause, ProtocolError
from .params import MAX_COOKIE, MAX_POOL_HANDLE
from .session import MAX_DISK, MAX_HOST, MAX_IP_LIST, MAX_SERVER_ID

MAGIC = b"XPC"
COOKIE_VERSION = 1
MAC_SIZE = 32
_FIXED = struct.Struct("!3sBBBHIIQ")
CPU_STEPS_PER_CORE = 100  # the cpu byte counts hundredths of a core
_U16 = struct.Struct("!H")
_RUNNING = 0x01
# Clocks of two hosts differ; a cookie from a little in the future is still fine.
CLOCK_SKEW_S = 30.0


@dataclass(frozen=True, slots=True)
class SessionState:
    pool_handle: bytes
    server_id: str
    disk: str
    ips: tuple[str, ...]
    ram_mb: int
    vcpus: int
    running: bool
    host: str  # the issuing PE's fencing identity (its hostname)
    pe_identifier: int
    issued_at: float  # seconds since the epoch, millisecond precision
    cpu_cores: float = (
        0.0  # the CPU it used on the issuing host, in cores; 0: not measured
    )


class CookieError(ProtocolError):
    """A cookie that must not be trusted. ``reason`` is one line for the PU."""

    def __init__(self, reason: str, offset: int = 0) -> None:
        super().__init__(
            reason, field="cookie", offset=offset, cause=Cause.SECURITY_REJECTION
        )


def _text(value: str | bytes, limit: int, field: str) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode()
    if len(raw) > limit:
        raise ValueError(f"{field} longer than {limit} bytes")
    return _U16.pack(len(raw)) + raw


def seal(state: SessionState, secret: bytes) -> bytes:
    """The authenticated cookie bytes for ``state``."""
    body = _FIXED.pack(
        MAGIC,
        COOKIE_VERSION,
        _RUNNING if state.running else 0,
        min(max(round(state.cpu_cores * CPU_STEPS_PER_CORE), 0), 255),
        state.vcpus,
        state.ram_mb,
        state.pe_identifier,
        round(state.issued_at * 1000),
    ) + b"".join(
        (
            _text(state.pool_handle, MAX_POOL_HANDLE, "pool_handle"),
            _text(state.server_id, MAX_SERVER_ID, "server_id"),
            _text(state.disk, MAX_DISK, "disk"),
            _text(" ".join(state.ips), MAX_IP_LIST, "ips"),
            _text(state.host, MAX_HOST, "host"),
        )
    )
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def _parse(body: bytes) -> SessionState:
    """The fields of a cookie body (everything before the MAC)."""
    magic, version, flags, cpu_steps, vcpus, ram_mb, pe_id, issued_ms = (
        _FIXED.unpack_from(body, 0)
    )
    if magic != MAGIC or version != COOKIE_VERSION:
        raise CookieError(f"unknown cookie format {magic!r} version {version}")
    pos = _FIXED.size
    fields = []
    for name, limit in (
        ("pool_handle", MAX_POOL_HANDLE),
        ("server_id", MAX_SERVER_ID),
        ("disk", MAX_DISK),
        ("ips", MAX_IP_LIST),
        ("host", MAX_HOST),
    ):
        if len(body) - pos < 2:
            raise CookieError(f"truncated at {name}", pos)
        (n,) = _U16.unpack_from(body, pos)
        if n > limit or pos + 2 + n > len(body):
            raise CookieError(f"{name} of {n} bytes does not fit", pos)
        fields.append(body[pos + 2 : pos + 2 + n])
        pos += 2 + n
    if pos != len(body):
        raise CookieError("trailing bytes", pos)
    handle, server_id, disk, ips, host = fields
    try:
        texts = [f.decode() for f in (server_id, disk, ips, host)]
    except UnicodeDecodeError:
        raise CookieError("text field not UTF-8") from None
    return SessionState(
        handle,
        texts[0],
        texts[1],
        tuple(texts[2].split()),
        ram_mb,
        vcpus,
        bool(flags & _RUNNING),
        texts[3],
        pe_id,
        issued_ms / 1000,
        cpu_steps / CPU_STEPS_PER_CORE,
    )


def _body(data: bytes) -> bytes:
    if len(data) > MAX_COOKIE or len(data) < _FIXED.size + MAC_SIZE:
        raise CookieError(f"{len(data)} bytes is not a xenpool cookie")
    return data[:-MAC_SIZE]


def peek(data: bytes) -> SessionState:
    """The cookie's fields WITHOUT checking its MAC: only for a PU choosing which PE to
    go back to first. Never trust it for anything else."""
    return _parse(_body(data))


def unseal(
    data: bytes, secret: bytes, *, pool_handle: bytes, now: float, max_age_s: float
) -> SessionState:
    """Check and open a cookie; raises CookieError saying why it is refused."""
    body = _body(data)
    if not hmac.compare_digest(
        data[-MAC_SIZE:], hmac.new(secret, body, hashlib.sha256).digest()
    ):
        raise CookieError(
            "bad MAC: forged, altered or sealed with another pool secret", len(body)
        )
    state = _parse(body)
    if state.pool_handle != pool_handle:
        raise CookieError(
            f"issued for pool {state.pool_handle!r}, this is pool {pool_handle!r}"
        )
    if now - state.issued_at > max_age_s:
        raise CookieError(
            f"expired: issued {now - state.issued_at:.0f} s ago, at most {max_age_s:.0f} s accepted"
        )
    if state.issued_at - now > CLOCK_SKEW_S:
        raise CookieError(f"issued {state.issued_at - now:.0f} s in the future")
    return state
