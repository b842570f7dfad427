"""Real daemons and clients for end-to-end tests, on loopback."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

from xenpool.protocol import framing
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.tools import processes
from xenpool.tools.processes import free_port  # noqa: F401 - re-exported for the tests

TWISTD = str(Path(sys.executable).with_name("twistd"))
# Daemons under test run twistd through this wrapper so their coverage is measured too.
TWISTD_ARGV = [sys.executable, str(Path(__file__).with_name("twistd_cov.py"))]


def poll(get, until, timeout: float = 20.0):
    """Call ``get`` (a round trip to a daemon) until ``until`` holds for its value or
    ``timeout`` seconds have passed; the last value. For state that peers replicate at
    their own pace (ENRP updates), where no log line marks the moment."""
    deadline = time.monotonic() + timeout
    value = get()
    while not until(value) and time.monotonic() < deadline:
        value = get()
    return value


class Daemon(processes.Daemon):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, twistd=TWISTD_ARGV, **kwargs)


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


def bench_process(kind: str, marker: str, *args: str, **kwargs) -> subprocess.Popen:
    """``xenpool bench KIND ...`` with ``marker`` in its environment (and its children's)."""
    return subprocess.Popen(
        [sys.executable, "-m", "xenpool.cli", "bench", kind, *args],
        env={**os.environ, "XENPOOL_BENCH_TEST": marker},
        text=True,
        **kwargs,
    )


def processes_with(marker: str) -> list[str]:
    """Command lines of the live processes whose environment holds ``marker``."""
    needle = f"XENPOOL_BENCH_TEST={marker}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                )
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def read_until(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """Read a process's stderr until ``text`` appears; fail with what it said."""
    deadline = time.monotonic() + timeout
    log = ""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        while text not in log:
            left = deadline - time.monotonic()
            assert left > 0 and selector.select(left), (
                f"{text!r} not seen; stderr:\n{log}"
            )
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, f"the process exited ({proc.wait()}); stderr:\n{log}"
            log += chunk.decode(errors="replace")
    return log


def resolvable(daemon: Daemon) -> set[int]:
    client = AsapClient(daemon.ports["asap"])
    try:
        answer = client.request(M.HandleResolution(b"Xen", items=100))
        return {e.identifier for e in answer.pool_elements}
    finally:
        client.close()


def element(identifier: int) -> P.PoolElement:
    """A PE for registrar end-to-end tests: TCP port 6000 + identifier, load identifier %."""
    return P.PoolElement(
        identifier,
        0,
        600_000,
        P.TcpTransport(6000 + identifier, ("127.0.0.1",)),
        P.PoolPolicy.make(
            P.PolicyType.LEAST_USED, load=P.load_to_wire(identifier / 100)
        ),
    )


def loaded_element(
    identifier: int, port: int, load: float, policy=P.PolicyType.LEAST_USED
) -> P.PoolElement:
    return P.PoolElement(
        identifier,
        0,
        60_000,
        P.TcpTransport(port, ("127.0.0.1",)),
        P.PoolPolicy.make(policy, load=P.load_to_wire(load)),
    )
