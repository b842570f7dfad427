"""The one error every decoder in xenpool.protocol raises."""

from __future__ import annotations

import enum


class Cause(enum.IntEnum):
    """Operation Error causes (RFC 5354, Operation Error parameter)."""

    UNSPECIFIED = 0x0
    UNRECOGNIZED_PARAMETER = 0x1
    UNRECOGNIZED_MESSAGE = 0x2
    INVALID_VALUES = 0x3
    NON_UNIQUE_PE_IDENTIFIER = 0x4
    INCONSISTENT_POLICY = 0x5
    LACK_OF_RESOURCES = 0x6
    INCONSISTENT_TRANSPORT = 0x7
    INCONSISTENT_DATA_CONTROL = 0x8
    UNKNOWN_POOL_HANDLE = 0x9
    SECURITY_REJECTION = 0xA


class ProtocolError(ValueError):
    """Malformed or unacceptable input.

    ``field`` names what was wrong, ``offset`` is the byte offset in the input where it
    starts, ``cause`` is the RFC 5354 error cause a daemon puts in its ERROR answer, and
    ``report`` says whether the peer should get that answer at all (an unknown parameter
    whose type says "stop, do not report" is dropped silently). ``data`` is the
    offending parameter or message, for the cause-specific information. ``fatal`` means
    the stream lost its framing and the connection must be closed after answering.
    """

    def __init__(
        self,
        reason: str,
        *,
        field: str,
        offset: int,
        cause: Cause = Cause.INVALID_VALUES,
        report: bool = True,
        data: bytes = b"",
        fatal: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.offset = offset
        self.cause = cause
        self.report = report
        self.data = data
        self.fatal = fatal

    def __str__(self) -> str:
        return f"{self.field} at byte {self.offset}: {self.reason}"
