"""``xenpool bench pe``: the management overhead of a real pool element daemon.

A real ``twistd -n xenpool-registrar`` and a real ``twistd -n xenpool-pe`` on libvirt's test
driver (a temporary node file with enough RAM for ``--vms`` VMs) run on loopback TCP. A
load generator, a separate process so that its CPU is not the PE's
(``python -m xenpool.tools.bench_pe client``), opens ``--vms`` PU sessions, one TCP connection
each, and has the PE create one small VM per session. Then, on the same PE process:

* ``idle_cpu_percent``: the CPU time it uses over ``--seconds`` with every VM running and
  every session open but silent (registrar keep-alives and the PE's regular load
  updates still happen: the load interval is the daemon's default);
* ``pe_cpu_percent``: the CPU time it uses over the next ``--seconds`` while every
  session heartbeats its VM (CheckRunning, interval 1 s) once a second, the sessions
  spread evenly over each second as independent PUs would be.

CPU time is utime + stime of the whole process (every thread, libvirt's included) from
``/proc/PID/stat``, in percent of one core; its resolution is one clock tick (10 ms).
``cpu_us_per_heartbeat`` is the heartbeat window's CPU per answered heartbeat,
``net_cpu_us_per_heartbeat`` the same after taking the idle baseline off.

Baselines, measured in the same run with the same load generator (heartbeat window
only): ``baselines.twisted``, a minimal Twisted server (epoll reactor, the same codec,
``transport.write`` of a fixed answer) and ``baselines.selectors``, a plain ``selectors``
loop doing the same. ``ratio_to_twisted`` and ``ratio_to_selectors`` are the PE's CPU
over theirs: what the daemon costs beyond answering at all, on this machine, today.

The PE's idle timeout is raised above the idle window, or the silent sessions would end.
Every wait is for an event (a log line, an answer) with a deadline; the only sleeps are
the two measured windows themselves. Every process the bench starts is stopped on every
way out. Like the other benchmarks it prints numbers next to targets and never fails on
a slow machine.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..protocol import framing
from ..protocol import session as S
from ..protocol.errors import ProtocolError
from .bench import (
    BenchError,
    cpu_seconds,
    free_port,
    load_generator,
    progress,
    run_bench,
    spawn,
    stop,
    twistd_argv,
    verdict,
)

if TYPE_CHECKING:
    from rich.console import JustifyMethod

POOL = "Xen"
REGISTRAR_ID = 0x0BE0C401
PE_ID = 0x0BE0C402
VM_RAM_MB = 64
HEARTBEAT_INTERVAL_S = 1
NODE_CPUS = 8
NODE_MIN_RAM_MB = 16 * 1024
RUNNING = 1  # VIR_DOMAIN_RUNNING

TARGET_PE_CPU_PERCENT = 1.0
# The prototype's management overhead, in percent of a dual-core host (measured on the
# prototype, not here).
PROTOTYPE_PERCENT_OF_DUAL_CORE = {"libvirt": 5.7, "command line": 12.9}


# ------------------------------------------------------------------- processes


def node_ram_mb(vms: int) -> int:
    """RAM of the test driver's host: 16 GB, or more if ``vms`` VMs would not fit (the
    PE's default overhead is 12 MB + 7 KB per MB of host RAM)."""
    needed = (vms * VM_RAM_MB + 12) / (1 - 7 / 1024)
    return max(NODE_MIN_RAM_MB, math.ceil(needed / 1024 + 1) * 1024)


def write_node_xml(path: Path, ram_mb: int, cpus: int = NODE_CPUS) -> Path:
    """A host for libvirt's test driver, in the format of etc/xenpool/node-host1.xml."""
    path.write_text(
        f"""<?xml version="1.0"?>
<!-- xenpool bench pe: a temporary host for libvirt's test driver -->
<node>
  <cpu>
    <mhz>2000</mhz>
    <model>x86_64</model>
    <active>{cpus}</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>{cpus}</cores>
    <threads>1</threads>
  </cpu>
  <memory>{ram_mb * 1024}</memory>
</node>
"""
    )
    return path


class Daemon:
    """A ``twistd -n`` process whose log (stdout) a thread copies to ``log_path`` and
    keeps, so that readiness is waited for as a log line, never by polling."""

    def __init__(self, argv: list[str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = bytearray()
        self._eof = False
        self._changed = threading.Condition()
        self._file = open(log_path, "wb")
        try:
            self.proc = spawn(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except BaseException:
            self._file.close()
            raise
        self._reader = threading.Thread(
            target=self._read, name=f"log of {argv[-1]}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None  # stdout=PIPE
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._changed:
                if not chunk:
                    self._eof = True
                    self._changed.notify_all()
                    return
                self._log += chunk
                self._file.write(chunk)
                self._file.flush()
                self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return self._log.decode(errors="replace")

    def wait_for(self, text: str, timeout: float, what: str) -> None:
        needle = text.encode()
        deadline = time.monotonic() + timeout
        with self._changed:
            while needle not in self._log:
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    state = (
                        f"exited with status {self.proc.wait()}"
                        if self._eof
                        else f"not ready within {timeout:g} s"
                    )
                    raise BenchError(
                        f"the {what} {state}; its log:\n{self._log.decode(errors='replace')}"
                    )
                self._changed.wait(left)

    def stop(self) -> None:
        stop(self.proc)
        self._reader.join(10)
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()
            self._file.close()


@contextlib.contextmanager
def daemon(
    argv: list[str], cwd: Path, name: str, ready: str, timeout: float = 60.0
) -> Iterator[Daemon]:
    d = Daemon(argv, cwd, cwd / f"{name}.log")
    try:
        d.wait_for(ready, timeout, name)
        yield d
    finally:
        d.stop()


def registrar_argv(port: int, secret: Path) -> list[str]:
    return [
        *twistd_argv(),
        "-n",
        "--pidfile=",
        "--logfile=-",
        "xenpool-registrar",
        f"--asap=tcp:{port}:interface=127.0.0.1",
        f"--registrar-id={REGISTRAR_ID:#x}",
        f"--pool-secret={POOL}:{secret}",
    ]


def pe_argv(
    registrar_port: int,
    port: int,
    node_xml: Path,
    secret: Path,
    idle_timeout: float,
    profile: str | None = None,
) -> list[str]:
    """The PE daemon with its defaults (load interval 30 s) but for the idle timeout."""
    profiling = (
        [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        if profile
        else []
    )
    return [
        *twistd_argv(),
        "-n",
        "--pidfile=",
        "--logfile=-",
        *profiling,
        "xenpool-pe",
        f"--registrar=tcp:host=127.0.0.1:port={registrar_port}",
        f"--pe-id={PE_ID:#x}",
        f"--pool={POOL}",
        f"--port={port}",
        "--bind=127.0.0.1",
        "--address=127.0.0.1",
        "--host=bench",
        f"--libvirt-uri=test://{node_xml.resolve()}",
        f"--pool-secret-file={secret}",
        f"--idle-timeout={idle_timeout:g}",
        "--shutdown-timeout=2",
    ]


def load(spec: dict) -> dict:
    """Run the load generator process; its result."""
    argv = [sys.executable, "-m", __name__, "client", json.dumps(spec)]
    return load_generator(argv, timeout_s=2 * spec["seconds"] + 120 + 2 * spec["vms"])


def _proc_status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {
        key: value.strip() for key, _, value in (line.partition(":") for line in lines)
    }


def _default_load_interval() -> float:
    from ..pe.tap import SETTINGS

    return next(s.default for s in SETTINGS if s.name == "load-interval")


# -------------------------------------------------------------------- the bench


def pe(vms: int, seconds: float, profile: str | None = None) -> dict:
    ram_mb = node_ram_mb(vms)
    idle_timeout = seconds + 60  # above the idle window, which has no heartbeats
    result: dict = {
        "vms": vms,
        "seconds": seconds,
        "vm_ram_mb": VM_RAM_MB,
        "node_ram_mb": ram_mb,
        "node_cpus": NODE_CPUS,
        "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
        "load_interval_s": _default_load_interval(),
        "idle_timeout_s": idle_timeout,
    }
    with (
        tempfile.TemporaryDirectory(prefix="xenpool-bench-pe-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        node_xml = write_node_xml(workdir / "node-bench.xml", ram_mb)
        secret = workdir / "secret"
        secret.write_text(os.urandom(24).hex() + "\n")
        registrar_port, pe_port = free_port(), free_port()
        ready = f"registrar {REGISTRAR_ID:#010x} started"
        registrar = stack.enter_context(
            daemon(registrar_argv(registrar_port, secret), workdir, "registrar", ready)
        )
        progress("pe", f"registrar pid {registrar.proc.pid} on port {registrar_port}")
        argv = pe_argv(registrar_port, pe_port, node_xml, secret, idle_timeout, profile)
        pe_daemon = stack.enter_context(
            daemon(argv, workdir, "pe", f"registered in pool {POOL}")
        )
        progress(
            "pe",
            f"PE pid {pe_daemon.proc.pid} on port {pe_port}, registered; libvirt test driver host with "
            f"{ram_mb} MB, {NODE_CPUS} CPUs",
        )
        spec = {
            "port": pe_port,
            "pe_pid": pe_daemon.proc.pid,
            "vms": vms,
            "ram_mb": VM_RAM_MB,
            "seconds": seconds,
        }
        run = load(spec)
        status = _proc_status(pe_daemon.proc.pid)
        if pe_daemon.proc.poll() is not None:
            raise BenchError(f"the PE exited during the run; its log:\n{pe_daemon.log}")
        if profile:
            progress("pe", f"stopping the PE; its profile goes to {profile}")
    baselines = {kind: baseline(kind, vms, seconds) for kind in BASELINES}

    idle, busy = run["idle"], run["heartbeat"]
    heartbeats = busy["answers"]
    idle_percent = 100 * idle["cpu_s"] / idle["elapsed_s"]
    busy_percent = 100 * busy["cpu_s"] / busy["elapsed_s"]
    net_s = busy["cpu_s"] - idle["cpu_s"] * busy["elapsed_s"] / idle["elapsed_s"]
    rss = status.get("VmRSS", "").split()
    result.update(
        pe_cpu_percent=round(busy_percent, 3),
        idle_cpu_percent=round(idle_percent, 3),
        heartbeat_cpu_percent=round(busy_percent - idle_percent, 3),
        heartbeats=heartbeats,
        heartbeats_expected=busy["sent"],
        heartbeats_per_s=round(heartbeats / busy["elapsed_s"], 2),
        cpu_us_per_heartbeat=round(1e6 * busy["cpu_s"] / heartbeats, 1)
        if heartbeats
        else None,
        net_cpu_us_per_heartbeat=round(1e6 * net_s / heartbeats, 1)
        if heartbeats
        else None,
        rtt_ms=busy["rtt_ms"],
        create_s=round(run["create_s"], 3),
        pe_rss_kb=int(rss[0]) if rss else None,
        pe_threads=int(status["Threads"]) if "Threads" in status else None,
        client_cpu_percent=round(100 * busy["client_cpu_s"] / busy["elapsed_s"], 2),
        cpu_tick_s=1 / os.sysconf("SC_CLK_TCK"),
        windows={
            "idle": idle,
            "heartbeat": {k: v for k, v in busy.items() if k != "rtt_ms"},
        },
        targets={"pe_cpu_percent": TARGET_PE_CPU_PERCENT},
        baselines=baselines,
        **{
            f"ratio_to_{kind}": _ratio(busy_percent, b["cpu_percent"])
            for kind, b in baselines.items()
        },
    )
    return result


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 2) if base > 0 else None


BASELINES = ("twisted", "selectors")


def baseline(kind: str, vms: int, seconds: float) -> dict:
    """The heartbeat window against a minimal ``kind`` server (no idle window)."""
    port = free_port()
    argv = [sys.executable, "-m", __name__, "serve", kind, str(port)]
    with tempfile.TemporaryDirectory(prefix="xenpool-bench-pe-") as tmp:
        with daemon(argv, Path(tmp), f"baseline-{kind}", "serving") as server:
            progress("pe", f"baseline: a minimal {kind} server, pid {server.proc.pid}")
            spec = {
                "port": port,
                "pe_pid": server.proc.pid,
                "vms": vms,
                "ram_mb": VM_RAM_MB,
                "seconds": seconds,
                "idle": False,
            }
            busy = load(spec)["heartbeat"]
    heartbeats = busy["answers"]
    return {
        "cpu_percent": round(100 * busy["cpu_s"] / busy["elapsed_s"], 3),
        "cpu_us_per_heartbeat": round(1e6 * busy["cpu_s"] / heartbeats, 1)
        if heartbeats
        else None,
        "heartbeats": heartbeats,
        "rtt_ms": busy["rtt_ms"],
    }


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    target = r["targets"]["pe_cpu_percent"]
    table = Table(
        title=f"PE daemon: {r['vms']} VMs on libvirt's test driver, one PU session each, heartbeat 1/s"
    )
    for column, justify in (
        ("measure", "left"),
        ("result", "right"),
        ("target", "right"),
        ("", "left"),
    ):
        table.add_column(column, justify=cast("JustifyMethod", justify))
    us = lambda v: "-" if v is None else f"{v:,.0f} us"  # noqa: E731
    rtt = r["rtt_ms"]
    rows = [
        (
            "pe_cpu_percent",
            f"{r['pe_cpu_percent']:.2f} %",
            f"<= {target:g} %",
            verdict(r["pe_cpu_percent"] <= target),
        ),
        ("idle_cpu_percent", f"{r['idle_cpu_percent']:.2f} %", "", ""),
        ("heartbeat_cpu_percent", f"{r['heartbeat_cpu_percent']:.2f} %", "", ""),
        ("heartbeats", f"{r['heartbeats']:,} of {r['heartbeats_expected']:,}", "", ""),
        ("cpu_us_per_heartbeat", us(r["cpu_us_per_heartbeat"]), "", ""),
        ("net_cpu_us_per_heartbeat", us(r["net_cpu_us_per_heartbeat"]), "", ""),
        (
            "rtt_ms median / p99 / max",
            f"{rtt['median']:.2f} / {rtt['p99']:.2f} / {rtt['max']:.2f}",
            "",
            "",
        ),
        ("create_s", f"{r['create_s']:.2f} s", "", ""),
        (
            "pe_rss_kb",
            "-" if r["pe_rss_kb"] is None else f"{r['pe_rss_kb']:,} KB",
            "",
            "",
        ),
    ]
    for kind, b in r["baselines"].items():
        ratio = r[f"ratio_to_{kind}"]
        rows.append(
            (
                f"baseline: bare {kind} server",
                f"{b['cpu_percent']:.2f} %",
                "",
                f"PE = {'-' if ratio is None else f'{ratio:.2f}'} x this",
            )
        )
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    prototype = ", ".join(
        f"{p:g} % with {how} ({2 * p:g} % of one core)"
        for how, p in PROTOTYPE_PERCENT_OF_DUAL_CORE.items()
    )
    print(
        f"{r['seconds']:g} s idle window (VMs running, sessions silent), then {r['seconds']:g} s of heartbeats; "
        f"{r['vm_ram_mb']} MB VMs on a {r['node_ram_mb']} MB, {r['node_cpus']}-CPU test host; load interval "
        f"{r['load_interval_s']:g} s; PU sessions from another process (its CPU: {r['client_cpu_percent']:.0f} %).\n"
        f"CPU = utime + stime of the PE process (all threads) from /proc, in % of one core, "
        f"{r['cpu_tick_s'] * 1000:g} ms resolution. The prototype's management overhead, of a dual-core host: "
        f"{prototype}."
    )


def run(args: argparse.Namespace) -> int:
    if not Path("/proc/self/stat").exists():
        print(
            "xenpool bench pe: needs /proc (Linux) to read the PE's CPU time",
            file=sys.stderr,
        )
        return 1
    return run_bench(
        "pe",
        args,
        lambda s: pe(args.vms, s, getattr(args, "profile", None)),
        _print_table,
    )


# ------------------------------------------------- the load generator (a child)


class _Sessions:
    """``count`` PU sessions with the PE, plain blocking sockets under one selector."""

    def __init__(self, port: int, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.streams: list[framing.ShimStream] = []
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(sock)
            self.streams.append(framing.ShimStream())
            self.selector.register(sock, selectors.EVENT_READ, i)

    def send(self, i: int, data: bytes) -> None:
        self.socks[i].sendall(data)

    def pump(
        self, timeout: float | None, on_message: Callable[[int, object], None]
    ) -> None:
        """Wait up to ``timeout`` for input; hand every whole message to ``on_message``."""
        for key, _ in self.selector.select(timeout):
            i = key.data
            data = self.socks[i].recv(65536)
            if not data:
                raise BenchError(f"the PE closed session {i}")
            stream = self.streams[i]
            stream.feed(data)
            while (item := stream.next_message()) is not None:
                on_message(i, item[1])

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.selector.close()


def _name(i: int) -> str:
    return f"bench{i}"


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def client(spec: dict) -> dict:
    """Open the sessions, create a VM in each, check each once, then measure the PE's CPU
    over an idle window and over a window of heartbeats."""
    vms, seconds, pid = spec["vms"], spec["seconds"], spec["pe_pid"]
    sessions = _Sessions(spec["port"], vms)
    try:
        return _measure(
            sessions, vms, seconds, pid, spec["ram_mb"], spec.get("idle", True)
        )
    finally:
        sessions.close()


def _idle_window(
    sessions: _Sessions, vms: int, seconds: float, pid: int, on_answer
) -> dict:
    """VMs running, sessions open and silent."""
    progress("pe", f"{vms} VMs running; idle window of {seconds:g} s")
    start, cpu0 = time.monotonic(), cpu_seconds(pid)
    end = start + seconds
    while (now := time.monotonic()) < end:
        sessions.pump(end - now, on_answer)  # nothing may come: on_answer refuses it
    cpu1, stop = cpu_seconds(pid), time.monotonic()
    if cpu0 is None or cpu1 is None:
        raise BenchError("the PE process is gone")
    return {"elapsed_s": round(stop - start, 4), "cpu_s": round(cpu1 - cpu0, 3)}


def _measure(
    sessions: _Sessions,
    vms: int,
    seconds: float,
    pid: int,
    ram_mb: int,
    idle_window: bool = True,
) -> dict:
    # Create one VM per session, all requests at once (the PE has them in flight together).
    progress("pe", f"{vms} sessions open; creating {vms} VMs of {ram_mb} MB")
    started = time.monotonic()
    for i in range(vms):
        ip = f"10.9.{(i >> 8) & 0xFF}.{i & 0xFF}"
        sessions.send(
            i, framing.frame_message(S.CreateServer(_name(i), "", (ip,), ram_mb))
        )
    created: set[int] = set()

    def on_create(i: int, message: object) -> None:
        if isinstance(message, S.CreateResult):
            if not message.ok:
                raise BenchError(
                    f"creating {_name(i)} failed: {message.code} {message.reason}"
                )
            created.add(i)

    deadline = started + 60 + vms
    while len(created) < vms:
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(created)} of {vms} VMs created in time")
        sessions.pump(deadline - time.monotonic(), on_create)
    create_s = time.monotonic() - started

    heartbeat = [
        framing.frame_message(S.CheckRunning(_name(i), HEARTBEAT_INTERVAL_S))
        for i in range(vms)
    ]
    sent_at: dict[int, float] = {}
    rtts: list[float] = []

    def on_answer(i: int, message: object) -> None:
        if not isinstance(message, S.CheckRunningResponse) or i not in sent_at:
            raise BenchError(f"unexpected message in session {i}: {message!r}")
        if message.server_id != _name(i) or message.state != RUNNING:
            raise BenchError(f"{_name(i)} is not running: {message!r}")
        rtts.append(time.monotonic() - sent_at.pop(i))

    # One heartbeat each, answered, before measuring: every VM runs, every path is warm.
    for i in range(vms):
        sent_at[i] = time.monotonic()
        sessions.send(i, heartbeat[i])
    deadline = time.monotonic() + 60
    while sent_at:
        if time.monotonic() > deadline:
            raise BenchError(f"{len(sent_at)} first heartbeats not answered in time")
        sessions.pump(deadline - time.monotonic(), on_answer)
    rtts.clear()

    idle = _idle_window(sessions, vms, seconds, pid, on_answer) if idle_window else None

    # The heartbeat window: session i asks at start + k + i/vms, k = 0, 1, ...
    progress("pe", f"heartbeating {vms} sessions once a second for {seconds:g} s")
    own0 = time.process_time()
    start, cpu0 = time.monotonic(), cpu_seconds(pid)
    end = start + seconds
    due = [(start + i / vms * HEARTBEAT_INTERVAL_S, i) for i in range(vms)]
    heapq.heapify(due)
    sent = 0
    late_deadline = end + 30
    while True:
        now = time.monotonic()
        while due and due[0][0] <= now:
            at, i = heapq.heappop(due)
            if i in sent_at:
                raise BenchError(
                    f"heartbeat of {_name(i)} unanswered after {now - sent_at[i]:.1f} s"
                )
            sent_at[i] = now
            sessions.send(i, heartbeat[i])
            sent += 1
            if at + HEARTBEAT_INTERVAL_S < end:
                heapq.heappush(due, (at + HEARTBEAT_INTERVAL_S, i))
        if now >= end and not sent_at:
            break
        if now >= late_deadline:
            raise BenchError(
                f"{len(sent_at)} heartbeats unanswered {now - end:.0f} s after the window"
            )
        wake = due[0][0] if due else (end if now < end else late_deadline)
        sessions.pump(max(0.0, wake - now), on_answer)
    cpu1, stop = cpu_seconds(pid), time.monotonic()
    own = time.process_time() - own0
    if cpu0 is None or cpu1 is None:
        raise BenchError("the PE process is gone")
    rtts.sort()
    busy = {
        "elapsed_s": round(stop - start, 4),
        "cpu_s": round(cpu1 - cpu0, 3),
        "sent": sent,
        "answers": len(rtts),
        "client_cpu_s": round(own, 3),
        "rtt_ms": {
            "median": round(1000 * _percentile(rtts, 0.5), 3),
            "p99": round(1000 * _percentile(rtts, 0.99), 3),
            "max": round(1000 * (rtts[-1] if rtts else 0.0), 3),
        },
    }
    return {"create_s": create_s, "idle": idle, "heartbeat": busy}


# ------------------------------------------- the baseline servers (children)


def _baseline_answer(message: object) -> bytes:
    """What the load generator needs: every VM starts, every heartbeat says running."""
    if isinstance(message, S.CreateServer):
        return framing.frame_message(
            S.CreateResult(message.server_id, S.ResultCode.STARTED, 0)
        )
    if isinstance(message, S.CheckRunning):
        return framing.frame_message(S.CheckRunningResponse(message.server_id, RUNNING))
    raise BenchError(f"a baseline server takes no {message!r}")


def serve_selectors(port: int) -> None:  # pragma: no cover - run in a child process
    listener = socket.create_server(("127.0.0.1", port))
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    print("serving", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                conn, _addr = listener.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ, framing.ShimStream())
                continue
            conn, stream = cast(socket.socket, key.fileobj), key.data
            data = conn.recv(65536)
            if not data:
                selector.unregister(conn)
                conn.close()
                continue
            stream.feed(data)
            while (item := stream.next_message()) is not None:
                conn.send(
                    _baseline_answer(item[1])
                )  # small: the socket buffer takes it


def serve_twisted(port: int) -> None:  # pragma: no cover - run in a child process
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    class Answer(Protocol):
        transport: Any  # a TCP transport, set before any callback

        def connectionMade(self) -> None:
            self.stream = framing.ShimStream()

        def dataReceived(self, data: bytes) -> None:
            self.stream.feed(data)
            while (item := self.stream.next_message()) is not None:
                self.transport.write(_baseline_answer(item[1]))

    # Twisted types listenTCP's factory as a ServerFactory; any IProtocolFactory works.
    reactor.listenTCP(port, Factory.forProtocol(Answer), interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.callWhenRunning(lambda: print("serving", flush=True))
    reactor.run()


def main(argv: list[str]) -> int:  # pragma: no cover - run in the bench's child process
    if argv[:1] == ["serve"] and len(argv) == 3 and argv[1] in BASELINES:
        (serve_twisted if argv[1] == "twisted" else serve_selectors)(int(argv[2]))
        return 0
    if argv[:1] == ["client"]:
        try:
            result = client(json.loads(argv[1]))
        except (OSError, BenchError, ProtocolError) as err:
            result = {"error": str(err)}
        print(json.dumps(result), flush=True)
        return 0
    print(
        "usage: python -m xenpool.tools.bench_pe client SPEC | serve twisted|selectors PORT",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
