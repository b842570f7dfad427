"""STONITH: make sure a host is off before its VMs are started elsewhere.

Four ``IStonith`` providers, registered by the built-in plugin under their names:

``fence-agent``
    Any ClusterLabs fence agent (``fence_ipmilan``, ``fence_virsh``, ``fence_dummy``, ...,
    Debian package ``fence-agents``) through its stdin ``key=value`` interface
    (fence-agents' doc/FenceAgentAPI.md): the agent is run with ``action=off``, then with
    ``action=status`` to confirm. Per that API ``status`` exits 0 for on, 2 for off and 1
    (or anything else) when it could not tell; only 2 counts. Options: ``agent`` (a path
    or a name looked up on $PATH, then in /usr/sbin and /sbin), ``timeout`` (seconds per
    agent run, default 60), and any agent options (``ip``, ``username``, ``password``,
    ``plug``, ``ssh``, ``identity_file``, ...), which the target's options override
    (they may name another ``agent`` too). ``nodename=HOST`` is sent as fenced sends it.

``libvirt``
    Destroys the host's guests through its libvirt: ``uri`` (default
    ``qemu+ssh://{host}/system``, ``{host}`` replaced; a target option ``uri`` wins).
    The target option ``domain`` (comma-separated) names the domains; without it every
    active domain but Xen's Domain-0 is destroyed. Then it checks that none is active.
    It only works while the old host's libvirtd answers: a host that is really dead is
    unreachable, and that is a failure (unknown is not off). Pair it with a power fence.

``command``
    Runs an operator's command, no shell: ``command`` (an argv list, or a string split
    like a shell would, without running one), ``{host}`` and ``{OPTION}`` (any target
    option) replaced in each argument, ``{{``/``}}`` for literal braces; ``timeout``.
    Exit 0 means "fenced and confirmed"; anything else fails with its stderr's last line.

``watchdog``
    Self-fencing for hosts without a fence device (like Pacemaker's SBD or Proxmox's
    watchdog). Every PE configured with it feeds a Linux watchdog (``device``, default
    ``/dev/watchdog``) while a registrar confirms its registrations, and stops feeding
    ``lost-after`` seconds after the last registration a registrar answered was sent;
    the device then resets the host within ``timeout`` seconds. A fence succeeds only
    for a host whose PE no registrar has (``target.pe_identifier``, from the cookie),
    after waiting ``lost-after + 2 * timeout + margin`` seconds during which it must
    stay unregistered. Options: ``device``, ``lost-after`` (default 20), ``timeout``
    (default 60, softdog's default; set on the device), ``margin`` (default 5); the
    same values on every host. See ``WatchdogStonith``.

``manual``
    Refuses until an operator confirms the host is off (``confirm(state_dir, host)``,
    behind ``xenpool fence-confirm HOST``); then succeeds once and removes the
    confirmation. A confirmation older than ``max_age`` seconds (default 3600) is stale:
    refused and removed, so one left lying around cannot vouch for a later failure.

Every ``fence(target)`` returns a Deferred that fires None only once the target is
confirmed off, and otherwise fails with ``FenceFailed(reason)``: a timeout, a crash, an
unexpected answer are all failures, never a success. Success is logged as
``fenced HOST: off confirmed (...)``, failure as ``FENCING HOST FAILED: ...``. Values of
secret-looking options (``password``, ``passwd``, ``*secret*``, ``community``, ...) are
never logged nor put into a reason: they are masked wherever they appear, agent output
included.

Processes are started with ``reactor.spawnProcess`` (``run_process``); on timeout they get
SIGKILL and the fence fails once they are reaped (or ``kill_grace`` seconds later).
libvirt calls run in a thread pool (the reactor's unless one is given).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import stat
import string
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenpool.interfaces import FenceTarget, IOperatorConfirmed, ISelfFencing, IStonith
from xenpool.plugins import global_reactor

log = Logger()

#: Where fence agents live on Debian and elsewhere, searched after $PATH.
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
#: Option names whose values are secrets (matched anywhere in the name, any case).
SECRET_KEY = re.compile(
    r"pass|secret|token|community|credential|private", re.IGNORECASE
)
#: What a fence agent option name may look like on its stdin.
AGENT_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: Options xenpool sets itself; never taken from configuration.
RESERVED_AGENT_KEYS = frozenset({"action", "option"})
#: What a host name must look like to become a file name (manual confirmations).
HOST_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
#: Bytes kept of each of a process's stdout and stderr (the end is what matters).
OUTPUT_LIMIT = 64 * 1024
MASK = "***"


class FenceFailed(Exception):
    """A fence that did not end with the target confirmed off; ``reason`` says why."""

    def __init__(self, reason: str, host: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.host = host

    def __str__(self) -> str:
        return self.reason


# -- helpers ---------------------------------------------------------------------------------


def secret_values(options: Mapping[str, object]) -> list[str]:
    """The values of the secret-looking options, longest first (for masking)."""
    values = {str(v) for k, v in options.items() if SECRET_KEY.search(k) and str(v)}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def describe_options(options: Mapping[str, str]) -> str:
    """``key=value, ...`` for logs, secret values masked."""
    return ", ".join(
        f"{k}={MASK if SECRET_KEY.search(k) else v}" for k, v in options.items()
    )


def find_executable(name: str) -> str | None:
    """A path (must exist and be executable) or a name looked up on $PATH, then in the
    sbin directories where fence agents live."""
    if os.sep in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += [d for d in SBIN_DIRS if d not in dirs]
    return shutil.which(name, path=os.pathsep.join(dirs))


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def last_line(text: str) -> str:
    lines = _lines(text)
    return lines[-1] if lines else ""


def agent_error_line(stderr: str) -> str:
    """The line of a fence agent's stderr that says what went wrong: fencing.py logs
    ``ERROR: Failed: ...`` and may add "Please use '-h' for usage" after it."""
    lines = [line for line in _lines(stderr) if "please use '-h'" not in line.lower()]
    for line in reversed(lines):
        if re.search(r"error|fail", line, re.IGNORECASE):
            return line
    return lines[-1] if lines else ""


def _option_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _positive(name: str, value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not number > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def _fenced(host: str, work: Any, secrets: Iterable[str] = ()) -> defer.Deferred:
    """Run ``work`` (a coroutine returning how the host was found off) and turn its
    outcome into the IStonith contract: None after a loud success line, or FenceFailed
    after a loud failure line. Anything unexpected is a failure too."""
    secrets = list(secrets)
    d = defer.ensureDeferred(work)

    def confirmed(how: str) -> None:
        log.warn("fenced {host}: off confirmed ({how})", host=host, how=how)
        return None

    def failed(failure: Failure) -> Failure:
        if failure.check(FenceFailed):
            error = failure.value
        elif failure.check(defer.CancelledError):
            error = FenceFailed(f"fencing {host} was cancelled", host)
        else:
            log.failure("unexpected error while fencing {host}", failure, host=host)
            error = FenceFailed(
                f"unexpected error while fencing {host}: {redact(failure.getErrorMessage(), secrets)}",
                host,
            )
        if error.host is None:
            error.host = host
        log.error("FENCING {host} FAILED: {reason}", host=host, reason=error.reason)
        return Failure(error)

    d.addCallbacks(confirmed, failed)
    return d


# -- running a process -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessResult:
    """How a process ended: ``exit_code`` (None if killed by ``signal``) and the last
    ``OUTPUT_LIMIT`` bytes of its stdout and stderr."""

    exit_code: int | None
    signal: int | None
    out: bytes
    err: bytes


class ProcessTimeout(Exception):
    def __init__(self, timeout: float, reaped: bool) -> None:
        super().__init__(f"no answer within {timeout:g}s")
        self.timeout = timeout
        self.reaped = reaped


class ProcessNotStarted(Exception):
    pass


class _Collect(ProcessProtocol):
    transport: IProcessTransport  # set before any callback (spawnProcess)

    def __init__(self, stdin: bytes, ended: defer.Deferred) -> None:
        self.stdin = stdin
        self.ended = ended
        self.out = b""
        self.err = b""

    def connectionMade(self) -> None:
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out = (self.out + data)[-OUTPUT_LIMIT:]

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-OUTPUT_LIMIT:]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.ended.callback(
            ProcessResult(
                getattr(value, "exitCode", None),
                getattr(value, "signal", None),
                self.out,
                self.err,
            )
        )


def run_process(
    reactor: Any,
    argv: list[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    timeout: float,
    kill_grace: float = 5.0,
) -> defer.Deferred:
    """Run ``argv`` (no shell; ``argv[0]`` a path), feed it ``stdin`` and close it.

    Fires a ProcessResult once the process has ended and its pipes are closed. After
    ``timeout`` seconds it is sent SIGKILL and the Deferred fails with ProcessTimeout once
    it is reaped (``reaped=True``) or ``kill_grace`` seconds later (``reaped=False``).
    Cancelling the Deferred kills the process too. Fails with ProcessNotStarted if the
    process cannot be spawned.
    """
    transport: Any = None
    timers: list[Any] = []

    def kill() -> None:
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        except OSError as err:  # pragma: no cover - not ours to kill any more
            log.warn("cannot kill {argv0}: {err}", argv0=argv[0], err=err)

    def cancel(_d: defer.Deferred) -> None:
        for timer in timers:
            if timer.active():
                timer.cancel()
        if transport is not None:
            kill()

    result: defer.Deferred = defer.Deferred(cancel)
    ended: defer.Deferred = defer.Deferred()
    try:
        transport = reactor.spawnProcess(
            _Collect(stdin, ended), argv[0], list(argv), env=dict(env or {})
        )
    except (OSError, ValueError) as err:
        return defer.fail(ProcessNotStarted(f"cannot run {argv[0]}: {err}"))

    def give_up() -> None:
        if not result.called:
            result.errback(ProcessTimeout(timeout, reaped=False))

    def timed_out() -> None:
        kill()
        timers.append(reactor.callLater(kill_grace, give_up))

    timers.append(reactor.callLater(timeout, timed_out))

    def on_end(process: ProcessResult) -> None:
        timer = timers[0]
        if timer.active():  # ended in time
            timer.cancel()
            if not result.called:
                result.callback(process)
            return
        for late in timers[1:]:
            if late.active():
                late.cancel()
        if not result.called:
            result.errback(ProcessTimeout(timeout, reaped=True))

    ended.addCallback(on_end)
    return result


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LANG="C", LC_ALL="C")
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


# -- fence-agent -------------------------------------------------------------------------------


def _agent_options(options: Mapping[str, object], where: str) -> dict[str, str]:
    """Checked ``key=value`` options for an agent's stdin (``action`` is xenpool's)."""
    result = {}
    for key, value in options.items():
        if not AGENT_KEY.match(key):
            raise ValueError(f"{where}: bad fence agent option name {key!r}")
        if key in RESERVED_AGENT_KEYS:
            raise ValueError(
                f"{where}: option {key!r} is set by xenpool (off, then status), not configurable"
            )
        text = _option_value(value)
        if any(c in text for c in "\r\n\0"):
            raise ValueError(
                f"{where}: the value of option {key!r} has a line break or NUL"
            )
        result[key] = text
    return result


@implementer(IStonith)
class FenceAgentStonith:
    """``fence-agent``: a ClusterLabs fence agent, ``action=off`` then ``action=status``.

    ``agent``: the agent (path or name); ``timeout``: seconds per agent run; ``env``:
    extra environment variables; ``reactor``: the reactor (default the global one);
    every other option goes to the agent on its stdin, under the target's options.
    """

    name = "fence-agent"

    #: fence-agents' status exit codes (doc/FenceAgentAPI.md).
    STATUS_ON = 0
    STATUS_OFF = 2

    def __init__(
        self,
        agent: str,
        timeout: float = 60.0,
        *,
        env: Mapping[str, str] | None = None,
        reactor: Any = None,
        kill_grace: float = 5.0,
        **options: object,
    ) -> None:
        if not agent or not str(agent).strip():
            raise ValueError("agent must name a fence agent, e.g. agent=fence_ipmilan")
        self.agent = str(agent).strip()
        self.timeout = _positive("timeout", timeout)
        self.kill_grace = _positive("kill_grace", kill_grace)
        self.env = dict(env or {})
        self.options = _agent_options(options, "fence-agent")
        self._reactor = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    def fence(self, target: FenceTarget) -> defer.Deferred:
        merged: dict[str, object] = dict(self.options)
        merged.update(target.options)
        return _fenced(
            target.host, self._fence(target.host, merged), secret_values(merged)
        )

    async def _fence(self, host: str, merged: dict[str, object]) -> str:
        secrets = secret_values(merged)
        agent = str(merged.pop("agent", self.agent)).strip()
        try:
            options = _agent_options(merged, f"fence options of {host}")
        except ValueError as err:
            raise FenceFailed(redact(str(err), secrets)) from None
        options.setdefault("nodename", host)
        path = find_executable(agent)
        if path is None:
            raise FenceFailed(
                f"fence agent {agent!r} not found (searched $PATH and {', '.join(SBIN_DIRS)})"
            )
        agent = os.path.basename(agent)  # what it is called in logs and reasons
        log.warn(
            "fencing {host}: {agent} action=off ({options})",
            host=host,
            agent=agent,
            options=describe_options(options),
        )
        off = await self._run(path, agent, host, options, "off", secrets)
        if off.exit_code != 0:
            raise FenceFailed(self._failure(agent, host, "off", off, secrets))
        said = redact(last_line(_text(off.out)), secrets) or "exit 0"
        log.warn(
            "fencing {host}: {agent} off done ({said}); checking its status",
            host=host,
            agent=agent,
            said=said,
        )
        status = await self._run(path, agent, host, options, "status", secrets)
        if status.exit_code == self.STATUS_OFF:
            return f"{agent} status: off"
        if status.exit_code == self.STATUS_ON:
            raise FenceFailed(
                f"{agent} reports {host} still ON after action=off succeeded"
            )
        raise FenceFailed(
            self._failure(
                agent, host, "status", status, secrets, "cannot confirm it is off"
            )
        )

    async def _run(
        self,
        path: str,
        agent: str,
        host: str,
        options: dict[str, str],
        action: str,
        secrets: list[str],
    ) -> ProcessResult:
        lines = [f"{k}={v}" for k, v in options.items()]
        lines.append(
            f"action={action}"
        )  # last: an agent takes the last of repeated options
        stdin = ("\n".join(lines) + "\n").encode("utf-8")
        try:
            return await run_process(
                self.reactor,
                [path],
                stdin=stdin,
                env=_child_env(self.env),
                timeout=self.timeout,
                kill_grace=self.kill_grace,
            )
        except ProcessTimeout as err:
            killed = "killed" if err.reaped else "killed, but not yet gone"
            raise FenceFailed(
                f"{agent} action={action} for {host} timed out after {err.timeout:g}s ({killed})"
            ) from None
        except ProcessNotStarted as err:
            raise FenceFailed(redact(str(err), secrets)) from None

    def _failure(
        self,
        agent: str,
        host: str,
        action: str,
        result: ProcessResult,
        secrets: list[str],
        what: str = "",
    ) -> str:
        stderr = redact(_text(result.err), secrets)
        stdout = redact(_text(result.out), secrets)
        tail = _lines(stderr)[-10:]
        if tail:
            log.error(
                "{agent} action={action} for {host} said:\n{stderr}",
                agent=agent,
                action=action,
                host=host,
                stderr="\n".join(tail),
            )
        how = (
            f"exit {result.exit_code}"
            if result.exit_code is not None
            else f"killed by signal {result.signal}"
        )
        detail = agent_error_line(stderr) or last_line(stdout) or "no output"
        prefix = f"{what}: " if what else ""
        return f"{prefix}{agent} action={action} for {host} failed ({how}): {detail}"


# -- command -----------------------------------------------------------------------------------

_FORMATTER = string.Formatter()


def _parse_template(arg: str) -> list[tuple[str, str | None]]:
    """``[(literal, field or None), ...]`` of one argument; fields are plain names."""
    parts = []
    try:
        parsed = list(_FORMATTER.parse(arg))
    except ValueError as err:
        raise ValueError(
            f"command argument {arg!r}: {err} (write {{{{ and }}}} for literal braces)"
        ) from None
    for literal, field, spec, conversion in parsed:
        if field == "":
            raise ValueError(f"command argument {arg!r}: empty placeholder {{}}")
        if field is not None and (not field.isidentifier() or spec or conversion):
            raise ValueError(
                f"command argument {arg!r}: placeholders are plain names like {{host}}, got {{{field}}}"
            )
        parts.append((literal, field))
    return parts


@implementer(IStonith)
class CommandStonith:
    """``command``: an operator's command; exit 0 means the host is fenced (confirmed).

    ``command``: argv list or a string (split like a shell would, never run by one);
    ``{host}`` and ``{OPTION}`` (target options) are replaced in each argument.
    ``timeout``, ``env``, ``reactor`` as for ``fence-agent``.
    """

    name = "command"

    def __init__(
        self,
        command: str | list[str] | tuple[str, ...],
        timeout: float = 60.0,
        *,
        env: Mapping[str, str] | None = None,
        reactor: Any = None,
        kill_grace: float = 5.0,
    ) -> None:
        argv = (
            shlex.split(command)
            if isinstance(command, str)
            else [str(a) for a in command]
        )
        if not argv or not argv[0]:
            raise ValueError("command is empty")
        self.argv = argv
        self.templates = [_parse_template(arg) for arg in argv]
        self.timeout = _positive("timeout", timeout)
        self.kill_grace = _positive("kill_grace", kill_grace)
        self.env = dict(env or {})
        self._reactor = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    def command_for(self, target: FenceTarget) -> list[str]:
        """The argv for ``target``; raises FenceFailed for a placeholder it has no value for."""
        values = {**target.options, "host": target.host}
        argv = []
        for parts in self.templates:
            pieces = []
            for literal, field in parts:
                pieces.append(literal)
                if field is not None:
                    if field not in values:
                        raise FenceFailed(
                            f"fence command uses {{{field}}} but the options of {target.host} have no {field!r}"
                        )
                    pieces.append(str(values[field]))
            argv.append("".join(pieces))
        return argv

    def fence(self, target: FenceTarget) -> defer.Deferred:
        secrets = secret_values(target.options)
        return _fenced(target.host, self._fence(target), secrets)

    async def _fence(self, target: FenceTarget) -> str:
        host = target.host
        secrets = secret_values(target.options)
        argv = self.command_for(target)
        name = argv[0]
        path = find_executable(name)
        if path is None:
            raise FenceFailed(f"fence command {name!r} not found")
        log.warn(
            "fencing {host}: running {command}",
            host=host,
            command=redact(shlex.join(argv), secrets),
        )
        try:
            result = await run_process(
                self.reactor,
                [path, *argv[1:]],
                env=_child_env(self.env),
                timeout=self.timeout,
                kill_grace=self.kill_grace,
            )
        except ProcessTimeout as err:
            raise FenceFailed(
                f"fence command {name} for {host} timed out after {err.timeout:g}s (killed)"
            ) from None
        except ProcessNotStarted as err:
            raise FenceFailed(redact(str(err), secrets)) from None
        if result.exit_code == 0:
            return f"{name} exited 0"
        how = (
            f"exit {result.exit_code}"
            if result.exit_code is not None
            else f"killed by signal {result.signal}"
        )
        detail = redact(last_line(_text(result.err)), secrets) or "no error output"
        raise FenceFailed(f"fence command {name} for {host} failed ({how}): {detail}")


# -- libvirt -------------------------------------------------------------------------------------


def _libvirt_fence(uri: str, domains: list[str]) -> list[str]:
    """Blocking (a pool thread): destroy ``domains`` (all active guests if empty) on
    ``uri`` and confirm none of them is active. Returns the names destroyed; raises
    FenceFailed."""
    import libvirt

    from .hypervisor_libvirt import ensure_event_loop

    def reason(err: libvirt.libvirtError) -> str:
        return err.get_error_message() or str(err)

    ensure_event_loop()  # keepalives on remote connections; silences libvirt's stderr
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise FenceFailed(f"cannot connect to {uri}: {reason(err)}") from None
    try:

        def lookup(name: str) -> Any:
            try:
                return conn.lookupByName(name)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise FenceFailed(
                    f"looking up domain {name!r} on {uri}: {reason(err)}"
                ) from None

        def active_guests() -> list[str]:
            try:
                doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                return [d.name() for d in doms if d.ID() != 0]  # 0: Xen's Domain-0
            except libvirt.libvirtError as err:
                raise FenceFailed(
                    f"listing the domains on {uri}: {reason(err)}"
                ) from None

        names = list(domains) or active_guests()
        destroyed = []
        for name in names:
            dom = lookup(name)
            if dom is None:
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                    destroyed.append(name)
            except libvirt.libvirtError as err:
                log.warn(
                    "destroying {name} on {uri}: {reason}",
                    name=name,
                    uri=uri,
                    reason=reason(err),
                )
        # Confirm with fresh look-ups: each named domain, or all guests, must be inactive.
        still = []
        for name in names:
            dom = lookup(name)
            try:
                if dom is not None and dom.isActive():
                    still.append(name)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise FenceFailed(
                        f"cannot confirm {name!r} is off on {uri}: {reason(err)}"
                    ) from None
        if not domains:
            still += [n for n in active_guests() if n not in still]
        if still:
            raise FenceFailed(
                f"still active on {uri} after destroy: {', '.join(sorted(still))}"
            )
        return destroyed
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


@implementer(IStonith)
class LibvirtStonith:
    """``libvirt``: destroy the host's guests through its libvirt URI and confirm.

    ``uri``: template, ``{host}`` replaced (default ``qemu+ssh://{host}/system``);
    ``timeout``: seconds for the whole job; ``threadpool`` and ``reactor`` (default the
    reactor's own pool and the global reactor). Target options: ``uri`` (overrides),
    ``domain`` (comma-separated names; default all active guests).
    """

    name = "libvirt"

    def __init__(
        self,
        uri: str = "qemu+ssh://{host}/system",
        timeout: float = 60.0,
        *,
        threadpool: Any = None,
        reactor: Any = None,
    ) -> None:
        import libvirt  # noqa: F401 - fail here, at configuration time, without libvirt-python

        if not uri:
            raise ValueError("uri must be a libvirt URI, e.g. qemu+ssh://{host}/system")
        self.uri = uri
        self.timeout = _positive("timeout", timeout)
        self._threadpool = threadpool
        self._reactor = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    def uri_for(self, target: FenceTarget) -> str:
        return (target.options.get("uri") or self.uri).replace("{host}", target.host)

    def fence(self, target: FenceTarget) -> defer.Deferred:
        return _fenced(target.host, self._fence(target))

    async def _fence(self, target: FenceTarget) -> str:
        uri = self.uri_for(target)
        domains = [
            d.strip() for d in target.options.get("domain", "").split(",") if d.strip()
        ]
        which = ", ".join(domains) if domains else "all active guests"
        log.warn(
            "fencing {host}: destroying {which} through {uri}",
            host=target.host,
            which=which,
            uri=uri,
        )
        pool = (
            self._threadpool
            if self._threadpool is not None
            else self.reactor.getThreadPool()
        )
        d = deferToThreadPool(self.reactor, pool, _libvirt_fence, uri, domains)
        d.addTimeout(self.timeout, self.reactor)
        try:
            destroyed = await d
        except defer.TimeoutError:
            raise FenceFailed(
                f"no answer from {uri} within {self.timeout:g}s"
            ) from None
        done = (
            f"destroyed {', '.join(destroyed)}" if destroyed else "nothing was running"
        )
        checked = f"{which} not active" if domains else "no guest active"
        return f"libvirt {uri}: {done}; {checked}"


# -- manual --------------------------------------------------------------------------------------


def confirmation_path(state_dir: str | os.PathLike[str], host: str) -> Path:
    """The file whose existence says an operator confirmed ``host`` is off."""
    if not HOST_NAME.match(host):
        raise ValueError(f"bad host name {host!r}")
    return Path(state_dir) / f"{host}.fence-confirmed"


def confirm(state_dir: str | os.PathLike[str], host: str) -> Path:
    """Record that an operator confirmed ``host`` is off (``xenpool fence-confirm HOST``):
    the next ``manual`` fence of ``host`` succeeds (once). Returns the file written."""
    path = confirmation_path(state_dir, host)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp.write_text(
        f"{host} confirmed off by an operator at {stamp}\n", encoding="utf-8"
    )
    os.replace(tmp, path)
    return path


@implementer(IOperatorConfirmed)
class ManualStonith:
    """``manual``: refuse until an operator confirmed the host is off (``confirm``).

    ``state_dir``: where confirmations are; ``max_age``: seconds a confirmation stays
    valid (default 3600; 0 or less: forever).
    """

    name = "manual"

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        max_age: float = 3600.0,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not str(state_dir):
            raise ValueError("state_dir must be a directory")
        self.state_dir = Path(state_dir)
        self.max_age = float(max_age)
        self._now = now

    def confirm(self, host: str) -> Path:
        """``confirm(state_dir, host)`` in this plugin's ``state_dir``."""
        return confirm(self.state_dir, host)

    def fence(self, target: FenceTarget) -> defer.Deferred:
        return _fenced(target.host, self._fence(target.host))

    async def _fence(self, host: str) -> str:
        waiting = f"waiting for an operator to confirm {host} is off: run `xenpool fence-confirm {host}`"
        try:
            path = confirmation_path(self.state_dir, host)
        except ValueError as err:
            raise FenceFailed(f"cannot fence {host!r} manually: {err}") from None
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            raise FenceFailed(waiting) from None
        except OSError as err:
            raise FenceFailed(
                f"cannot read the confirmation {path}: {err.strerror}"
            ) from None
        age = self._now() - mtime
        stale = self.max_age > 0 and age > self.max_age
        try:
            path.unlink()
        except FileNotFoundError:  # another fence took it meanwhile
            raise FenceFailed(waiting) from None
        except OSError as err:
            raise FenceFailed(
                f"cannot remove the confirmation {path}: {err.strerror}"
            ) from None
        if stale:
            raise FenceFailed(
                f"the confirmation is stale ({age:.0f}s old, max_age {self.max_age:g}s); {waiting}"
            )
        return f"confirmed by an operator {max(age, 0):.0f}s ago"


# -- watchdog ------------------------------------------------------------------------------------

#: linux/watchdog.h: _IOWR('W', 6, int) and _IOR('W', 7, int).
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
#: What a feed writes: any byte but "V" (which, written just before close, disarms).
FEED_BYTE = b"."
MAGIC_CLOSE = b"V"


def _number(name: str, value: object, *, zero: bool = False) -> float:
    """``value`` as a number > 0 (>= 0 with ``zero``); ValueError naming ``name``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not (number >= 0 if zero else number > 0) or number == float("inf"):
        raise ValueError(
            f"{name} must be a number {'>= 0' if zero else '> 0'} of seconds, got {value!r}"
        )
    return number


def _open_device(path: str) -> int:
    # Non-blocking: a FIFO without a reader fails at once (ENXIO) instead of hanging.
    return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)


class WatchdogDevice:
    """A Linux watchdog device (``/dev/watchdog``), or in tests any file or FIFO.

    ``open()`` opens it, which arms a real watchdog (a still-armed one, left by a PE
    process that died, stays armed and is not fed by the open). A character device gets
    ``timeout`` through WDIOC_SETTIMEOUT and is read back with WDIOC_GETTIMEOUT: a device
    that ends up with a longer timeout than configured is refused (ValueError), because the
    other hosts' fences wait for the configured one; a refused device is closed without the
    magic character, so it stays armed. ``open_fd`` is the seam tests replace."""

    def __init__(
        self, path: str, timeout: float, open_fd: Callable[[str], int] = _open_device
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._open_fd = open_fd
        self.fd: int | None = None
        self.device_timeout: int | None = None  # what a character device reported

    def open(self) -> None:
        try:
            fd = self._open_fd(self.path)
        except OSError as err:
            raise OSError(
                err.errno,
                f"device: cannot open the watchdog {self.path}: {err.strerror}",
            ) from None
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                self.device_timeout = self._set_timeout(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _set_timeout(self, fd: int) -> int:
        import fcntl

        try:
            fcntl.ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", math.ceil(self.timeout)))
        except OSError as err:
            log.warn(
                "watchdog {path}: cannot set its timeout ({err}); checking the one it has",
                path=self.path,
                err=err.strerror,
            )
        try:
            (actual,) = struct.unpack(
                "i", fcntl.ioctl(fd, WDIOC_GETTIMEOUT, struct.pack("i", 0))
            )
        except OSError as err:
            raise ValueError(
                f"timeout: cannot read the timeout of the watchdog {self.path}: {err.strerror}"
            ) from None
        if actual > self.timeout:
            raise ValueError(
                f"timeout: the watchdog {self.path} runs with {actual} s, more than timeout={self.timeout:g}; "
                "configure a timeout it supports (the same on every host)"
            )
        return actual

    def feed(self) -> None:
        if self.fd is None:
            raise OSError(f"the watchdog {self.path} is not open")
        os.write(self.fd, FEED_BYTE)

    def close(self, disarm: bool) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if disarm:
                os.write(fd, MAGIC_CLOSE)
        finally:
            os.close(fd)


class WatchdogFeeder(Service):
    """Feeds the watchdog every ``timeout / 4`` seconds while a registrar confirmed this
    PE within ``lost_after`` seconds, and stops feeding once it has not.

    Proof of contact is a REGISTRATION_RESPONSE accepting one of the PE's own
    registrations; it is credited with the time that registration was *sent* (answers come
    in order on one association), which is before the registrar saw it, so the credit never
    runs ahead of what the registrar knows, however late the answer arrives. A keep-alive
    from a registrar proves nothing: it does not show that the registrar hears the PE.
    Nothing is fed before the first confirmed contact. ``now`` is a monotonic clock (a
    wall clock set back must not extend the feeding); ``clock`` schedules the ticks.

    A clean stop disarms the watchdog (the magic close) only when ``holds_vms()`` is false:
    a PE that stops keeps its VMs running for their lease, its registration is gone, and
    another PE may then fence its host by waiting out this very watchdog. With VMs the
    device is closed armed and the host resets ``timeout`` seconds later unless a PE
    (under the same ``--pe-id``) is registered and feeding again before then."""

    def __init__(
        self,
        device: WatchdogDevice,
        lost_after: float,
        timeout: float,
        clock: Any,
        *,
        now: Callable[[], float] = time.monotonic,
        holds_vms: Callable[[], bool] = lambda: True,
    ) -> None:
        self.device = device
        self.lost_after = lost_after
        self.timeout = timeout
        self.interval = timeout / 4
        self.clock = clock
        self.now = now
        self.holds_vms = holds_vms
        self.credit: float | None = (
            None  # when the last registration a registrar accepted was sent
        )
        self.started_at: float | None = None
        self.feeding = False  # whether the last tick fed
        self.feeds = 0
        self.failed_feeds = 0
        self._sent: dict[int, tuple[object, list[float]]] = {}
        self._warned_never = False
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock

    # the PE service tells of registrations
    def sent(self, channel: object) -> None:
        self._sent.setdefault(id(channel), (channel, []))[1].append(self.now())

    def answered(self, channel: object, accepted: bool) -> None:
        entry = self._sent.get(id(channel))
        if entry is None or entry[0] is not channel or not entry[1]:
            return  # an answer to nothing this feeder saw sent: no proof of anything
        sent_at = entry[1].pop(0)
        if accepted and (self.credit is None or sent_at > self.credit):
            self.credit = sent_at
            if not self.feeding and self.running and self.contact():
                self.tick()  # back in contact: feed at once

    def lost(self, channel: object) -> None:
        self._sent.pop(id(channel), None)

    def contact(self) -> bool:
        return self.credit is not None and self.now() - self.credit <= self.lost_after

    def tick(self) -> None:
        if self.contact():
            try:
                self.device.feed()
            except OSError as err:
                self.failed_feeds += 1
                log.error(
                    "watchdog {path}: feeding failed: {err}",
                    path=self.device.path,
                    err=err.strerror or str(err),
                )
                return
            self.feeds += 1
            if not self.feeding:
                log.warn(
                    "watchdog {path}: a registrar confirmed this PE; feeding every {interval:g}s",
                    path=self.device.path,
                    interval=self.interval,
                )
            self.feeding = True
            return
        if self.feeding:
            log.critical(
                "WATCHDOG STARVED: no registrar confirmed this PE for {lost:g}s; stopped feeding {path}, "
                "the host resets within {timeout:g}s unless a registrar confirms it again",
                lost=self.lost_after,
                path=self.device.path,
                timeout=self.timeout,
            )
            self.feeding = False
        elif (
            self.credit is None
            and not self._warned_never
            and self.started_at is not None
        ):
            if self.now() - self.started_at > self.lost_after:
                self._warned_never = True
                log.critical(
                    "WATCHDOG NOT FED: no registrar has confirmed this PE since it started; "
                    "{path} resets the host",
                    path=self.device.path,
                )

    def startService(self) -> None:
        super().startService()
        self.started_at = self.now()
        log.info(
            "watchdog {path} armed: fed while a registrar confirmed this PE within {lost:g}s",
            path=self.device.path,
            lost=self.lost_after,
        )
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        holds = self.holds_vms()
        try:
            self.device.close(disarm=not holds)
        except OSError as err:
            log.error(
                "watchdog {path}: closing failed: {err}",
                path=self.device.path,
                err=err.strerror,
            )
        if holds:
            log.critical(
                "watchdog {path} left ARMED: this PE stops with VMs running; the host resets within "
                "{timeout:g}s unless the PE is back and registered",
                path=self.device.path,
                timeout=self.timeout,
            )
        else:
            log.info(
                "watchdog {path} disarmed (magic close): no VM runs here",
                path=self.device.path,
            )
        return super().stopService()


@implementer(ISelfFencing)
class WatchdogStonith:
    """``watchdog``: self-fencing through each host's own watchdog, decided by the pool.

    ``device`` (default ``/dev/watchdog``), ``lost-after`` (seconds without a confirmed
    registration before a PE stops feeding, default 20), ``timeout`` (the device's timeout,
    set on it, default 60), ``margin`` (default 5): the same values on every host.

    ``fence(target)`` asks the pool (every registrar) whether ``target.pe_identifier`` is
    registered: if it is, or the pool cannot tell, the fence fails. Otherwise it waits
    ``lost-after + 2 * timeout + margin`` seconds (measured on a monotonic clock), asking
    again every ``check_interval`` seconds and at the end; any sighting fails the fence.
    The timing argument is in the README ("Self-fencing with a watchdog").

    ``reactor`` schedules the waits; ``now`` is the monotonic clock; ``open_fd`` opens the
    device (tests pass a file or FIFO of their own)."""

    name = "watchdog"

    def __init__(
        self,
        device: str = "/dev/watchdog",
        timeout: object = 60.0,
        margin: object = 5.0,
        *,
        reactor: Any = None,
        now: Callable[[], float] = time.monotonic,
        open_fd: Callable[[str], int] = _open_device,
        **options: object,
    ) -> None:
        lost_after = options.pop("lost-after", options.pop("lost_after", 20.0))
        if options:
            raise ValueError(
                f"unknown option {', '.join(sorted(options))}; watchdog takes device, lost-after, timeout, margin"
            )
        if not str(device).strip():
            raise ValueError(
                "device must name a watchdog device, e.g. device=/dev/watchdog"
            )
        self.device = str(device).strip()
        self.lost_after = _number("lost-after", lost_after)
        self.timeout = _number("timeout", timeout)
        self.margin = _number("margin", margin, zero=True)
        self.wait_s = self.lost_after + 2 * self.timeout + self.margin
        self.refresh_interval_s = self.lost_after / 3
        self.check_interval = min(1.0, self.lost_after / 4)
        self._reactor = reactor
        self._now = now
        self._open_fd = open_fd
        self.membership: Any = None
        self.holds_vms: Callable[[], bool] = lambda: True

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    def attach(self, membership: Any, holds_vms: Callable[[], bool]) -> None:
        self.membership = membership
        self.holds_vms = holds_vms

    def feeder(self, clock: Any) -> WatchdogFeeder:
        device = WatchdogDevice(self.device, self.timeout, self._open_fd)
        device.open()
        return WatchdogFeeder(
            device,
            self.lost_after,
            self.timeout,
            clock,
            now=self._now,
            holds_vms=lambda: self.holds_vms(),
        )  # attach may come later

    def fence(self, target: FenceTarget) -> defer.Deferred:
        return _fenced(target.host, self._fence(target))

    async def _fence(self, target: FenceTarget) -> str:
        host, pe = target.host, target.pe_identifier
        if not pe:
            raise FenceFailed(
                f"cannot fence {host} by its watchdog: which PE ran there is not known"
            )
        if self.membership is None:
            raise FenceFailed(
                "watchdog fencing asks the pool, and this provider is attached to none (only a PE daemon is)"
            )
        await self._unregistered(host, pe, waiting=False)
        log.warn(
            "fencing {host}: its PE {pe} is not registered with the pool; waiting {wait:g}s for its watchdog "
            "(lost-after {lost:g} + 2 x timeout {timeout:g} + margin {margin:g})",
            host=host,
            pe=f"0x{pe:08x}",
            wait=self.wait_s,
            lost=self.lost_after,
            timeout=self.timeout,
            margin=self.margin,
        )
        start = self._now()
        deadline = start + self.wait_s
        while (left := deadline - self._now()) > 0:
            # the reactor's timers run on the wall clock; the loop goes by the monotonic one
            await task.deferLater(
                self.reactor, min(left, self.check_interval), lambda: None
            )
            await self._unregistered(host, pe, waiting=True)
        return f"watchdog: PE 0x{pe:08x} unregistered for {self._now() - start:.1f}s, its watchdog has reset it"

    async def _unregistered(self, host: str, pe: int, waiting: bool) -> None:
        try:
            registered = await self.membership.registered(pe)
        except Exception as err:
            raise FenceFailed(
                f"cannot tell whether host {host} (PE 0x{pe:08x}) is still registered with the pool: {err}"
            ) from None
        if registered:
            when = (
                "registered with the pool again while its watchdog fence waited"
                if waiting
                else "still registered with the pool"
            )
            raise FenceFailed(
                f"host {host} is {when} (PE 0x{pe:08x}); a watchdog fence would not reset it"
            )


#: Every provider, as the built-in plugin registers them.
PROVIDERS = (
    FenceAgentStonith,
    LibvirtStonith,
    CommandStonith,
    ManualStonith,
    WatchdogStonith,
)
