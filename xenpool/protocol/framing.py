"""Stream framing for byte streams (TCP), sans-IO.

* ASAP and ENRP over TCP: messages back to back, framed by their own length field.
* The PE <-> PU session over TCP: each frame is preceded by a shim header
  {PPID (32 bits), length (32 bits, payload only)}; the PPID stands in for SCTP's payload
  protocol identifier and says how to decode the payload (11 = ASAP, XENPOOL_PPID =
  application message).

Use like h11: ``feed(data)``, then call ``next_message()`` until it returns None. A
malformed frame raises ProtocolError once and the stream goes on with the next frame; a
length that cannot be trusted raises a *fatal* error at once (the connection must
close) and nothing more is buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from . import messages, session
from .errors import Cause, ProtocolError

T = TypeVar("T")
SHIM = struct.Struct("!II")


class _Framer(Generic[T]):
    header_size: int

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._broken: ProtocolError | None = None
        self._offset = 0  # stream offset of the buffer's first byte, for error messages

    def _frame_size(self, header: bytes) -> int:
        raise NotImplementedError

    def _decode(self, header: bytes, frame: bytes) -> T:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise self._broken
        self._buffer += data
        if len(self._buffer) >= self.header_size:
            self._frame_size(
                bytes(self._buffer[: self.header_size])
            )  # refuse a bad length now

    def next_frame(self) -> bytes | None:
        """The next whole frame's bytes, undecoded (None until one is complete)."""
        if self._broken:
            raise self._broken
        buf = self._buffer
        if len(buf) < self.header_size:
            return None
        size = self._frame_size(bytes(buf[: self.header_size]))
        if len(buf) < size:
            return None
        frame = bytes(buf[:size])
        del buf[:size]
        self._offset += size
        return frame

    def next_message(self) -> T | None:
        frame = self.next_frame()
        if frame is None:
            return None
        try:
            return self._decode(frame[: self.header_size], frame)
        except ProtocolError as err:
            err.offset += self._offset - len(frame)
            raise

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _fatal(self, reason: str, field: str, offset: int) -> ProtocolError:
        self._buffer.clear()
        self._broken = ProtocolError(
            reason, field=field, offset=self._offset + offset, fatal=True
        )
        return self._broken


class RSerPoolStream(_Framer[messages.Message]):
    """ASAP or ENRP messages on a TCP stream, framed by the message length field."""

    header_size = 4

    def __init__(
        self,
        ppid: int = messages.ASAP_PPID,
        max_message_size: int = messages.MAX_MESSAGE_SIZE,
    ) -> None:
        super().__init__(max_message_size)
        self.ppid = ppid
        self.reports: list[
            bytes
        ] = []  # unknown parameters to report ("skip and report")

    def _frame_size(self, header: bytes) -> int:
        length = (header[2] << 8) | header[3]
        if length < 4 or length > self.max_message_size:
            raise self._fatal(
                f"length {length} outside 4..{self.max_message_size}",
                "message_length",
                2,
            )
        return length

    def _decode(self, header: bytes, frame: bytes) -> messages.Message:
        return messages.decode(frame, self.ppid, self.reports)


class ShimStream(_Framer["tuple[int, object]"]):
    """PE <-> PU session frames: yields (ppid, message) with ASAP or application messages."""

    header_size = SHIM.size

    def __init__(self, max_message_size: int = messages.MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self.reports: list[bytes] = []
        self._decoders: dict[int, Callable[[bytes], object]] = {
            messages.ASAP_PPID: lambda b: messages.decode(
                b, messages.ASAP_PPID, self.reports
            ),
            session.XENPOOL_PPID: session.decode,
        }
        # The last application frame and its message: a PU's heartbeats are the same
        # bytes every time, and an application message is immutable and decoded without
        # side effects, so an equal frame is the same message (ASAP messages are not
        # cached: their decoding reports unknown parameters).
        self._last_frame = b""
        self._last_message: object = None

    def _frame_size(self, header: bytes) -> int:
        ppid, length = SHIM.unpack(header)
        limit = self.max_message_size
        if ppid == session.XENPOOL_PPID:
            limit = min(limit, session.MAX_SESSION_MESSAGE)
        if length > limit:
            raise self._fatal(f"payload length {length} over {limit}", "shim.length", 4)
        return SHIM.size + length

    def _decode(self, header: bytes, frame: bytes) -> tuple[int, object]:
        ppid, _length = SHIM.unpack(header)
        if ppid == session.XENPOOL_PPID:
            if frame == self._last_frame:
                return ppid, self._last_message
            message = self._decode_ppid(ppid, frame)
            self._last_frame, self._last_message = frame, message
            return ppid, message
        return ppid, self._decode_ppid(ppid, frame)

    def _decode_ppid(self, ppid: int, frame: bytes) -> object:
        decoder = self._decoders.get(ppid)
        if decoder is None:
            raise ProtocolError(
                f"unknown PPID {ppid}",
                field="shim.ppid",
                offset=0,
                cause=Cause.UNRECOGNIZED_MESSAGE,
                data=frame[: messages.MAX_ERROR_INFO],
            )
        try:
            return decoder(frame[SHIM.size :])
        except ProtocolError as err:
            err.offset += SHIM.size
            raise


def shim_frame(ppid: int, payload: bytes) -> bytes:
    return SHIM.pack(ppid, len(payload)) + payload


def frame_message(msg: object) -> bytes:
    """One shim frame for an ASAP message or an application message."""
    if isinstance(msg, messages.Message):
        return shim_frame(messages.ASAP_PPID, messages.encode(msg))
    # Anything else is an application message (session.encode refuses what is not).
    return shim_frame(
        session.XENPOOL_PPID, session.encode(cast(session.SessionMessage, msg))
    )
