"""One small function per fault kind.

Each takes a :class:`Fault` context, injects its fault and returns the function that
heals it (called after the trial's hold time). The campaign itself then flushes the
namespaces' iptables rules and powers on every host whose PE is gone (killed or fenced),
whatever the kind. Extra findings of a kind go to ``fault.violations``.
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bed import ASAP, ENRP, PE_PORT, STATUS, Node, TestBed

if TYPE_CHECKING:
    from .model import Round


@dataclass
class Fault:
    bed: TestBed
    rng: random.Random
    hold_s: float
    where: Callable[[], dict[str, list[str]]]  # VM -> hosts, the monitor's latest view
    round_after: Callable[
        [float], Round
    ]  # the monitor's first round after a monotonic time
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def busy_pes(self) -> list[Node]:
        """PEs running at least one VM (all PEs when none does), in a stable order."""
        hosts = {h for hs in self.where().values() for h in hs}
        busy = [pe for pe in self.bed.pes if pe.name in hosts]
        return busy or list(self.bed.pes)

    def victim(self) -> Node:
        node = self.rng.choice(self.busy_pes())
        self.notes.append(node.name)
        return node


Heal = Callable[[], None]


def pe_kill(f: Fault) -> Heal:
    victim = f.victim()
    victim.kill()
    return lambda: f.bed.power_on(victim)


def pe_stop(f: Fault) -> Heal:
    victim = f.victim()
    victim.signal(signal.SIGSTOP)
    return lambda: victim.signal(signal.SIGCONT)


def _partition(f: Fault, others: list[Node], direction: str = "both") -> Heal:
    victim = f.victim()
    f.bed.drop(victim, [n for n in others if n is not victim], direction)
    return f.bed.heal_network


def part_keeper(f: Fault) -> Heal:
    return _partition(f, [f.bed.keeper])


def part_keeper_pes(f: Fault) -> Heal:
    return _partition(f, [f.bed.keeper, *f.bed.pes])


def part_registrars(f: Fault) -> Heal:
    return _partition(f, f.bed.registrars)


def part_all(f: Fault) -> Heal:
    return _partition(f, list(f.bed.nodes.values()))


def part_asym(f: Fault) -> Heal:
    direction = f.rng.choice(["in", "out"])
    f.notes.append(f"drops {'incoming' if direction == 'in' else 'outgoing'}")
    return _partition(f, list(f.bed.nodes.values()), direction)


def registrar_kill(f: Fault) -> Heal:
    victim = f.rng.choice(f.bed.registrars)
    f.notes.append(victim.name)
    victim.kill()
    return lambda: f.bed.power_on(victim)


def keeper_kill(f: Fault) -> Heal:
    f.bed.keeper.kill()
    return f.bed.keeper.start


def keeper_kill_pe_kill(f: Fault) -> Heal:
    """kill -9 of a PE and, a moment later, of the keeper: the keeper comes back while the
    host is still off, with cookies naming it, and must get its VMs started elsewhere."""
    victim = f.victim()
    victim.kill()
    delay = f.rng.uniform(0.0, 1.5)
    f.notes.append(f"keeper killed {delay:.2f} s after the PE")
    time.sleep(delay)
    f.bed.keeper.kill()
    f.bed.keeper.start()

    def heal() -> None:
        f.bed.power_on(victim)

    return heal


def keeper_kill_placement(f: Fault) -> Heal:
    """A first placement from scratch (keeper state gone, every host power-cycled), and
    the keeper killed while it places."""
    bed = f.bed
    bed.keeper.kill()
    bed.reset_keeper_state()
    for pe in bed.pes:
        pe.kill()
    for pe in bed.pes:
        pe.start()
    for pe in bed.pes:
        bed.wait_up(pe)
    bed.keeper.start()
    delay = f.rng.uniform(0.1, 1.5)
    f.notes.append(f"keeper killed {delay:.2f} s into the placement")
    time.sleep(delay)
    bed.keeper.kill()
    return bed.keeper.start


def double(f: Fault) -> Heal:
    """kill -9 of one PE and SIGSTOP of another 0.7 s later."""
    candidates = f.busy_pes()
    if len(candidates) < 2:
        candidates = list(f.bed.pes)
    killed, stopped = f.rng.sample(candidates, 2)
    f.notes.append(f"{killed.name} killed, {stopped.name} stopped")
    killed.kill()
    time.sleep(0.7)
    stopped.signal(signal.SIGSTOP)

    def heal() -> None:
        stopped.signal(signal.SIGCONT)
        f.bed.power_on(killed)

    return heal


def corrupt_state(f: Fault) -> Heal:
    bed = f.bed
    bed.keeper.stop()
    cookies = sorted(bed.state_dir.glob("*.cookie"))
    if cookies:
        victim = f.rng.choice(cookies)
        victim.write_bytes(f.rng.randbytes(f.rng.randint(0, 300)))
        f.notes.append(victim.name)
    else:
        f.notes.append("no cookie file to corrupt")
    return bed.keeper.start


def pe_stop_fence_fails(f: Fault) -> Heal:
    """SIGSTOP of a PE whose fence fails (its fence map names no process): its VMs must not
    start elsewhere, the PEs must not hammer the fence, and after SIGCONT its keeper
    takes them back."""
    victim = f.victim()
    pidfile = victim.pidfile
    assert pidfile is not None  # every PE has one (bed.py)
    real = pidfile.read_text()
    pidfile.write_text("not a pid\n")
    victim.signal(signal.SIGSTOP)

    def heal() -> None:
        pidfile.write_text(real)
        victim.signal(signal.SIGCONT)

    return heal


def nbd_away(f: Fault) -> Heal:
    """The NBD server of every VM's disk goes away, and a host dies meanwhile: its VMs
    cannot be started elsewhere (code 12) until the disks are back; the keeper backs off."""
    bed = f.bed
    bed.san.kill()
    victim = f.victim()
    victim.kill()

    def heal() -> None:
        bed.start_node(bed.san)
        bed.power_on(victim)

    return heal


def selftest_broken_fence(f: Fault) -> Heal:
    """Breaks fencing on purpose: the victim's pidfile names a process that is gone, so a
    fence of it "succeeds" while it only sleeps (SIGSTOP). Its VMs get started elsewhere:
    invariant (a) must flag a double start. At heal the victim is really powered off."""
    victim = f.victim()
    pidfile = victim.pidfile
    assert pidfile is not None  # every PE has one (bed.py)
    real = pidfile.read_text()
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile.write_text(str(gone.pid))
    victim.signal(signal.SIGSTOP)

    def heal() -> None:
        pidfile.write_text(real)
        victim.kill()

    return heal


# ------------------------------------------------------------------ garbage


def garbage_payloads(rng: random.Random) -> list[bytes]:
    """Random bytes and truncated or lying frames of every framing xenpool speaks."""
    return [
        rng.randbytes(rng.randint(1, 4096)),
        bytes([rng.choice([1, 3, 5, 0x0B, 0x0C]), 0])
        + struct.pack("!H", 512)
        + rng.randbytes(10),  # ASAP/ENRP, truncated
        bytes([0x01, 0])
        + struct.pack("!H", 0xFFFF)
        + rng.randbytes(100),  # claims 64 KB
        bytes([0x07, 0]) + struct.pack("!H", 2),  # length below the header
        struct.pack("!II", 11, 1 << 30)
        + rng.randbytes(50),  # session shim: a 1 GB frame
        struct.pack("!II", 12, 40) + rng.randbytes(20),  # session shim, truncated
        struct.pack("!II", rng.randrange(2**32), 8) + rng.randbytes(8),  # unknown PPID
        b"GET /" + rng.randbytes(64) + b" HTTP/1.1\r\n",  # a torn HTTP request
        b"POST /status HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
        + rng.randbytes(100),
    ]


def _targets(bed: TestBed) -> list[tuple[str, str, int]]:
    out = []
    for r in bed.registrars:
        out += [
            (r.name, r.address, ASAP),
            (r.name, r.address, ENRP),
            (r.name, r.address, STATUS),
        ]
    for pe in bed.pes:
        out += [(pe.name, pe.address, PE_PORT), (pe.name, pe.address, STATUS)]
    out.append(("keeper", bed.keeper.address, STATUS))
    return out


def garbage(f: Fault) -> Heal:
    bed = f.bed
    before = f.where()
    stop = threading.Event()
    held: list[socket.socket] = []
    sent = [0]

    def spray() -> None:
        while not stop.is_set():
            for _name, address, port in _targets(bed):
                for payload in garbage_payloads(f.rng):
                    if stop.is_set():
                        return
                    try:
                        s = socket.create_connection((address, port), timeout=0.5)
                        s.sendall(payload)
                        sent[0] += 1
                        if len(held) < 40 and f.rng.random() < 0.2:
                            held.append(s)  # left half-open until the heal
                        else:
                            if f.rng.random() < 0.3:  # abort: RST instead of FIN
                                s.setsockopt(
                                    socket.SOL_SOCKET,
                                    socket.SO_LINGER,
                                    struct.pack("ii", 1, 0),
                                )
                            s.close()
                    except OSError:
                        pass

    thread = threading.Thread(target=spray, daemon=True)
    thread.start()

    registrations = [0]
    pe_ids = {pe.extra["pe_id"] for pe in bed.pes}

    def watch() -> None:  # no registration may be lost while the garbage flies
        while not stop.is_set():
            rnd = f.round_after(time.monotonic())
            for name, known in rnd.registrars.items():
                if known is not None and not pe_ids <= known and registrations[0] < 5:
                    registrations[0] += 1
                    f.violations.append(
                        f"garbage: registrar {name} lost PEs {sorted(pe_ids - known)}"
                    )

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def heal() -> None:
        stop.set()
        thread.join(10)
        watcher.join(15)
        for s in held:
            s.close()
        f.notes.append(f"{sent[0]} garbage messages")
        for node in bed.daemons:
            if node.proc is not None and not node.alive():
                f.violations.append(
                    f"garbage: {node.name} died ({node.proc.returncode})"
                )
        after = f.where()
        for vm, hosts in before.items():
            if after.get(vm) != hosts:
                f.violations.append(
                    f"garbage: {vm} moved from {hosts} to {after.get(vm)}"
                )

    return heal


FAULTS: dict[str, Callable[[Fault], Heal]] = {
    "pe-kill": pe_kill,
    "pe-stop": pe_stop,
    "pe-stop-fence-fails": pe_stop_fence_fails,
    "part-keeper": part_keeper,
    "part-keeper-pes": part_keeper_pes,
    "part-registrars": part_registrars,
    "part-all": part_all,
    "part-asym": part_asym,
    "registrar-kill": registrar_kill,
    "keeper-kill": keeper_kill,
    "keeper-kill-placement": keeper_kill_placement,
    "keeper-kill-pe-kill": keeper_kill_pe_kill,
    "double": double,
    "corrupt-state": corrupt_state,
    "garbage": garbage,
    "nbd-away": nbd_away,
    "selftest-broken-fence": selftest_broken_fence,
}
