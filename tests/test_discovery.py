"""Finding registrars by their multicast SERVER_ANNOUNCEs.

Unit tests on a Clock for the sans-IO directory and the endpoints; end to end, a real
registrar announcing on loopback multicast and a PE and a PU that know no registrar
address: the PE registers, the PU gets a VM, and when that registrar dies the PE
registers at the other one it heard."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from xenpool.discovery import (
    AnnouncedRegistrars,
    AnnounceListener,
    FailoverEndpoint,
    Registrars,
    multicast_address,
)
from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.registrar.handlespace import Handlespace
from xenpool.registrar.peering import Peering
from xenpool.registrar.service import EnrpMulticast
from xenpool.tools import processes

from . import pcapcheck
from .daemons import AsapClient, Daemon, free_port, poll
from .pcapcheck import tshark_fields, tshark_malformed

ETC = Path(__file__).parents[1] / "etc" / "xenpool"
POLICIES = {
    p.policy_type: p
    for p in (lambda pl: (pl.create("policy", n) for n in pl.names("policy")))(
        load_plugins()
    )
}


def announce(server_id: int, port: int, *addresses: str) -> M.ServerAnnounce:
    return M.ServerAnnounce(
        server_id, (P.TcpTransport(port, addresses or ("0.0.0.0",)),)
    )


# ------------------------------------------------------------------ sans-IO


def test_announced_registrars_are_kept_until_they_fall_silent():
    heard = AnnouncedRegistrars(timeout_s=5)
    assert heard.heard(announce(1, 3863, "10.0.0.1"), "10.0.0.1", now=0)
    assert heard.heard(
        announce(2, 3864), "10.0.0.2", now=3
    )  # 0.0.0.0: the sender's address
    assert heard.alive(now=4) == [("10.0.0.1", 3863), ("10.0.0.2", 3864)]
    heard.heard(announce(1, 3863, "10.0.0.1"), "10.0.0.1", now=4)
    assert heard.alive(now=8.5) == [("10.0.0.1", 3863)]  # 2 last heard at 3
    assert heard.alive(now=9.5) == []


def test_a_registrar_that_moves_is_found_at_its_new_address():
    heard = AnnouncedRegistrars()
    heard.heard(announce(1, 3863, "10.0.0.1"), "10.0.0.1", now=0)
    heard.heard(announce(1, 4000, "10.0.0.9"), "10.0.0.9", now=1)
    assert heard.alive(now=1) == [("10.0.0.9", 4000)]


def test_an_announce_without_a_tcp_transport_is_not_taken():
    heard = AnnouncedRegistrars()
    udp_only = M.ServerAnnounce(1, (P.UdpTransport(3863, ("10.0.0.1",)),))
    assert not heard.heard(udp_only, "10.0.0.1", now=0)
    assert heard.alive(now=0) == []


def test_the_listener_takes_announces_and_drops_everything_else():
    clock = Clock()
    heard = AnnouncedRegistrars()
    listener = AnnounceListener(heard, "239.0.0.50", clock)
    listener.datagramReceived(
        b"\x0c\x00\x00\x03garbage", ("10.0.0.7", 5000)
    )  # bad length
    listener.datagramReceived(
        M.encode(M.HandleResolution(b"Xen")), ("10.0.0.7", 5000)
    )  # not an announce
    listener.datagramReceived(
        M.encode(M.ServerAnnounce(7, (P.UdpTransport(1, ("10.0.0.7",)),))),
        ("10.0.0.7", 5000),
    )
    assert heard.alive(0) == []
    clock.advance(2)
    listener.datagramReceived(M.encode(announce(7, 3863)), ("10.0.0.7", 5000))
    clock.advance(4)
    assert heard.alive(clock.seconds()) == [("10.0.0.7", 3863)]


@pytest.mark.parametrize(
    "text, expected",
    [("239.0.0.50:3863", ("239.0.0.50", 3863)), ("239.1.2.3", ("239.1.2.3", 3863))],
)
def test_multicast_addresses(text, expected):
    assert multicast_address(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("10.0.0.1:3863", "not a multicast group"),
        ("239.0.0.50:0", "port must be"),
        ("pr1:3863", "GROUP:PORT"),
        ("239.0.0.50:x", "port must be"),
    ],
)
def test_bad_multicast_addresses_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        multicast_address(text)


def test_configured_registrars_come_before_announced_ones():
    reactor = MemoryReactorClock()
    heard = AnnouncedRegistrars()
    registrars = Registrars(reactor, ["tcp:host=10.0.0.1:port=3863"], heard)
    heard.heard(announce(2, 3900, "10.0.0.2"), "10.0.0.2", now=0)
    found = registrars.endpoints()
    assert [(e._host, e._port) for e in found] == [
        ("10.0.0.1", 3863),
        ("10.0.0.2", 3900),
    ]


def test_failover_endpoint_fails_clearly_until_a_registrar_is_heard_then_tries_each_in_turn():
    reactor = MemoryReactorClock()
    heard = AnnouncedRegistrars()
    endpoint = FailoverEndpoint(Registrars(reactor, [], heard))
    failure = []
    endpoint.connect(object()).addErrback(failure.append)
    assert (
        failure
        and failure[0].check(error.ConnectError)
        and "none announced yet" in str(failure[0].value)
    )
    heard.heard(announce(1, 3863, "10.0.0.1"), "10.0.0.1", now=0)
    heard.heard(announce(2, 3863, "10.0.0.2"), "10.0.0.2", now=0)
    for expected in ("10.0.0.1", "10.0.0.2", "10.0.0.1"):
        endpoint.connect(object()).addErrback(lambda f: None)
        host, port, factory, timeout, bind = reactor.tcpClients[-1]
        assert host == expected
        factory.clientConnectionFailed(
            reactor.connectors[-1], Failure(error.ConnectionRefusedError())
        )


# ----------------------------------------------------------------- end to end


def _loopback_multicast() -> bool:
    return (
        "MULTICAST"
        in subprocess.run(
            ["ip", "link", "show", "lo"], capture_output=True, text=True
        ).stdout
    )


@pytest.fixture(scope="module")
def multicast_loopback():
    """Multicast on the loopback interface, which Linux leaves off by default: switched
    on for these tests when running as root, and back off after."""
    if _loopback_multicast():
        yield
        return
    if processes.os.geteuid() != 0:
        pytest.skip(
            "loopback has no MULTICAST flag; run as root or `ip link set lo multicast on`"
        )
    subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=True)
    yield
    subprocess.run(["ip", "link", "set", "lo", "multicast", "off"], check=False)


def registrar_daemon(cwd, registrar_id: int, group: str) -> Daemon:
    asap = free_port()
    daemon = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--registrar-id={registrar_id:#x}",
        f"--announce={group}",
        "--announce-interface=127.0.0.1",
        "--announce-interval=0.2",
        ready=f"registrar {registrar_id:#010x} started",
        cwd=cwd,
    )
    daemon.asap = asap
    return daemon


@pytest.mark.slow
def test_a_pe_and_a_pu_find_registrars_by_their_announces(multicast_loopback, tmp_path):
    group = f"239.0.0.50:{free_port()}"
    first = registrar_daemon(tmp_path, 0x0A0A0A01, group)
    daemons = [first]
    try:
        pe_port = free_port()
        pe = Daemon(
            "xenpool-pe",
            f"--registrar-announce={group}",
            "--announce-interface=127.0.0.1",
            "--pe-id=7",
            f"--port={pe_port}",
            "--bind=127.0.0.1",
            "--host=host1",
            f"--libvirt-uri=test://{ETC / 'node-host1.xml'}",
            "--load-interval=3600",
            "--lease=0",
            ready="registered in pool Xen",
            cwd=tmp_path,
        )
        daemons.append(pe)
        assert (
            f"connected to registrar IPv4Address(type='TCP', host='127.0.0.1', port={first.asap})"
            in pe.log
        )
        answer = AsapClient(first.asap).request(M.HandleResolution(b"Xen"))
        assert [e.identifier for e in answer.pool_elements] == [7]

        pu = processes.Process(
            [
                str(Path(sys.executable).with_name("xenpool-pu")),
                "create",
                "--server-id",
                "found1",
                "--ram",
                "64",
                f"--registrar-announce={group}",
                "--announce-interface=127.0.0.1",
                "--heartbeat-interval=0.5",
            ],
            cwd=tmp_path,
        )
        try:
            pu.wait_for("found1: running: on PE")
        finally:
            pu.stop()

        # The first registrar dies; a second one announces; the PE registers there.
        second = registrar_daemon(tmp_path, 0x0A0A0A02, group)
        daemons.append(second)
        since = len(pe.log)
        first.kill()
        pe.wait_for("registered in pool Xen", since=since)
        answer = AsapClient(second.asap).request(M.HandleResolution(b"Xen"))
        assert [e.identifier for e in answer.pool_elements] == [7]
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


# ------------------------------------------------------ ENRP peers by multicast


def peering(server_id: int) -> Peering:
    handlespace = Handlespace(server_id, POLICIES, rng=random.Random(1))
    return Peering(
        handlespace,
        Clock(),
        P.ServerInformation(server_id, P.TcpTransport(9901, ("0.0.0.0",))),
    )


def presence(
    sender: int, port: int = 9901, *addresses: str, info_id: int | None = None
) -> M.Presence:
    info = P.ServerInformation(
        sender if info_id is None else info_id,
        P.TcpTransport(port, addresses or ("0.0.0.0",)),
    )
    return M.Presence(sender, 0, 0, info)


def test_the_lower_id_connects_to_a_peer_heard_by_multicast():
    low, high = peering(0x10), peering(0x20)
    assert low.discovered(high.announcement(), "10.0.0.2") == (
        "10.0.0.2",
        9901,
    )  # 0.0.0.0: the source
    assert (
        high.discovered(low.announcement(), "10.0.0.1") is None
    )  # the other one connects
    assert low.discovered(presence(0x30, 9902, "10.0.0.3"), "10.9.9.9") == (
        "10.0.0.3",
        9902,
    )


def test_known_self_and_unreachable_presences_are_not_dialled():
    me = peering(0x10)
    me.handle(presence(0x20), channel=Channel())  # now a peer
    assert me.discovered(presence(0x20), "10.0.0.2") is None
    assert me.discovered(presence(0x10), "10.0.0.1") is None  # our own echo
    assert (
        me.discovered(M.Presence(0x30, 0, 0), "10.0.0.3") is None
    )  # no Server Information
    assert (
        me.discovered(presence(0x30, info_id=0x31), "10.0.0.3") is None
    )  # information of someone else
    assert (
        me.discovered(
            M.Presence(
                0x30, 0, 0, P.ServerInformation(0x30, P.UdpTransport(1, ("10.0.0.3",)))
            ),
            "x",
        )
        is None
    )


class Channel:
    def __init__(self) -> None:
        self.sent: list[M.Message] = []

    def send(self, message: M.Message) -> None:
        self.sent.append(message)


def test_enrp_multicast_dials_each_announced_peer_once_and_drops_garbage():
    dialled = []
    multicast = EnrpMulticast(
        peering(0x10),
        Clock(),
        "239.0.0.51",
        9901,
        interval_s=1,
        interface="",
        ttl=1,
        connect=lambda host, port: dialled.append((host, port)),
    )
    multicast.datagramReceived(b"\x01\x00\x00\x02", ("10.0.0.9", 9901))  # bad length
    multicast.datagramReceived(
        M.encode(M.ListRequest(0x20, 0)), ("10.0.0.9", 9901)
    )  # not a presence
    for _ in range(3):
        multicast.datagramReceived(M.encode(presence(0x20)), ("10.0.0.2", 9901))
    assert dialled == [("10.0.0.2", 9901)]
    multicast.MAX_DIALLED = 2
    for sender in range(0x30, 0x40):  # a flood of forged presences
        multicast.datagramReceived(
            M.encode(presence(sender, 10000 + sender)), ("10.0.0.66", 9901)
        )
    assert len(dialled) == 2


@pytest.mark.slow
def test_registrars_find_their_enrp_peers_by_multicast(multicast_loopback, tmp_path):
    group = f"239.0.0.51:{free_port()}"
    daemons = []
    try:
        for registrar_id in (0x0A0A0B01, 0x0A0A0B02):
            asap, enrp = free_port(), free_port()
            daemon = Daemon(
                "xenpool-registrar",
                f"--asap=tcp:{asap}:interface=127.0.0.1",
                f"--enrp=tcp:{enrp}:interface=127.0.0.1",
                f"--registrar-id={registrar_id:#x}",
                f"--enrp-announce={group}",
                "--announce-interface=127.0.0.1",
                "--peer-heartbeat-interval=0.3",
                ready=f"registrar {registrar_id:#010x} started",
                cwd=tmp_path,
            )
            daemon.asap = asap
            daemons.append(daemon)
        first, second = daemons
        first.wait_for("ENRP peer 0x0a0a0b02 announced at 127.0.0.1")
        second.wait_for("ENRP peer 0x0a0a0b01 is up")
        pe = AsapClient(first.asap)
        element = P.PoolElement(
            9,
            0,
            60_000,
            P.TcpTransport(5009, ("127.0.0.1",)),
            P.PoolPolicy.make(P.PolicyType.LEAST_USED),
        )
        assert not pe.request(M.Registration(b"Xen", element)).reject

        def resolution():
            client = AsapClient(second.asap)
            try:
                return client.request(M.HandleResolution(b"Xen"))
            finally:
                client.close()

        answer = poll(  # the HANDLE_UPDATE is on its way
            resolution,
            lambda answer: (
                isinstance(answer, M.HandleResolutionResponse) and answer.pool_elements
            ),
        )
        assert [e.identifier for e in answer.pool_elements] == [9]
        assert "announced at" not in second.log  # the higher ID waited to be called
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


@pytest.mark.slow
@pytest.mark.skipif(not pcapcheck.tshark_available(), reason="tshark not installed")
def test_wireshark_decodes_the_announces_a_registrar_sends(
    multicast_loopback, tmp_path
):
    """Captured off loopback on the standard groups and ports, where Wireshark's
    dissectors look without being told: a SERVER_ANNOUNCE and a PRESENCE naming the
    registrar's real ASAP and ENRP ports, nothing malformed."""
    capture = tmp_path / "announces.pcap"
    tshark = processes.Process(
        [
            pcapcheck.TSHARK,
            "-i",
            "lo",
            "-f",
            "udp and (dst host 239.0.0.50 or dst host 239.0.0.51)",
            "-c",
            "4",
            "-a",
            "duration:30",
            "-w",
            str(capture),
        ],
    )
    registrar = None
    try:
        tshark.wait_for("Capturing on")
        asap, enrp = free_port(), free_port()
        registrar = Daemon(
            "xenpool-registrar",
            f"--asap=tcp:{asap}:interface=127.0.0.1",
            f"--enrp=tcp:{enrp}:interface=127.0.0.1",
            "--registrar-id=0x0a0a0c01",
            "--announce=239.0.0.50:3863",
            "--enrp-announce=239.0.0.51:9901",
            "--announce-interface=127.0.0.1",
            "--announce-interval=0.2",
            "--peer-heartbeat-interval=0.2",
            ready="registrar 0x0a0a0c01 started",
            cwd=tmp_path,
        )
        assert tshark.proc.wait(timeout=30) == 0
    finally:
        if registrar is not None:
            registrar.stop()
        tshark.stop()
    fields = [
        "asap.message_type",
        "asap.server_identifier",
        "asap.tcp_transport_port",
        "enrp.message_type",
        "enrp.sender_servers_id",
        "enrp.server_information_server_identifier",
        "enrp.tcp_transport_port",
    ]
    packets = tshark_fields(capture, fields)
    announces = [p for p in packets if p["asap.message_type"] == ["10"]]
    presences = [p for p in packets if p["enrp.message_type"] == ["1"]]
    assert announces and presences and len(announces) + len(presences) == 4
    assert all(
        p["asap.server_identifier"] == ["0x0a0a0c01"]
        and p["asap.tcp_transport_port"] == [str(asap)]
        for p in announces
    )
    assert all(
        p["enrp.server_information_server_identifier"] == ["0x0a0a0c01"]
        for p in presences
    )
    assert all(p["enrp.tcp_transport_port"] == [str(enrp)] for p in presences)
    assert tshark_malformed(capture) == []
