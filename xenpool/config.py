"""Config files and command lines that say the same things (command line wins).

A config file is INI; each daemon reads its own section, whose keys are the long
option names (``keep-alive-interval = 5``). A key may repeat values on several lines
when the option can be given several times (``peer``).
"""

from __future__ import annotations

import configparser
import ipaddress
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


def json_log(path: str | None) -> None:
    """``--logfile``: also write the daemon's structured log there, as JSON lines."""
    if not path:
        return
    from .logs import log_json_to

    try:
        log_json_to(path)
    except ValueError as err:
        raise usage.UsageError(f"--logfile: {err}") from None


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
            raw = cli if cli else config.get(s.name, [])
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
