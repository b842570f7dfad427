"""Config files and command lines that say the same things (command line wins).

A config file is INI; each daemon reads its own section, whose keys are the long
option names (``keep-alive-interval = 5``). A key may repeat values on several lines
when the option can be given several times (``peer``).
"""

from __future__ import annotations

import argparse
import configparser
import ipaddress
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.python import usage


@dataclass(frozen=True)
class Setting:
    name: str  # long option name
    default: Any
    coerce: Callable[[str], Any] = str
    help: str = ""
    multiple: bool = False


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def yes_no(text: str) -> bool:
    """``yes``/``no`` (true/false, on/off, 1/0)."""
    if text.lower() in ("yes", "true", "on", "1"):
        return True
    if text.lower() in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def id32(text: str) -> int:
    value = int(text, 0)
    if not 0 < value <= 0xFFFFFFFF:
        raise ValueError(f"must be a 32-bit number other than 0, got {text}")
    return value


def ipv4_address(text: str) -> str:
    """An IPv4 address, e.g. the local address of a network interface."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"expected an IPv4 address, got {text!r}") from None


def secret_file(path: str) -> bytes:
    """A secret kept in a file (surrounding whitespace ignored); at least 16 bytes."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    if len(secret) < 16:
        raise ValueError(f"the secret in {path} is shorter than 16 bytes")
    return secret


ENDPOINT_KINDS = ("tcp:", "tcp6:", "ssl:", "tls:", "unix:", "sctp:")


def registrar_endpoint(text: str) -> str:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) or a Twisted client endpoint string -> an
    endpoint string: what ``--registrar`` and ``--voter`` take in every daemon and tool."""
    if text.startswith(ENDPOINT_KINDS):
        from twisted.internet import endpoints

        try:  # parsing needs no reactor; a bad string fails here, not at connect time
            endpoints.clientFromString(None, text)
        except Exception as err:
            raise ValueError(f"{text!r} is not a client endpoint: {err}") from None
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"expected HOST:PORT or an endpoint string (tcp:host=H:port=P), got {text!r}"
        )
    host = host.strip("[]")
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:host={host.replace(':', chr(92) + ':')}:port={port}"


def pool_secret(text: str) -> tuple[bytes, bytes]:
    """``POOL:FILE`` -> (pool handle, secret)."""
    pool, sep, path = text.partition(":")
    if not sep or not pool or not path:
        raise ValueError(f"expected POOL:FILE, got {text!r}")
    return pool.encode(), secret_file(path)


def read_ini(path: str, option: str) -> configparser.ConfigParser:
    """An INI file named by ``--option``; a missing or broken one is a UsageError naming it."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as err:
        raise usage.UsageError(
            f"--{option}: cannot read {path}: {err.strerror}"
        ) from None
    except configparser.Error as err:
        raise usage.UsageError(
            f"--{option}: {path} is not a valid config file: {err.message.splitlines()[0]}"
        ) from None
    return parser


def json_log(settings: dict[str, Any] | str | None, daemon: str = "xenpool") -> None:
    """``--logfile``: also write the daemon's structured log there, as JSON lines
    (``--log-format``, from ``--log-level`` up); ``settings`` is the daemon's settings
    (or just the path)."""
    if not isinstance(settings, dict):
        settings = {"logfile": settings}
    path = settings.get("logfile")
    if not path:
        return
    from twisted.logger import globalLogPublisher

    from .logs import LogFile

    try:
        observer = LogFile(
            path,
            settings.get("log-format", "twisted"),
            settings.get("log-level", "info"),
            daemon,
        )
    except ValueError as err:
        raise usage.UsageError(f"--logfile: {err}") from None
    globalLogPublisher.addObserver(observer)


def log_settings() -> list[Setting]:
    """``--log-level`` and ``--log-format``, beside each daemon's ``--logfile``."""
    from .logs import LEVELS, log_format, log_level

    return [
        Setting(
            "log-level",
            "info",
            log_level,
            f"log only events of this level or above: {', '.join(LEVELS)}",
        ),
        Setting(
            "log-format",
            "twisted",
            log_format,
            "of --logfile: twisted (twisted.logger JSON events) or json (flat: time, level, daemon, "
            "event, vm, host, pe, pool, text)",
        ),
    ]


def read_section(
    path: str, section: str, settings: list[Setting]
) -> dict[str, list[str]]:
    parser = read_ini(path, "config")
    if not parser.has_section(section):
        return {}
    known = {s.name for s in settings}
    values = {}
    for key, raw in parser.items(section):
        if key not in known:
            raise usage.UsageError(
                f"--config: unknown key {key!r} in [{section}] of {path}; known: {', '.join(sorted(known))}"
            )
        values[key] = [line.strip() for line in raw.splitlines() if line.strip()]
    return values


def resolve(
    settings: list[Setting], given: dict[str, Any], config: dict[str, list[str]]
) -> dict[str, Any]:
    """Each setting from the command line, else the config file, else its default;
    every value checked, with an error naming the option."""
    result = {}
    for s in settings:
        cli = given.get(s.name)
        raw: Any
        if s.multiple:
            raw = cli or config.get(s.name) or list(s.default or [])
        elif cli is not None:
            raw = cli
        elif s.name in config:
            raw = config[s.name][-1]
        else:
            result[s.name] = s.default
            continue
        try:
            result[s.name] = [s.coerce(v) for v in raw] if s.multiple else s.coerce(raw)
        except ValueError as err:
            raise usage.UsageError(f"--{s.name}: {err}") from None
    return result


def _default(setting: Setting) -> str:
    if setting.default in (None, {}, []) or "default:" in setting.help:
        return ""
    shown = (
        ", ".join(setting.default)
        if isinstance(setting.default, list)
        else setting.default
    )
    return f" (default: {shown})"


def _described(setting: Setting) -> str:
    return setting.help + _default(setting)


class SettingsOptions(usage.Options):
    """What the classes ``make_options`` makes have (for the type checker)."""

    optParameters: list[list]
    multi: dict[str, list[str]]
    settings: dict[str, Any]  # after postOptions: every setting resolved


def make_options(
    settings: list[Setting], section: str, doc: str
) -> type[SettingsOptions]:
    """A twisted usage.Options class for ``settings`` plus ``--config``."""

    class Options(SettingsOptions):
        __doc__ = doc

        def parseOptions(self, options=None) -> None:
            try:
                super().parseOptions(options)
            except usage.UsageError as err:
                parent = getattr(self, "parent", None)
                if parent is None:  # not run by twistd: the caller handles it
                    raise
                # twistd would print the whole help before the error: one line instead
                fail(parent.subCommand or section, str(err), 2, sys.stderr)

        optParameters = [
            ["config", "c", None, f"config file (its [{section}] section)"]
        ] + [[s.name, None, None, _described(s)] for s in settings if not s.multiple]

        def __init__(self) -> None:
            super().__init__()
            self.multi: dict[str, list[str]] = {
                s.name: [] for s in settings if s.multiple
            }

        def postOptions(self) -> None:
            config = (
                read_section(self["config"], section, settings)
                if self["config"]
                else {}
            )
            given = {
                s.name: self[s.name] for s in settings if not s.multiple
            } | self.multi
            self.settings = resolve(settings, given, config)

    def repeated(setting: Setting):
        def opt(self, value):
            self.multi[setting.name].append(value)

        opt.__doc__ = f"{setting.help} (may be repeated){_default(setting)}"
        return opt

    for s in settings:
        if s.multiple:
            setattr(Options, f"opt_{s.name.replace('-', '_')}", repeated(s))
    return Options


class OneLineParser(argparse.ArgumentParser):
    """argparse for the command-line tools: a bad option is one line naming it (argparse
    would print the whole usage first), exit status 2; ``-h`` still shows the help."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message}\n")


def fail(daemon: str, message: str, status: int = 1, stream=None) -> None:
    """End a daemon that cannot start with one line naming the problem, no traceback."""
    stream = stream or sys.__stderr__ or sys.stderr
    stream.write(f"{daemon}: {' '.join(str(message).split())}\n")
    stream.flush()
    raise SystemExit(status)


def writable_dir(option: str, path: str, what: str) -> None:
    """Create ``path`` if needed and check that this process can write there; a
    UsageError naming ``--option`` otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise usage.UsageError(f"--{option} {path}: {err.strerror}") from None
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise usage.UsageError(f"--{option} {path}: not writable ({what})")


def daemon_service(daemon: str, make: Callable[[], Any], options: Any = None) -> Any:
    """``make()`` the daemon's service as twistd does, and wrap it so that a usage error
    while making it, a port that cannot be bound or a directory that cannot be written
    at start-up ends the daemon with one line and a non-zero status (twistd would log a
    traceback, or print its whole help)."""
    from twisted.application import service
    from twisted.internet.error import CannotListenError

    expected = (usage.UsageError, CannotListenError, OSError, ValueError)
    try:
        inner = make()
    except usage.UsageError as err:
        fail(daemon, str(err), 2)

    def one_line(err: BaseException) -> str:
        if isinstance(err, CannotListenError):
            why = getattr(err.socketError, "strerror", None) or err.socketError
            return f"cannot listen on {err.interface or 'any'}:{err.port}: {why}"
        if isinstance(err, OSError) and err.strerror:
            return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
        return str(err)

    class Guard(service.MultiService):
        def privilegedStartService(self) -> None:
            try:
                super().privilegedStartService()
            except expected as err:
                fail(daemon, one_line(err))

        def startService(self) -> None:
            quiet_logs(getattr(options, "settings", {}))
            try:
                super().startService()
            except expected as err:
                fail(daemon, one_line(err))

    from twisted.internet.protocol import Factory

    # no "Starting factory <...>" per connection (every client endpoint makes one)
    Factory.noisy = False
    guard = Guard()
    inner.setServiceParent(guard)
    return guard


def quiet_logs(settings: dict[str, Any]) -> None:
    """Once twistd began logging: ``--log-level`` for every observer, and SIGUSR1 reopens
    the ``--logfile`` (twistd's own handler, rotating its log file, still runs)."""
    import signal

    from twisted.logger import globalLogPublisher

    from .logs import LogFile, filter_observers

    filter_observers(globalLogPublisher, settings.get("log-level", "info"))
    files = [o for o in globalLogPublisher._observers if isinstance(o, LogFile)]
    if not files:
        return
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorThreads

    previous = signal.getsignal(signal.SIGUSR1)

    def reopen(signum, frame) -> None:
        for log_file in files:
            IReactorThreads(reactor).callFromThread(log_file.reopen)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGUSR1, reopen)
