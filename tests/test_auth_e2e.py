"""Who may ask, end to end: every port over TLS with client certificates a CA signed
(registrars' ASAP and ENRP, PEs' session ports, the PE->registrar, PU->registrar,
PU->PE, PE->PE and registrar->peer connections), a pool secret at the registrar, PU
proofs at the PEs (--pu-access). A keeper and a PU with its certificate's name keep
their VMs; a stranger with network access (and even one holding a certificate from the
pool's CA) tries to register a PE, create, stop, adopt and move VMs and read cookies,
and gets nothing. Real twistd processes, libvirt's test driver.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import sys
import urllib.request
from pathlib import Path

import pytest

from xenpool.protocol import framing
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol import session as S
from xenpool.protocol.errors import Cause
from xenpool.tools.processes import Process

from .certs import Authority
from .daemons import Daemon, free_port

pytestmark = pytest.mark.slow
ETC = Path(__file__).parents[1] / "etc" / "xenpool"
R1, R2 = 0x0A0A0A01, 0x0A0A0A02


def get_json(port: int, path: str):
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}{path}", timeout=10
    ) as response:
        return json.load(response)


def listens_on_loopback_only(port: int) -> bool:
    """From /proc/net/tcp: every listening socket on ``port`` is bound to 127.0.0.1."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.append(address)
    return bool(found) and all(a == "0100007F" for a in found)


class Client:
    """A stranger's blocking connection: plain TCP, or TLS with a certificate."""

    def __init__(self, port: int, ca: Path | None = None, cert=None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        if ca is not None:
            context = ssl.create_default_context(cafile=str(ca / "ca.pem"))
            if cert is not None:
                context.load_cert_chain(str(cert[0]), str(cert[1]))
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.asap = framing.RSerPoolStream(M.ASAP_PPID)
        self.shim = framing.ShimStream()

    def ask(self, message: M.Message) -> M.Message:
        self.sock.sendall(M.encode(message))
        while (answer := self.asap.next_message()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.asap.feed(data)
        return answer

    def session(self, *messages, until: type = S.CreateResult) -> list:
        """Send ``messages`` as session frames; everything received up to ``until``."""
        for message in messages:
            self.sock.sendall(framing.frame_message(message))
        received: list = []
        while not received or not isinstance(received[-1], until):
            while (item := self.shim.next_message()) is None:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed after {received}")
                self.shim.feed(data)
            received.append(item[1])
        return received

    def shut_out(self, message: object) -> bool:
        """Sent ``message``; the peer closes the connection (or fails the handshake)
        without a word."""
        try:
            self.sock.sendall(framing.frame_message(message))
            return self.sock.recv(65536) == b""
        except (ssl.SSLError, ConnectionError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pool(tmp_path):
    ca = Authority(tmp_path / "pki")
    pem = {
        name: ca.issue(name)
        for name in ("pr1", "pr2", "host1", "host2", "keeper", "ops", "mallory")
    }
    stranger_ca = Authority(tmp_path / "stranger", "stranger CA")
    forged = stranger_ca.issue("keeper")  # a self-signed "keeper"

    def server(port: int, name: str) -> str:
        cert, key = pem[name]
        return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCertsDir={ca.trust}"

    def client(port: int, name: str) -> str:
        cert, key = pem[name]
        return f"tls:host=127.0.0.1:port={port}:trustRoots={ca.trust}:certificate={cert}:privateKey={key}"

    def pe_tls(name: str) -> str:
        cert, key = pem[name]
        return f"--pe-tls=trustRoots={ca.trust}:certificate={cert}:privateKey={key}"

    (tmp_path / "pool.secret").write_text("the auth test's pool secret\n")
    (tmp_path / "keeper.secret").write_text("the keeper's own secret, not the pool's\n")
    (tmp_path / "pu-access.conf").write_text(
        "[pu keeper]\nsecret-file = keeper.secret\nvms = web*\n\n[pu ops]\nvms = db*\n"
    )
    (tmp_path / "vms.conf").write_text(
        "".join(f"[vm web{i}]\nram = 100\nips = 10.0.5.{i}\n" for i in (1, 2))
    )
    ports = {
        name: free_port()
        for name in (
            "asap1",
            "enrp1",
            "enrp2",
            "asap2",
            "status1",
            "s1",
            "s2",
            "st1",
            "st2",
            "keeper",
        )
    }
    daemons = []
    try:
        daemons.append(
            Daemon(
                "xenpool-registrar",
                f"--asap={server(ports['asap2'], 'pr2')}",
                f"--enrp={server(ports['enrp2'], 'pr2')}",
                f"--registrar-id={R2:#x}",
                "--peer-heartbeat-interval=0.2",
                ready=f"registrar {R2:#010x} started",
                cwd=tmp_path,
            )
        )
        r1 = Daemon(
            "xenpool-registrar",
            f"--asap={server(ports['asap1'], 'pr1')}",
            f"--enrp={server(ports['enrp1'], 'pr1')}",
            f"--peer={client(ports['enrp2'], 'pr1')}",
            f"--status=tcp:{ports['status1']}",
            f"--registrar-id={R1:#x}",
            f"--pool-secret=Xen:{tmp_path / 'pool.secret'}",
            "--peer-heartbeat-interval=0.2",
            ready=f"registrar {R1:#010x} started",
            cwd=tmp_path,
        )
        daemons.append(r1)
        pes = {}
        for n in (1, 2):
            pes[n] = Daemon(
                "xenpool-pe",
                f"--registrar={client(ports['asap1'], f'host{n}')}",
                f"--pe-id={n}",
                f"--listen={server(ports[f's{n}'], f'host{n}')}",
                "--address=127.0.0.1",
                pe_tls(f"host{n}"),
                f"--pu-access={tmp_path / 'pu-access.conf'}",
                f"--host=host{n}",
                f"--libvirt-uri=test://{ETC / f'node-host{n}.xml'}",
                f"--status=tcp:{ports[f'st{n}']}",
                f"--pool-secret-file={tmp_path / 'pool.secret'}",
                "--stonith=manual",
                f"--stonith-option=state_dir={tmp_path / f'manual{n}'}",
                "--shutdown-timeout=2",
                ready="registered in pool Xen",
                cwd=tmp_path,
            )
            daemons.append(pes[n])
        keeper = Daemon(
            "xenpool-pu",
            f"--keep={tmp_path / 'vms.conf'}",
            f"--registrar={client(ports['asap1'], 'keeper')}",
            pe_tls("keeper"),
            "--pu-name=keeper",
            f"--pu-secret-file={tmp_path / 'keeper.secret'}",
            f"--state-dir={tmp_path / 'keeper'}",
            f"--status=tcp:{ports['keeper']}",
            ready="web2: running",
            cwd=tmp_path,
            timeout=30,
        )
        daemons.append(keeper)
        keeper.wait_for("web1: running")
        yield {
            "dir": tmp_path,
            "ca": ca,
            "pem": pem,
            "forged": forged,
            "ports": ports,
            "registrars": daemons[:2],
            "pes": pes,
            "keeper": keeper,
            "client": client,
            "pe_tls": pe_tls,
        }
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def domains(pool) -> dict[int, set[str]]:
    return {
        n: set(get_json(pool["ports"][f"st{n}"], "/status")["domains"])
        for n in pool["pes"]
    }


def test_tls_everywhere_and_a_stranger_gets_nothing(pool):
    ports, ca, pem = pool["ports"], pool["ca"], pool["pem"]
    r2 = pool["registrars"][0]
    r2.wait_for(f"ENRP peer {R1:#010x} is up")  # registrar -> peer over TLS

    # A PU proven by its certificate's CN (ops may manage db*), through the real CLI.
    cli = Process(
        [
            str(Path(sys.executable).with_name("xenpool-pu")),
            "create",
            "--server-id=db1",
            "--ram=100",
            f"--registrar={pool['client'](ports['asap1'], 'ops')}",
            pool["pe_tls"]("ops"),
        ],
        pool["dir"],
    )
    cli.wait_for("db1: running", timeout=30)
    before = domains(pool)
    assert sorted(v for names in before.values() for v in names) == [
        "db1",
        "web1",
        "web2",
    ]
    cli.proc.send_signal(signal.SIGINT)  # ops stops its VM: a proven stop
    assert cli.proc.wait(timeout=30) == 0, cli.drain()
    before = domains(pool)
    assert sorted(v for names in before.values() for v in names) == ["web1", "web2"]
    home = {name: n for n, names in before.items() for name in names}
    keeper_vms = {vm["server_id"]: vm["pe"] for vm in get_json(ports["keeper"], "/vms")}
    cookie = (pool["dir"] / "keeper" / "web1.cookie").read_bytes()  # a stolen cookie
    keeper_mark = pool["keeper"].mark()

    # --- the stranger -----------------------------------------------------------------
    # Without a certificate of the pool's CA, no port even talks: plain TCP, TLS without
    # a client certificate, a self-signed certificate named "keeper".
    for port in (ports["asap1"], ports["s1"], ports["enrp1"]):
        assert Client(port).shut_out(M.HandleResolution(b"Xen", 10))
        assert Client(port, ca.trust).shut_out(S.CreateServer("web9", "", (), 100))
        assert Client(port, ca.trust, pool["forged"]).shut_out(
            S.CreateServer("web9", "", (), 100)
        )

    # With a certificate the CA signed (a stolen host certificate, say) it reaches them:
    # registering a PE in pool Xen without the pool secret is refused ...
    mallory = Client(ports["asap1"], ca.trust, pem["mallory"])
    fake = P.PoolElement(
        0x66,
        0,
        60_000,
        P.TcpTransport(ports["s2"], ("127.0.0.1",)),
        P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=0),
    )
    for proof in (None, P.registration_mac(b"a guessed pool secret", b"Xen", fake)):
        answer = mallory.ask(M.Registration(b"Xen", fake, proof))
        assert answer.reject
        assert answer.error.causes[0].code == Cause.SECURITY_REJECTION
    # ... and so is taking a real PE out of it
    answer = mallory.ask(M.Deregistration(b"Xen", 1))
    assert answer.error.causes[0].code == Cause.SECURITY_REJECTION
    listed = mallory.ask(M.HandleResolution(b"Xen", 10))
    assert sorted(e.identifier for e in listed.pool_elements) == [1, 2]
    mallory.close()

    def at(n: int) -> Client:
        return Client(ports[f"s{n}"], ca.trust, pem["mallory"])

    web1 = home["web1"]
    wrong_proof = S.PuProof("keeper", 0, 1, b"\0" * 32)
    attempts = {
        "create": [S.CreateServer("web9", "", (), 100)],
        "create as keeper, wrong secret": [
            wrong_proof,
            S.CreateServer("web9", "", (), 100),
        ],
        "create a VM ops may": [S.CreateServer("db2", "", (), 100)],
        "create web1 again (its cookie)": [
            S.CreateServer("web1", "", ("10.0.5.1",), 100)
        ],
        "adopt with a stolen cookie": [M.CookieEcho(cookie)],
    }
    for what, messages in attempts.items():
        for n in (1, 2):
            client = at(n)
            received = client.session(*messages)
            client.close()
            assert [m.code for m in received] == [S.ResultCode.NOT_AUTHORIZED], (
                what,
                received,
            )
            assert not any(isinstance(m, M.Cookie) for m in received), what
    client = at(web1)  # stop the keeper's VM where it runs
    stopped = client.session(S.StopServer("web1"), until=S.StopResult)
    assert [m.code for m in stopped] == [S.ResultCode.NOT_AUTHORIZED]
    moved = client.session(
        S.MoveRequest(0x66, "web1", 3 - web1, b"", None, 0), until=S.MoveAnswer
    )
    assert not moved[-1].moved
    client.close()

    # Nothing was created, nothing stopped, nothing moved; the keeper saw nothing.
    assert domains(pool) == before
    assert {
        vm["server_id"]: vm["pe"] for vm in get_json(ports["keeper"], "/vms")
    } == keeper_vms
    assert "lost" not in pool["keeper"].drain()[keeper_mark:]
    for pe in pool["pes"].values():
        log = pe.drain()
        assert "refused an unproven request" in log
        # PE -> PE over TLS: every claim query before a start was answered
        assert "claim query" not in log, log

    # Status pages listen on localhost unless told otherwise.
    for name in ("status1", "st1", "st2", "keeper"):
        assert listens_on_loopback_only(ports[name]), name
