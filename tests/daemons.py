"""Real daemons for end-to-end tests: started as `twistd -n ...` processes on loopback.

Readiness is read from the daemon's log (no sleeping); every wait has a deadline.
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

from xenpool.protocol import framing
from xenpool.protocol import messages as M

TWISTD = str(Path(sys.executable).with_name("twistd"))
# Daemons under test run twistd through this wrapper so their coverage is measured too.
TWISTD_ARGV = [sys.executable, str(Path(__file__).with_name("twistd_cov.py"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One twistd process; its log is kept for assertions and failure messages."""

    def __init__(self, plugin: str, *args: str, ready: str, cwd: Path, timeout: float = 20.0) -> None:
        self.argv = [*TWISTD_ARGV, "-n", "--pidfile=", "--logfile=-", plugin, *args]
        self.log = ""
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.wait_for(ready, timeout)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """Read the log until ``text`` appears; fail with the log after ``timeout``."""
        deadline = time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while text not in self.log:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise AssertionError(f"{text!r} not seen within {timeout} s; log:\n{self.log}")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"daemon exited ({self.proc.wait()}) before {text!r}; log:\n{self.log}")
                self.log += chunk.decode(errors="replace")
        finally:
            selector.close()
        return self.log

    def drain(self) -> str:
        """Whatever the log has now, without waiting."""
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        while selector.select(0):
            chunk = os.read(self.proc.stdout.fileno(), 65536)
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
        self.proc.stdout.close()


class AsapClient:
    """A blocking ASAP client over TCP, as a PE or PU would talk to a registrar."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.stream = framing.RSerPoolStream(M.ASAP_PPID)

    def send(self, message: M.Message | bytes) -> None:
        self.sock.sendall(message if isinstance(message, bytes) else M.encode(message))

    def receive(self) -> M.Message:
        while (message := self.stream.next_message()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("registrar closed the connection")
            self.stream.feed(data)
        return message

    def request(self, message: M.Message | bytes) -> M.Message:
        self.send(message)
        return self.receive()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class SessionClient:
    """A blocking PU session with a PE: shim frames over TCP."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.stream = framing.ShimStream()

    def send(self, message: object) -> None:
        self.sock.sendall(framing.frame_message(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> object:
        while (item := self.stream.next_message()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("PE closed the session")
            self.stream.feed(data)
        return item[1]

    def receive_until(self, kind: type) -> list:
        """Everything received up to and including the first ``kind`` message."""
        received = [self.receive()]
        while not isinstance(received[-1], kind):
            received.append(self.receive())
        return received

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
