"""Running xenpool's daemons as real `twistd -n` processes (the demo, tests, benchmarks).

Readiness is read from the daemon's log, never guessed with a sleep; every wait has a
deadline and fails with the log.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

TWISTD_ARGV = [str(Path(sys.executable).with_name("twistd"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A command whose output (stdout and stderr) is kept as its log."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        self.argv = argv
        self.log = ""
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def stdout(self) -> IO[bytes]:
        """The log's pipe (started with stdout=PIPE)."""
        assert self.proc.stdout is not None
        return self.proc.stdout

    def mark(self) -> int:
        """A position in the log, for ``wait_for(..., since=)``: only what comes after."""
        return len(self.drain())

    def wait_for(self, text: str, timeout: float = 20.0, since: int = 0) -> str:
        """Read the log until ``text`` appears (after position ``since``); fail with the
        log after ``timeout``."""
        deadline = time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(self.stdout, selectors.EVENT_READ)
        try:
            while text not in self.log[since:]:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise AssertionError(
                        f"{text!r} not seen within {timeout} s; log:\n{self.log}"
                    )
                chunk = os.read(self.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(
                        f"daemon exited ({self.proc.wait()}) before {text!r}; log:\n{self.log}"
                    )
                self.log += chunk.decode(errors="replace")
        finally:
            selector.close()
        return self.log

    def drain(self) -> str:
        """Whatever the log has now, without waiting."""
        selector = selectors.DefaultSelector()
        selector.register(self.stdout, selectors.EVENT_READ)
        while selector.select(0):
            chunk = os.read(self.stdout.fileno(), 65536)
            if not chunk:
                break
            self.log += chunk.decode(errors="replace")
        selector.close()
        return self.log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stdout.close()


def wait_for_any(processes: list[Process], text: str, timeout: float = 20.0) -> Process:
    """The first of ``processes`` whose log shows ``text``."""
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    for process in processes:
        selector.register(process.stdout, selectors.EVENT_READ, process)
    try:
        while True:
            for process in processes:
                if text in process.drain():
                    return process
            left = deadline - time.monotonic()
            if left <= 0:
                logs = "\n---\n".join(p.log for p in processes)
                raise AssertionError(
                    f"{text!r} not seen within {timeout} s; logs:\n{logs}"
                )
            selector.select(left)
    finally:
        selector.close()


class Daemon(Process):
    """One `twistd -n` daemon, started and waited for until its log says ``ready``."""

    status_port: int  # where its status page is, for a caller that records it

    def __init__(
        self,
        plugin: str,
        *args: str,
        ready: str,
        cwd: Path,
        timeout: float = 20.0,
        twistd: list[str] = TWISTD_ARGV,
    ) -> None:
        super().__init__(
            [*twistd, "-n", "--pidfile=", "--logfile=-", plugin, *args], cwd
        )
        self.wait_for(ready, timeout)
