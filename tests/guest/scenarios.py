"""Issue 13's interop scenarios over SCTP, run inside the QEMU guest (tests/guest/image.py).

Reports one line per scenario on the console: ``SCENARIO <n> PASS|FAIL <detail>``, then
``REFUSALS`` lines for every rsplib log line refusing what xenpool sent. Every wait polls
with a deadline; the guest is slow (software emulation), so deadlines are generous.

1. rsplib's rspserver registers at a xenpool registrar; rspterminal resolves the pool through
   it and reaches the server (its echo comes back).
2. Two xenpool PEs register at rspregistrar; ``xenpool-pu create`` resolves through
   rspregistrar, gets its VM, and fails over to the second PE when the first is killed.
3. ENRP between xenpool registrars and rspregistrar: PEs registered at either are resolvable
   at both; a killed registrar's PEs are taken over, by rspregistrar (of a xenpool
   registrar) and by a xenpool registrar (of rspregistrar).
4. xenpool alone over SCTP: the PE-PU session (PPIDs, no shim) through a xenpool registrar,
   and ENRP between two xenpool registrars.

All of it is captured: ``tcpdump -i lo ... sctp`` runs from before the first registrar starts
until every process is stopped (all traffic goes to the guest's own address, hence through
``lo``), and the capture is printed gzipped and base64-encoded between ``PCAP BEGIN <bytes>
<sha256>`` and ``PCAP END`` for the host to decode with Wireshark (tests/test_sctp_guest.py).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import sctp as pysctp  # noqa: E402

from xenpool.protocol import messages as M  # noqa: E402
from xenpool.tools.processes import Daemon, Process  # noqa: E402

IP = "10.0.2.15"
ETC = ROOT / "etc" / "xenpool"
WORK = Path("/tmp/interop")
CAPTURE = WORK / "sctp.pcap"
R1, RR, R3 = (
    0x11,
    0x22,
    0x33,
)  # xenpool registrar, rspregistrar, second xenpool registrar
RSPLIB_TIMERS = [
    "-peerheartbeatcycle=1000",
    "-peermaxtimelastheard=3000",
    "-peermaxtimenoresponse=1000",
    "-takeoverexpiryinterval=2000",
    "-endpointkeepalivetransmissioninterval=2000",
    "-endpointkeepalivetimeoutinterval=2000",
]
XP_TIMERS = [
    "--peer-heartbeat-interval=1",
    "--peer-timeout=4",
    "--keep-alive-interval=2",
    "--keep-alive-timeout=2",
]
results: dict[int, list[str]] = {}
started: list[Process] = []


def wait(what: str, predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        threading.Event().wait(0.3)


def resolve(port: int, handle: bytes) -> M.Message:
    """One HANDLE_RESOLUTION over a blocking SCTP association (as a PU would ask)."""
    sock = pysctp.sctpsocket_tcp(socket.AF_INET)
    sock.settimeout(5)
    try:
        sock.connect((IP, port))
        sock.events.data_io = True
        sock.events.flush()
        sock.sctp_send(
            M.encode(M.HandleResolution(handle, M.MAX_RESOLUTION_ITEMS)),
            ppid=M.ASAP_PPID,
        )
        deadline = time.monotonic() + 5
        while True:
            # a socket with a timeout is non-blocking underneath, and pysctp's receive does
            # not wait: wait for the answer here (it raised EAGAIN when the answer was late)
            if not select.select(
                [sock.fileno()], [], [], max(0.0, deadline - time.monotonic())
            )[0]:
                raise TimeoutError(
                    f"no HANDLE_RESOLUTION_RESPONSE from port {port} within 5 s"
                )
            try:
                _source, flags, data, _info = sock.sctp_recv(70000)
            except BlockingIOError:
                continue
            if not flags & pysctp.FLAG_NOTIFICATION:
                return M.decode(data)
    finally:
        sock.close()


def pool(port: int, handle: bytes) -> dict[int, int]:
    """{PE identifier: home registrar} of ``handle`` as the registrar at ``port`` answers."""
    answer = resolve(port, handle)
    return {
        pe.identifier: pe.home_registrar for pe in getattr(answer, "pool_elements", ())
    }


class Logged:
    """An rsplib program whose output goes to a file (it logs a lot; a pipe would fill)."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.path = WORK / f"{name}.log"
        self.name = name
        with open(self.path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=WORK,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def drain(self) -> str:
        return self.path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run(argv: list[str], cwd: Path = WORK) -> Process:
    process = Process(argv, cwd)
    started.append(process)
    return process


def rsplib(argv: list[str], name: str) -> Logged:
    process = Logged(argv, name)
    started.append(process)
    return process


def xenpool(plugin: str, *args: str, ready: str, timeout: float = 120.0) -> Daemon:
    daemon = Daemon(plugin, *args, ready=ready, cwd=WORK, timeout=timeout)
    started.append(daemon)
    return daemon


def rspregistrar(identifier: int, asap: int, enrp: int, peers: list[int]) -> Process:
    argv = [
        "rspregistrar",
        f"-identifier=0x{identifier:08x}",
        f"-asap={IP}:{asap}",
        f"-enrp={IP}:{enrp}",
        *[f"-peer={IP}:{p}" for p in peers],
        "-loglevel=3",
        "-logcolor=off",
        *RSPLIB_TIMERS,
    ]
    return rsplib(argv, f"rspregistrar-{identifier:x}")


class Capture:
    """tcpdump on ``lo``, SCTP only, written packet by packet (-U) to ``CAPTURE``."""

    def __init__(self, tcpdump: str) -> None:
        self.log = WORK / "tcpdump.log"
        with open(self.log, "wb") as out:
            # -Z root: the guest has no tcpdump user to drop privileges to
            self.proc = subprocess.Popen(
                [tcpdump, "-i", "lo", "-n", "-s", "0", "-U", "-Z", "root"]
                + ["-w", str(CAPTURE), "sctp"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait("tcpdump listening on lo", lambda: "listening on lo" in self.text(), 60)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self) -> None:
        """Stop tcpdump (it writes its counts and closes the file) and print the capture."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        for line in self.text().splitlines():
            if re.search(r"packets (captured|received|dropped)", line):
                print(f"CAPTURE {line.strip()}", flush=True)
        pcap = CAPTURE.read_bytes()
        packed = base64.encodebytes(gzip.compress(pcap)).decode()
        # nothing from the kernel between the markers: printk would land mid-line
        Path("/proc/sys/kernel/printk").write_text("1\n")
        sys.stdout.write(
            f"PCAP BEGIN {len(pcap)} {hashlib.sha256(pcap).hexdigest()}\n{packed}PCAP END\n"
        )
        sys.stdout.flush()


def scenario(number: int):
    def decorate(function):
        def run_it(*args):
            started_at = time.monotonic()
            try:
                detail = function(*args) or ""
                print(
                    f"SCENARIO {number} PASS {detail} ({time.monotonic() - started_at:.0f} s)",
                    flush=True,
                )
                results[number] = ["PASS"]
            except Exception as err:
                print(f"SCENARIO {number} FAIL {type(err).__name__}: {err}", flush=True)
                traceback.print_exc(file=sys.stdout)
                results[number] = ["FAIL"]

        run_it.__name__ = function.__name__
        return run_it

    return decorate


def main(wanted: set[int]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    fence_map = WORK / "fence-map.ini"
    fence_map.write_text(
        "".join(f"[host{n}]\npidfile = {WORK / f'pe{n}.pid'}\n" for n in (1, 2))
    )
    tcpdump, capture = shutil.which("tcpdump"), None
    if tcpdump is None:
        print("CAPTURE NONE: no tcpdump in the guest (it is not installed)", flush=True)
    else:
        try:  # the scenarios run without a capture; the host's capture test then fails
            capture = Capture(tcpdump)
        except Exception as err:
            print(f"CAPTURE FAILED {type(err).__name__}: {err}", flush=True)
    print("GUEST starting registrars", flush=True)
    r1 = xenpool(
        "xenpool-registrar",
        "--asap=sctp:3863",
        "--enrp=sctp:9901",
        f"--peer=sctp:host={IP}:port=9902",
        f"--registrar-id=0x{R1:08x}",
        f"--state-dir={WORK / 'r1'}",
        *XP_TIMERS,
        ready=f"registrar 0x{R1:08x} started",
    )
    rr = rspregistrar(RR, 3864, 9902, [9901, 9903])
    r3 = xenpool(
        "xenpool-registrar",
        "--asap=sctp:3865",
        "--enrp=sctp:9903",
        f"--peer=sctp:host={IP}:port=9901",
        f"--peer=sctp:host={IP}:port=9902",
        f"--registrar-id=0x{R3:08x}",
        f"--state-dir={WORK / 'r3'}",
        *XP_TIMERS,
        ready=f"registrar 0x{R3:08x} started",
    )
    print("GUEST registrars up", flush=True)

    @scenario(1)
    def rsplib_server_and_terminal_through_a_xenpool_registrar():
        rsplib(
            [
                "rspserver",
                "-echo",
                "-poolhandle=EchoPool",
                f"-registrar={IP}:3863",
                "-loglevel=2",
                "-logcolor=off",
            ],
            "rspserver",
        )
        pes = wait(
            "rspserver registered at the xenpool registrar",
            lambda: pool(3863, b"EchoPool"),
        )
        terminal = subprocess.Popen(
            ["rspterminal", "-poolhandle=EchoPool", f"-registrar={IP}:3863"],
            cwd=WORK,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = bytearray()
        threading.Thread(
            target=lambda: [output.extend(line) for line in terminal.stdout],
            daemon=True,
        ).start()
        try:

            def echoed():
                terminal.stdin.write(b"hello-from-rspterminal\n")
                terminal.stdin.flush()
                threading.Event().wait(1)
                return b"hello-from-rspterminal" in output

            wait("rspterminal's line echoed by rspserver", echoed, 60)
        finally:
            terminal.kill()
            terminal.wait()
        return f"PE {list(pes)} in EchoPool, echo received"

    @scenario(2)
    def xenpool_pes_at_rspregistrar_and_a_pu_failing_over():
        pes = {}
        for n in (1, 2):
            pes[n] = xenpool(
                "xenpool-pe",
                f"--registrar=sctp:host={IP}:port=3864",
                f"--voter=sctp:host={IP}:port=3863",
                "--voter-timeout=8",
                "--transport=sctp",
                f"--port={5000 + n}",
                f"--pe-id={n}",
                f"--host=host{n}",
                f"--libvirt-uri=test://{ETC / f'node-host{n}.xml'}",
                "--lease=30",
                "--load-interval=2",
                "--stonith=command",
                f"--stonith-option=command={sys.executable} -m xenpool.tools.fence_process {{pidfile}}",
                f"--fence-map={fence_map}",
                "--shutdown-timeout=2",
                ready="registered in pool Xen",
            )
            (WORK / f"pe{n}.pid").write_text(str(pes[n].proc.pid))
        wait(
            "both xenpool PEs at rspregistrar",
            lambda: set(pool(3864, b"Xen")) == {1, 2},
        )
        pu = run(
            [
                str(Path(sys.executable).with_name("xenpool-pu")),
                "create",
                "--server-id=web1",
                "--ram=100",
                f"--registrar=sctp:host={IP}:port=3864",
                "--heartbeat-interval=0.5",
                "--heartbeat-timeout=2",
            ]
        )
        try:
            pu.wait_for("web1: running", 150)
        except AssertionError:
            for n, pe in pes.items():
                print(f"PE {n} log tail:\n" + pe.drain()[-2500:], flush=True)
            raise
        line = pu.log
        first = (
            int(re.findall(r"PE 0x([0-9a-f]{8})", line)[-1], 16)
            if "PE 0x" in line
            else None
        )
        holder = first or next(
            n for n, pe in pes.items() if "started web1" in pe.drain()
        )
        since = pu.mark()
        pes[holder].kill()
        pu.wait_for("web1: running", 120, since=since)
        survivor = pes[3 - holder]
        wait(
            "web1 restarted on the other PE",
            lambda: "started web1" in survivor.drain() or "web1" in survivor.drain(),
            60,
        )
        scenario2.update(pu=pu, pes=pes, holder=holder)
        return f"VM on PE {holder}, then on PE {3 - holder}"

    scenario2: dict = {}

    @scenario(3)
    def enrp_between_xenpool_and_rspregistrar():
        # every pool is known at every registrar: EchoPool (rspserver at R1) and Xen (at RR)
        wait("EchoPool at rspregistrar", lambda: pool(3864, b"EchoPool"))
        wait(
            "EchoPool at the second xenpool registrar", lambda: pool(3865, b"EchoPool")
        )
        wait(
            "Xen (registered at rspregistrar) at the xenpool registrar",
            lambda: pool(3863, b"Xen"),
        )
        # rspregistrar takes over the PEs of a xenpool registrar that died
        echo = pool(3864, b"EchoPool")
        assert set(echo.values()) == {R1}, echo
        r1.kill()
        wait(
            "rspregistrar took over R1's EchoPool PE",
            lambda: set(pool(3864, b"EchoPool").values()) - {R1},
            60,
        )
        taken = pool(3864, b"EchoPool")
        # a xenpool registrar takes over the PEs of rspregistrar when it dies
        xen = pool(3865, b"Xen")
        assert xen and set(xen.values()) == {RR}, xen
        since = r3.mark()
        rr.kill()
        r3.wait_for("took over", 60, since=since)
        wait(
            "R3 took over rspregistrar's Xen PEs",
            lambda: set(pool(3865, b"Xen").values()) == {R3},
            60,
        )
        return f"EchoPool homes after R1 died: {taken}; Xen homes after rspregistrar died: {pool(3865, b'Xen')}"

    @scenario(4)
    def xenpool_session_and_enrp_over_sctp():
        # the PE-PU session over SCTP through a xenpool registrar (R3, which learned the PEs by ENRP)
        pu = run(
            [
                str(Path(sys.executable).with_name("xenpool-pu")),
                "create",
                "--server-id=web2",
                "--ram=100",
                f"--registrar=sctp:host={IP}:port=3865",
                "--heartbeat-interval=0.5",
            ]
        )
        pu.wait_for("web2: running", 90)
        since = pu.mark()
        threading.Event().wait(
            3
        )  # heartbeats go on over the session (CheckRunning on PPID XPL1)
        assert "lost" not in pu.drain()[since:], "the session broke"
        return "web2 running over an SCTP session, heartbeats answered"

    # 4 runs before 3 (3 kills the registrars) and needs 2's PEs; ``scenarios.py 1 4`` runs some
    order = [
        (1, rsplib_server_and_terminal_through_a_xenpool_registrar),
        (2, xenpool_pes_at_rspregistrar_and_a_pu_failing_over),
        (4, xenpool_session_and_enrp_over_sctp),
        (3, enrp_between_xenpool_and_rspregistrar),
    ]
    for number, run_scenario in order:
        if number in wanted:
            run_scenario()
    for process in started:
        if isinstance(process, Logged):
            for line in process.drain().splitlines():
                # rspregistrar's multicast announces find no route in the guest: not a refusal
                if (
                    re.search(
                        r"invalid|refus|bad |unable|error while parsing", line, re.I
                    )
                    and "send announce" not in line
                ):
                    print(f"REFUSAL {process.name}: {line.strip()[:200]}", flush=True)
    for process in reversed(started):
        try:
            process.kill()
        except Exception:
            pass
    for process in reversed(started):
        # killed, then reaped: their associations are gone before the capture stops
        proc = getattr(process, "proc", None)
        if proc is not None:
            try:
                proc.wait(10)
            except Exception:
                pass
    if capture is not None:
        try:
            capture.finish()
        except Exception as err:
            print(f"CAPTURE FAILED {type(err).__name__}: {err}", flush=True)
    print(
        "SCENARIOS "
        + " ".join(f"{n}={results.get(n, ['NOT RUN'])[0]}" for n in (1, 2, 3, 4)),
        flush=True,
    )


if __name__ == "__main__":
    main({int(n) for n in sys.argv[1:]} or {1, 2, 3, 4})
