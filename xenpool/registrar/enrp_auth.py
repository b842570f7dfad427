"""Authenticated ENRP between registrars that share a secret (``--enrp-secret FILE``).

RFC 5353 leaves ENRP's security to TLS or IPsec; without either, any host that reaches a
registrar's ENRP port (or, with ``--enrp-announce``, its multicast group) could act as a
peer and add PEs that no pool secret ever checked. With a secret, every ENRP message a
registrar sends ends in one more parameter, ENRP Authentication (type 0x8045, top bits
10: a peer that does not know it skips it): HMAC-SHA256 under the secret over the
message as it would be without the parameter. A registrar with a secret takes only
messages whose last parameter is a valid one.

Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

ENRP_AUTHENTICATION = 0x8045
_PARAM = struct.Struct("!HH")
_MAC_SIZE = hashlib.sha256().digest_size
TRAILER_SIZE = _PARAM.size + _MAC_SIZE  # 36: keeps the message 4-byte aligned


def _mac(secret: bytes, frame: bytes) -> bytes:
    return hmac.new(secret, b"xenpool-enrp\0" + frame, hashlib.sha256).digest()


def sign(frame: bytes, secret: bytes) -> bytes:
    """``frame`` (one encoded ENRP message) with its ENRP Authentication parameter."""
    length = struct.unpack_from("!H", frame, 2)[0] + TRAILER_SIZE
    return (
        frame[:2]
        + struct.pack("!H", length)
        + frame[4:]
        + _PARAM.pack(ENRP_AUTHENTICATION, TRAILER_SIZE)
        + _mac(secret, frame)
    )


def verify(frame: bytes, secret: bytes) -> bytes | None:
    """The message without its authentication when that proves ``secret``; None when
    it is missing, malformed or wrong."""
    if len(frame) < 4 + TRAILER_SIZE or _PARAM.unpack_from(
        frame, len(frame) - TRAILER_SIZE
    ) != (ENRP_AUTHENTICATION, TRAILER_SIZE):
        return None
    unsigned = (
        frame[:2]
        + struct.pack("!H", len(frame) - TRAILER_SIZE)
        + frame[4 : len(frame) - TRAILER_SIZE]
    )
    if not hmac.compare_digest(frame[len(frame) - _MAC_SIZE :], _mac(secret, unsigned)):
        return None
    return unsigned
