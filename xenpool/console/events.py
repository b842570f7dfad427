"""What happened, kept by every daemon: a bounded event list and the alert commands.

``EventLog`` is sans-IO apart from the alert runner it is given: ``record`` appends an
event (a dict with ``time``, ``kind`` and fields) to a bounded list, shown in the daemon's
status JSON, and hands it to the runner. ``AlertRunner`` runs each configured command
with the event as JSON on stdin and as ``XENPOOL_*`` environment variables, through
``reactor.spawnProcess``: ``record`` never waits for a command, and a command still
running after ``timeout_s`` is killed. A failing or slow alert so never delays a
failover (what records the event goes on at once).
"""

from __future__ import annotations

import json
import os
import shlex
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger

log = Logger()

#: The kinds of event the daemons record (alerts receive every one of them).
KINDS = (
    "fence_attempt",  # PE: about to fence a host
    "fence_success",  # PE: the host is fenced
    "fence_failure",  # PE: the fence failed, nothing started
    "start_refused",  # PE: a VM's start refused (code and reason)
    "failover",  # keeper: a VM lost with its PE runs again on another
    "vm_lost",  # keeper: a VM's PE was lost
    "moved",  # keeper: a VM moved by plan or by the operator
    "host_lost",  # registrar: a PE left the pool (timeout, deregistration, report)
    "host_back",  # registrar: a PE registered (again)
    "maintenance",  # PE: drained or resumed by the operator
)


def environment(event: dict) -> dict[str, str]:
    """``XENPOOL_KIND``, ``XENPOOL_TIME``, ... for every field of the event."""
    env = {}
    for key, value in event.items():
        name = "XENPOOL_" + "".join(c if c.isalnum() else "_" for c in key).upper()
        env[name] = value if isinstance(value, str) else json.dumps(value)
    return env


class EventLog:
    """The last ``size`` events of a daemon, oldest first."""

    def __init__(
        self,
        clock,
        source: str,
        size: int = 200,
        alert: Callable[[dict], None] | None = None,
    ) -> None:
        self.clock = clock
        self.source = source  # e.g. "PE 0x00000002 (host2)", "registrar 0x0a0a0a0a"
        self.events: deque[dict] = deque(maxlen=size)
        self.alert = alert
        self.sequence = 0

    def record(self, kind: str, **fields: Any) -> dict:
        self.sequence += 1
        event = {
            "time": round(self.clock.seconds(), 3),
            "kind": kind,
            "source": self.source,
            "sequence": self.sequence,
            **fields,
        }
        self.events.append(event)
        if self.alert is not None:
            try:
                self.alert(event)
            except Exception:  # an alert never stops what recorded the event
                log.failure("alert for {kind} failed", kind=kind)
        return event

    def describe(self) -> list[dict]:
        return list(self.events)


class _AlertProcess(protocol.ProcessProtocol):
    def __init__(self, command: str, stdin: bytes, done: Callable[[], None]) -> None:
        self.command, self.stdin, self.done = command, stdin, done
        self.output = b""

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None  # connectionMade: the process runs
        try:
            transport.write(self.stdin)
        finally:
            transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-2000:]

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        code = getattr(reason.value, "exitCode", None)
        if code:
            log.warn(
                "alert {command} failed (exit {code}): {out}",
                command=self.command,
                code=code,
                out=self.output.decode(errors="replace").strip()[-300:],
            )
        self.done()


class AlertRunner:
    """Runs every alert command for every event, never waited for by what recorded it.

    ``commands``: command lines (split with shlex, not run by a shell). Each command
    gets the events one at a time, in the order they were recorded (so a receiver sees
    a fence before the start it allowed); a command still running after ``timeout_s``
    is killed and the next event goes on. At most ``backlog`` events wait per command;
    beyond that the oldest are dropped, with a log line."""

    def __init__(
        self, reactor, commands: list[str], timeout_s: float = 30.0, backlog: int = 100
    ) -> None:
        self.reactor = reactor
        self.commands = [shlex.split(c) for c in commands if c.strip()]
        self.timeout_s = timeout_s
        self.backlog = backlog
        self.queues: list[deque] = [deque() for _ in self.commands]
        self.busy = [False for _ in self.commands]
        self.killed = 0

    def __call__(self, event: dict) -> None:
        stdin = (json.dumps(event) + "\n").encode()
        env = {**os.environ, **environment(event)}
        for i, queue in enumerate(self.queues):
            if len(queue) >= self.backlog:
                dropped = queue.popleft()
                log.warn(
                    "alert {command}: {n} events waiting, dropped {kind}",
                    command=" ".join(self.commands[i]),
                    n=len(queue) + 1,
                    kind=json.loads(dropped[0])["kind"],
                )
            queue.append((stdin, env))
            self._next(i)

    def _next(self, i: int) -> None:
        if self.busy[i] or not self.queues[i]:
            return
        stdin, env = self.queues[i].popleft()
        argv = self.commands[i]
        timer = None

        def done() -> None:
            self.busy[i] = False
            if timer is not None and timer.active():
                timer.cancel()
            self._next(i)

        process = _AlertProcess(" ".join(argv), stdin, done)
        try:
            transport = self.reactor.spawnProcess(process, argv[0], argv, env=env)
        except Exception as err:  # not found, not executable
            log.warn("alert {argv} not run: {err}", argv=argv[0], err=str(err))
            self.reactor.callLater(0, self._next, i)
            return
        self.busy[i] = True

        def kill() -> None:
            self.killed += 1
            log.warn(
                "alert {command} still running after {s} s: killed",
                command=" ".join(argv),
                s=self.timeout_s,
            )
            try:
                transport.signalProcess("KILL")
            except Exception:
                pass

        timer = self.reactor.callLater(self.timeout_s, kill)
