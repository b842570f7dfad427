"""``xenpool bench registrar``: a real registrar daemon against a Twisted ceiling.

Measured in one run, on loopback TCP:

* ``resolutions_per_s``: ASAP HANDLE_RESOLUTIONs per second answered by a real
  ``twistd -n xenpool-registrar`` process holding ``--pes`` PEs in pool "bench"
  (LeastUsed), while those PEs' registration connections stay open;
* ``ceiling_per_s``: the same load against a minimal Twisted server that frames by the
  ASAP length field and answers every request with a canned copy of the registrar's
  real answer, i.e. what a Twisted server can do here at all; ``ratio`` is the first
  over the second;
* ``registrations_per_s``: REGISTRATIONs of new PEs per second through the daemon;
* ``resolve_us_100``/``resolve_us_100000``: microseconds per ``Handlespace.resolution_answer()``
  in-process with 100 and 100,000 PEs (the real LeastUsed plugin);
* ``bytes_per_pe``: traced memory per PE in the handlespace, selection included.

The load generator is a separate process (``python -m xenpool.tools.bench_registrar client``)
with a few plain-socket connections, each keeping a window of requests outstanding; it
counts answers by their length fields. Every process the bench starts is stopped on
every way out. Like the other benchmarks it prints numbers next to targets and never
fails on a slow machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import json
import random
import select
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..protocol import framing
from ..protocol import messages as M
from ..protocol import params as P
from .bench import (
    BenchError,
    cpu_seconds,
    free_port,
    load_generator,
    progress,
    rate,
    run_bench,
    spawn,
    stop,
    twistd_argv,
    verdict,
)

if TYPE_CHECKING:
    from rich.console import JustifyMethod

    from ..interfaces import IPoolPolicy

POOL = b"bench"
CONNECTIONS = 4  # load generator connections
WINDOW = 32  # requests outstanding per connection
REGISTER_CONNECTIONS = 4  # connections that register --pes PEs and stay open
REGISTRAR_ID = 0x0BE0C400
FIRST_NEW_PE = 0x40000000  # identifiers of the PEs registered during the measurement

LOAD_UPDATE_INTERVAL_S = (
    30.0  # a PE's default --load-interval: the churn of a real pool
)
TARGET_RESOLUTIONS_PER_S = 20_000
TARGET_RATIO = 0.5
TARGET_SCALING = 2.0  # resolve_us_100000 <= this x resolve_us_100
TARGET_BYTES_PER_PE = 1024

_U32 = struct.Struct("!I")


# ------------------------------------------------------------------------ the PEs


def pool_element(i: int, load: float) -> P.PoolElement:
    """PE number ``i``: its own TCP user transport (10.x.y.z) and the given load."""
    address = f"10.{(i >> 16) & 0xFF}.{(i >> 8) & 0xFF}.{i & 0xFF}"
    return P.PoolElement(
        identifier=i,
        home_registrar=0,
        registration_life=3_600_000,
        user_transport=P.TcpTransport(
            5000 + i % 1000, (address,), P.TransportUse.DATA_PLUS_CONTROL
        ),
        policy=P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=P.load_to_wire(load)),
    )


def _load(i: int, count: int) -> float:
    return i / count  # a different load for every PE


def registration_template() -> tuple[bytes, int, int]:
    """An encoded REGISTRATION and the offsets of its PE identifier and IPv4 address,
    which the load generator rewrites to register a new PE each time."""
    identifier, address = (
        0x5A6B7C8D,
        0xA5948372,
    )  # markers, each found once in the bytes
    element = pool_element(identifier, 0.5)
    transport = P.TcpTransport(
        5000, (socket.inet_ntoa(_U32.pack(address)),), P.TransportUse.DATA_PLUS_CONTROL
    )
    element = P.PoolElement(
        identifier, 0, element.registration_life, transport, element.policy
    )
    data = M.encode(M.Registration(POOL, element))
    id_at, address_at = data.find(_U32.pack(identifier)), data.find(_U32.pack(address))
    assert data.count(_U32.pack(identifier)) == data.count(_U32.pack(address)) == 1
    return data, id_at, address_at


# ------------------------------------------------------------------ in-process


def _policies() -> dict[int, IPoolPolicy]:
    from ..plugins import load_plugins

    plugins = load_plugins()
    providers = (plugins.create("policy", name) for name in plugins.names("policy"))
    return {p.policy_type: p for p in providers}


def _handlespace(count: int, policies: dict[int, IPoolPolicy]):
    from ..registrar.handlespace import Handlespace

    handlespace = Handlespace(REGISTRAR_ID, policies, rng=random.Random(1))
    for i in range(count):
        handlespace.register(
            POOL, pool_element(i, _load(i, count)), now=0.0, owner=None
        )
    return handlespace


def resolve_us(count: int, seconds: float, policies: dict[int, IPoolPolicy]) -> float:
    """Microseconds per handle resolution answer (selection of the default 3 PEs from
    ``count`` and the encoded answer, as the daemon makes it)."""
    handlespace = _handlespace(count, policies)
    assert len(handlespace.resolve(POOL)) == min(3, count)
    return 1e6 / rate(lambda: handlespace.resolution_answer(POOL), seconds)


def bytes_per_pe(count: int, policies: dict[int, IPoolPolicy]) -> dict[str, float]:
    """Traced memory per PE, kept as the daemon keeps it: each PE decoded from its
    REGISTRATION, then registered (``handlespace``: the handlespace and its selection;
    ``with_audit``: through the registrar core, with its keep-alive timer)."""
    from twisted.internet.base import DelayedCall

    from ..registrar.core import Registrar, Timers
    from ..registrar.handlespace import Handlespace

    wire = [
        M.encode(M.Registration(POOL, pool_element(i, _load(i, count))))
        for i in range(count)
    ]

    class Clock:
        """Timers kept as the reactor keeps them: DelayedCalls in a heap (Twisted's
        task.Clock re-sorts a list on every call, quadratic for thousands)."""

        def __init__(self) -> None:
            self.calls: list = []

        def seconds(self) -> float:
            return 0.0

        def callLater(self, delay: float, f, *args, **kw):
            call = DelayedCall(
                delay, f, args, kw, lambda call: None, lambda call: None, self.seconds
            )
            heapq.heappush(self.calls, call)
            return call

    class Association:
        def send(self, message: M.Message) -> None:
            pass

        def send_encoded(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

    def handlespace_only(wire: list[bytes]) -> object:
        handlespace = Handlespace(REGISTRAR_ID, policies, rng=random.Random(1))
        for data in wire:
            msg = cast(M.Registration, M.decode(data))  # the wire is registrations
            handlespace.register(msg.pool_handle, msg.pool_element, now=0.0, owner=None)
        return handlespace

    def with_registrar(wire: list[bytes]) -> object:
        handlespace = Handlespace(REGISTRAR_ID, policies, rng=random.Random(1))
        registrar = Registrar(handlespace, Clock(), Timers(3600.0, 3600.0))
        association = Association()
        for data in wire:
            registrar.handle(M.decode(data), association)
        return registrar

    result = {}
    for key, build in (
        ("handlespace", handlespace_only),
        ("with_audit", with_registrar),
    ):
        build(wire[:100])  # anything done once (lazy imports, caches) is done now
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = build(wire)
            gc.collect()
            result[key] = (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()
        del kept
    return result


# ------------------------------------------------------------------- processes


@contextlib.contextmanager
def registrar_daemon(
    workdir: Path, profile: str | None = None
) -> Iterator[tuple[subprocess.Popen, int]]:
    """A ``twistd -n xenpool-registrar`` on a loopback port; stopped on the way out."""
    port = free_port()
    log_path = workdir / "registrar.log"
    profiling = (
        [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        if profile
        else []
    )
    argv = [
        *twistd_argv(),
        "-n",
        "--pidfile=",
        "--logfile=-",
        *profiling,
        "xenpool-registrar",
        f"--asap=tcp:{port}:interface=127.0.0.1",
        "--keep-alive-interval=3600",
        "--idle-timeout=3600",
        f"--registrar-id={REGISTRAR_ID:#x}",
    ]
    with open(log_path, "wb") as log:
        proc = spawn(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    try:
        ready = f"registrar {REGISTRAR_ID:#010x} started"
        deadline = time.monotonic() + 60
        while ready not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"the registrar did not start; its log:\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.02)
        yield proc, port
    finally:
        stop(proc)


@contextlib.contextmanager
def ceiling_server(reply: bytes) -> Iterator[tuple[subprocess.Popen, int]]:
    """The minimal Twisted server (``python -m xenpool.tools.bench_registrar ceiling``)."""
    argv = [sys.executable, "-m", __name__, "ceiling", reply.hex()]
    proc = spawn(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None  # stdout=PIPE
        line = proc.stdout.readline()  # its port, once it listens
        if not line.strip().isdigit():
            raise BenchError(
                f"the ceiling server did not start (exit status {proc.wait()})"
            )
        yield proc, int(line)
    finally:
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def load(port: int, server_pid: int, spec: dict) -> dict:
    """Run the load generator process against the server on ``port``; its result."""
    argv = [
        sys.executable,
        "-m",
        __name__,
        "client",
        json.dumps({"port": port, "server_pid": server_pid, **spec}),
    ]
    return load_generator(argv, timeout_s=spec["warmup"] + spec["seconds"] + 60)


# ---------------------------------------------------------- talking to the daemon


def _receive(sock: socket.socket, stream: framing.RSerPoolStream) -> M.Message:
    while (message := stream.next_message()) is None:
        data = sock.recv(65536)
        if not data:
            raise BenchError("the registrar closed the connection")
        stream.feed(data)
    return message


def register_pes(port: int, count: int) -> list[socket.socket]:
    """Register PEs 0..count-1 over a few connections, pipelined; the connections are
    returned open (closing them would deregister the PEs)."""
    socks = [
        socket.create_connection(("127.0.0.1", port), timeout=60)
        for _ in range(REGISTER_CONNECTIONS)
    ]
    try:
        for c, sock in enumerate(socks):
            stream = framing.RSerPoolStream()
            mine = range(c, count, len(socks))
            for start in range(0, len(mine), 256):
                chunk = mine[start : start + 256]
                sock.sendall(
                    b"".join(
                        M.encode(M.Registration(POOL, pool_element(i, _load(i, count))))
                        for i in chunk
                    )
                )
                for i in chunk:
                    answer = _receive(sock, stream)
                    if not isinstance(answer, M.RegistrationResponse) or answer.reject:
                        raise BenchError(f"registration of PE {i} refused: {answer}")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class LoadUpdates:
    """While running, re-registers the PEs one after another with a new load, ``rate``
    per second over their open connections (every PE once per 30 s is ``pes / 30``):
    each update changes the pool, so the registrar's cached answers must be rebuilt.
    (PEs reporting exactly the same lowest load, idle ones say, are picked in turn by
    LeastUsed, so their answers change every time and are never cached.)"""

    def __init__(self, socks: list[socket.socket], pes: int, rate: float) -> None:
        self.socks, self.pes, self.rate = socks, pes, rate
        self.sent = 0
        self._random = random.Random(len(socks) * pes)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="load updates", daemon=True
        )

    def __enter__(self) -> LoadUpdates:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            i = self.sent % self.pes
            sock = self.socks[
                i % len(self.socks)
            ]  # the connection that registered PE i
            load = self._random.random()  # measured loads: practically never two alike
            sock.sendall(M.encode(M.Registration(POOL, pool_element(i, load))))
            self.sent += 1
            readable, _, _ = select.select(self.socks, [], [], 0)
            for s in readable:  # the answers are not needed; keep the buffers empty
                s.recv(65536)
            self._stop.wait(
                max(0.0, started + self.sent / self.rate - time.monotonic())
            )


def resolve_once(port: int, request: bytes, expected: int) -> bytes:
    """One HANDLE_RESOLUTION, checked; the raw answer (the ceiling's canned reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while len(data) < 4 or len(data) < int.from_bytes(data[2:4], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("the registrar closed the connection")
            data += chunk
    answer = M.decode(data)
    if (
        not isinstance(answer, M.HandleResolutionResponse)
        or answer.error
        or len(answer.pool_elements) != expected
    ):
        raise BenchError(f"unexpected answer to a handle resolution: {answer}")
    return data


# -------------------------------------------------------------------- the bench


def registrar(pes: int, seconds: float, profile: str | None = None) -> dict:
    warmup = min(1.0, max(0.1, seconds / 3))
    request = M.encode(M.HandleResolution(POOL))
    load_spec = {
        "connections": CONNECTIONS,
        "window": WINDOW,
        "warmup": warmup,
        "seconds": seconds,
    }
    timing = f"{warmup:g} s warm-up + {seconds:g} s"
    result: dict = {
        "pes": pes,
        "seconds": seconds,
        "connections": CONNECTIONS,
        "window": WINDOW,
    }

    with (
        tempfile.TemporaryDirectory(prefix="xenpool-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        proc, port = stack.enter_context(registrar_daemon(Path(tmp), profile))
        progress(
            "registrar",
            f"registrar pid {proc.pid} on port {port}; registering {pes} PEs",
        )
        pe_socks = register_pes(port, pes)
        for sock in pe_socks:
            stack.callback(sock.close)
        reply = resolve_once(port, request, min(3, pes))
        result["request_bytes"], result["reply_bytes"] = len(request), len(reply)
        answer = [M.AsapType.HANDLE_RESOLUTION_RESPONSE, len(reply)]
        resolving = {**load_spec, "request": request.hex(), "answer": answer}

        progress("registrar", f"resolving for {timing}")
        resolutions = load(port, proc.pid, resolving)
        update_rate = pes / LOAD_UPDATE_INTERVAL_S
        progress(
            "registrar",
            f"resolving while the PEs update their loads ({update_rate:g}/s) for {timing}",
        )
        with LoadUpdates(pe_socks, pes, update_rate) as updates:
            with_updates = load(port, proc.pid, resolving)
        template, id_at, address_at = registration_template()
        registration_reply = len(M.encode(M.RegistrationResponse(POOL, 0)))
        progress("registrar", f"registering new PEs for {timing}")
        registrations = load(
            port,
            proc.pid,
            {
                **load_spec,
                "request": template.hex(),
                "patch": [id_at, address_at, FIRST_NEW_PE],
                "answer": [M.AsapType.REGISTRATION_RESPONSE, registration_reply],
            },
        )
        stack.close()  # stop the registrar before the ceiling runs

        with ceiling_server(reply) as (ceiling_proc, ceiling_port):
            progress(
                "registrar",
                f"ceiling server pid {ceiling_proc.pid} on port {ceiling_port}; resolving for {timing}",
            )
            ceiling = load(ceiling_port, ceiling_proc.pid, resolving)

    for name, run in (
        ("registrar", resolutions),
        ("with updates", with_updates),
        ("registration", registrations),
        ("ceiling", ceiling),
    ):
        if run["unexpected"]:
            raise BenchError(
                f"{run['unexpected']} of {run['answers']} answers in the {name} run were not as expected"
            )

    progress("registrar", "in-process handlespace measures")
    policies = _policies()
    per_measure = max(0.05, min(1.0, seconds / 3))
    small, large = (
        resolve_us(100, per_measure, policies),
        resolve_us(100_000, per_measure, policies),
    )
    memory = bytes_per_pe(20_000, policies)

    result.update(
        resolutions_per_s=round(resolutions["rate"]),
        ceiling_per_s=round(ceiling["rate"]),
        ratio=round(resolutions["rate"] / ceiling["rate"], 3)
        if ceiling["rate"]
        else 0.0,
        resolutions_per_s_with_updates=round(with_updates["rate"]),
        load_updates_per_s=round(update_rate, 1),
        load_updates_sent=updates.sent,
        registrations_per_s=round(registrations["rate"]),
        resolve_us_100=round(small, 3),
        resolve_us_100000=round(large, 3),
        resolve_scaling=round(large / small, 2),
        bytes_per_pe=round(memory["handlespace"]),
        bytes_per_pe_with_audit=round(memory["with_audit"]),
        # CPU each process used per second of wall time: a load generator near 1.0 means
        # the client, not the server, set the pace.
        cpu={
            name: {"client": run["client_cpu"], "server": run.get("server_cpu")}
            for name, run in (
                ("resolutions", resolutions),
                ("with updates", with_updates),
                ("registrations", registrations),
                ("ceiling", ceiling),
            )
        },
        targets={
            "resolutions_per_s": TARGET_RESOLUTIONS_PER_S,
            "ratio": TARGET_RATIO,
            "resolve_scaling": TARGET_SCALING,
            "bytes_per_pe": TARGET_BYTES_PER_PE,
        },
    )
    return result


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = r["targets"]
    scaling_limit = t["resolve_scaling"] * r["resolve_us_100"]
    table = Table(title=f"registrar daemon: {r['pes']:,} PEs, LeastUsed, loopback TCP")
    for column, justify in (
        ("measure", "left"),
        ("result", "right"),
        ("target", "right"),
        ("", "left"),
    ):
        table.add_column(column, justify=cast("JustifyMethod", justify))
    rows = [
        (
            "resolutions_per_s",
            f"{r['resolutions_per_s']:,}/s",
            f">= {t['resolutions_per_s']:,}/s",
            verdict(r["resolutions_per_s"] >= t["resolutions_per_s"]),
        ),
        ("ceiling_per_s", f"{r['ceiling_per_s']:,}/s", "", ""),
        (
            "ratio",
            f"{r['ratio']:.3f}",
            f">= {t['ratio']}",
            verdict(r["ratio"] >= t["ratio"]),
        ),
        (
            "resolutions_per_s_with_updates",
            f"{r['resolutions_per_s_with_updates']:,}/s",
            f"({r['load_updates_per_s']:g} load updates/s)",
            "",
        ),
        ("registrations_per_s", f"{r['registrations_per_s']:,}/s", "", ""),
        ("resolve_us_100", f"{r['resolve_us_100']:.2f} us", "", ""),
        (
            "resolve_us_100000",
            f"{r['resolve_us_100000']:.2f} us",
            f"<= {scaling_limit:.2f} us",
            verdict(r["resolve_us_100000"] <= scaling_limit),
        ),
        (
            "bytes_per_pe",
            f"{r['bytes_per_pe']:,} B",
            f"<= {t['bytes_per_pe']:,} B",
            verdict(r["bytes_per_pe"] <= t["bytes_per_pe"]),
        ),
        ("bytes_per_pe_with_audit", f"{r['bytes_per_pe_with_audit']:,} B", "", ""),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    cpu = "; ".join(
        f"{name}: client {c['client']:.0%}"
        + ("" if c["server"] is None else f", server {c['server']:.0%}")
        for name, c in r["cpu"].items()
    )
    print(
        f"{r['seconds']:g} s per run; load: {r['connections']} connections x {r['window']} requests outstanding, "
        f"from another process; "
        f"ceiling = a minimal Twisted server answering each request with a canned copy of the registrar's "
        f"{r['reply_bytes']}-byte answer; the pool does not change while resolving, so the registrar answers "
        f"from its answer cache after the first request (an uncached answer costs about resolve_us more); "
        f"with updates = the same while every PE re-registers with a new load once per "
        f"{LOAD_UPDATE_INTERVAL_S:g} s, each update invalidating the cache; "
        f"resolve_us = Handlespace.resolve() in-process; bytes_per_pe_with_audit "
        f"adds the registrar core's keep-alive timer.\nCPU per wall second: {cpu}"
    )


def run(args: argparse.Namespace) -> int:
    return run_bench(
        "registrar",
        args,
        lambda s: registrar(args.pes, s, getattr(args, "profile", None)),
        _print_table,
    )


# ------------------------------------------------- child processes of the bench


def client(spec: dict) -> dict:
    """The load generator: ``connections`` sockets, each keeping ``window`` requests
    outstanding, for ``warmup`` then ``seconds`` of wall time. Answers are counted by
    their length fields; ``unexpected`` counts those of another type or size.

    ``patch`` = [id offset, IPv4 offset, first id]: every request is the template with a
    new PE identifier and address (registrations of new PEs)."""
    request = bytes.fromhex(spec["request"])
    size = len(request)
    want_type, want_length = spec["answer"]
    window = spec["window"]
    server_pid = spec["server_pid"]
    patch = spec.get("patch")
    pack_into = _U32.pack_into

    def requests(state: list, count: int) -> bytes:
        if patch is None:
            return request * count
        id_at, address_at, _ = patch
        out = bytearray(request * count)
        first = state[2]
        for j in range(count):
            pack_into(out, j * size + id_at, first + j)
            pack_into(out, j * size + address_at, 0x0A000000 | ((first + j) & 0xFFFFFF))
        state[2] = first + count
        return bytes(out)

    selector = selectors.DefaultSelector()
    socks = []
    for c in range(spec["connections"]):
        sock = socket.create_connection(("127.0.0.1", spec["port"]), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
        state = [sock, b"", (patch[2] + (c << 24)) if patch else 0]
        selector.register(sock, selectors.EVENT_READ, state)
    answers = unexpected = 0
    for key in list(selector.get_map().values()):
        key.data[0].sendall(requests(key.data, window))

    start = time.monotonic()
    measure_from = start + spec["warmup"]
    end = measure_from + spec["seconds"]
    mark = None
    now = start
    while now < end:
        for key, _ in selector.select(0.5):
            state = key.data
            sock = state[0]
            data = sock.recv(262144)
            if not data:
                return {"error": "the server closed a connection"}
            buf = state[1] + data if state[1] else data
            pos, n, done = 0, len(buf), 0
            while n - pos >= 4:
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                if length < 4:
                    return {"error": f"answer with length {length}"}
                if n - pos < length:
                    break
                if buf[pos] != want_type or length != want_length:
                    unexpected += 1
                pos += length
                done += 1
            state[1] = buf[pos:]
            if done:
                answers += done
                sock.sendall(requests(state, done))
        now = time.monotonic()
        if mark is None and now >= measure_from:
            mark = (answers, now, time.process_time(), cpu_seconds(server_pid))
    server_cpu = cpu_seconds(server_pid)
    for sock in socks:
        sock.close()
    if mark is None:
        return {"error": "no time left to measure"}
    counted, since, cpu, server_since = mark
    elapsed = now - since
    server_cpu = (
        None
        if server_cpu is None or server_since is None
        else round((server_cpu - server_since) / elapsed, 2)
    )
    return {
        "answers": answers - counted,
        "elapsed": elapsed,
        "rate": (answers - counted) / elapsed,
        "unexpected": unexpected,
        "client_cpu": round((time.process_time() - cpu) / elapsed, 2),
        "server_cpu": server_cpu,
    }


def ceiling(reply: bytes) -> None:
    """A minimal Twisted server: frames requests by the ASAP length field and answers
    each one with ``reply``. Prints its port once it listens; stops on SIGTERM."""
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.protocol import Factory, Protocol

    class Canned(Protocol):
        transport: Any  # a TCP transport, set before any callback
        rest = b""

        def dataReceived(self, data: bytes) -> None:
            buf = self.rest + data if self.rest else data
            pos, n = 0, len(buf)
            write = self.transport.write
            while n - pos >= 4:
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                if length < 4:
                    self.transport.loseConnection()
                    return
                if n - pos < length:
                    break
                pos += length
                write(reply)
            self.rest = buf[pos:]

    # Twisted types listenTCP's factory as a ServerFactory; any IProtocolFactory works.
    port = reactor.listenTCP(0, Factory.forProtocol(Canned), interface="127.0.0.1")  # type: ignore[arg-type]
    print(cast(IPv4Address, port.getHost()).port, flush=True)
    reactor.run()


def main(
    argv: list[str],
) -> int:  # pragma: no cover - run in the bench's child processes
    if argv[:1] == ["client"]:
        try:
            result = client(json.loads(argv[1]))
        except OSError as err:
            result = {"error": str(err)}
        print(json.dumps(result), flush=True)
        return 0
    if argv[:1] == ["ceiling"]:
        ceiling(bytes.fromhex(argv[1]))
        return 0
    print(
        "usage: python -m xenpool.tools.bench_registrar client SPEC | ceiling REPLY_HEX",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
