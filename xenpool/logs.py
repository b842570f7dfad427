"""Structured logs: every daemon can also write its events as JSON lines."""

from __future__ import annotations

from twisted.logger import globalLogPublisher, jsonFileLogObserver


def log_json_to(path: str) -> None:
    """Append every log event to ``path``, one JSON object per line (twisted.logger's
    format: ``eventsFromJSONLogFile`` reads it back)."""
    try:
        output = open(path, "a", encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot open {path}: {err.strerror}") from None
    globalLogPublisher.addObserver(jsonFileLogObserver(output))


# Log fields are plain values, formatted before logging: a JSON log observer flattens
# events and format specs such as {id:#010x} would be lost in the text log.
def hex_id(identifier: int) -> str:
    return f"{identifier:#010x}"


def pool_name(handle: bytes) -> str:
    return handle.decode("utf-8", "backslashreplace")
