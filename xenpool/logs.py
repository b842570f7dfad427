"""Structured logs: every daemon can also write its events as JSON lines."""

from __future__ import annotations

from twisted.logger import ILogObserver
from zope.interface import implementer


# Log fields are plain values, formatted before logging: a JSON log observer flattens
# events and format specs such as {id:#010x} would be lost in the text log.
def hex_id(identifier: int) -> str:
    return f"{identifier:#010x}"


def pool_name(handle: bytes) -> str:
    return handle.decode("utf-8", "backslashreplace")


LEVELS = ("debug", "info", "warn", "error", "critical")
#: The fields of a ``--log-format json`` line; absent ones are null.
JSON_FIELDS = ("time", "level", "daemon", "event", "vm", "host", "pe", "pool", "text")


def flat_event(event: dict, daemon: str) -> dict:
    """One log event as the flat, documented object of ``--log-format json``: ``time``
    (ISO 8601, UTC), ``level``, ``daemon``, ``event`` (the message's template, stable
    across events of one kind), ``vm``, ``host``, ``pe``, ``pool`` (null where the event
    has none) and ``text`` (the formatted message, with a failure's last line)."""
    import datetime

    from twisted.logger import formatEvent

    level = event.get("log_level")
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()}" if text else str(failure.value)
    when = event.get("log_time")
    return {
        "time": None
        if when is None
        else datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": level.name if level is not None else None,
        "daemon": daemon,
        "event": event.get("log_format")
        if event.get("log_format") not in (None, "{log_text}")
        else event.get("log_namespace"),
        "vm": _plain(event.get("server", event.get("vm"))),
        "host": _plain(event.get("host")),
        "pe": _plain(event.get("pe")),
        "pool": _plain(event.get("pool")),
        "text": text,
    }


def _plain(value):
    return (
        value if value is None or isinstance(value, (str, int, float)) else str(value)
    )


@implementer(ILogObserver)
class LogFile:
    """The daemon's ``--logfile``: twisted.logger JSON events (``twisted``, what
    ``eventsFromJSONLogFile`` reads) or flat objects (``json``), one a line, from
    ``level`` up. ``reopen()`` (SIGUSR1) opens the path again, after logrotate moved it."""

    def __init__(self, path: str, log_format: str, level: str, daemon: str) -> None:
        self.path, self.format, self.daemon = path, log_format, daemon
        self.output = self._open()
        self.minimum = level_named(level)

    def _open(self):
        try:
            return open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot open {self.path}: {err.strerror}") from None

    def reopen(self) -> None:
        try:
            output = self._open()
        except ValueError:
            return  # keep writing to the old file rather than losing the log
        old, self.output = self.output, output
        old.close()

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if level is not None and level < self.minimum:
            return
        if self.format == "json":
            import json

            line = json.dumps(flat_event(event, self.daemon), default=str)
        else:
            from twisted.logger import eventAsJSON

            line = eventAsJSON(event)
        self.output.write(line + "\n")
        self.output.flush()


def level_named(name: str):
    from twisted.logger import LogLevel

    return LogLevel.levelWithName(name)


def log_level(text: str) -> str:
    """``--log-level``: one of LEVELS."""
    if text not in LEVELS:
        raise ValueError(f"expected one of {', '.join(LEVELS)}, got {text!r}")
    return text


def log_format(text: str) -> str:
    """``--log-format``: ``twisted`` (twisted.logger's JSON events) or ``json`` (flat)."""
    if text not in ("twisted", "json"):
        raise ValueError(f"expected twisted or json, got {text!r}")
    return text


def filter_observers(publisher, level: str) -> None:
    """Drop events below ``level`` before every observer of ``publisher`` (twistd's
    console or log file among them); call once logging began."""
    from twisted.logger import FilteringLogObserver, LogLevelFilterPredicate

    predicate = LogLevelFilterPredicate(defaultLogLevel=level_named(level))
    for observer in list(publisher._observers):
        if isinstance(observer, LogFile):
            continue  # it has its own level
        publisher.removeObserver(observer)
        publisher.addObserver(FilteringLogObserver(observer, [predicate]))
