"""ENRP between registrars that share a secret: signed messages only.

Unit tests of the signature, of an ENRP connection and of the multicast announces (no
reactor), and end to end: two real registrars with the secret share their PEs, while a
client without it that speaks ENRP to one of them is cut off and adds nothing."""

from __future__ import annotations

import random
import socket

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.protocol.errors import Cause
from xenpool.registrar import enrp_auth
from xenpool.registrar.handlespace import Handlespace
from xenpool.registrar.peering import Peering
from xenpool.registrar.service import EnrpMulticast, EnrpProtocol, Metrics

from . import pcapcheck
from .daemons import AsapClient, Daemon, element, free_port, poll, resolvable
from .pcapcheck import Frame, tshark_fields, tshark_malformed, write_pcap

SECRET = b"the registrars' shared secret"
POLICIES = {
    p.policy_type: p
    for p in (lambda pl: (pl.create("policy", n) for n in pl.names("policy")))(
        load_plugins()
    )
}


def presence(sender: int = 0x20) -> M.Presence:
    return M.Presence(
        sender,
        0x10,
        0,
        P.ServerInformation(sender, P.TcpTransport(9901, ("10.0.0.2",))),
    )


def update(identifier: int = 7, sender: int = 0x20) -> M.HandleUpdate:
    return M.HandleUpdate(
        sender, 0x10, M.UpdateAction.ADD_PE, b"Xen", element(identifier)
    )


# ---------------------------------------------------------------- the signature


def test_a_signed_message_verifies_and_decodes_as_before():
    frame = M.encode(update())
    signed = enrp_auth.sign(frame, SECRET)
    assert len(signed) == len(frame) + enrp_auth.TRAILER_SIZE and int.from_bytes(
        signed[2:4], "big"
    ) == len(signed)
    assert enrp_auth.verify(signed, SECRET) == frame
    # A registrar without the secret skips the parameter (type 0x8045: skip if unknown).
    assert M.decode(signed, M.ENRP_PPID) == update()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda f: f,  # not signed at all
        lambda f: enrp_auth.sign(f, b"another secret entirely"),
        lambda f: (lambda s: s[:12] + bytes([s[12] ^ 1]) + s[13:])(
            enrp_auth.sign(f, SECRET)
        ),  # altered
        lambda f: enrp_auth.sign(f, SECRET)[:-1],  # cut short
        lambda f: b"",
    ],
    ids=["unsigned", "other secret", "altered", "cut", "empty"],
)
def test_anything_else_does_not_verify(mangle):
    assert enrp_auth.verify(mangle(M.encode(update())), SECRET) is None


# ---------------------------------------------------------- an ENRP connection


@pytest.fixture
def connection():
    space = Handlespace(0x10, POLICIES, rng=random.Random(1))
    peering = Peering(space, Clock())
    protocol = EnrpProtocol(
        peering, False, idle_timeout=0, metrics=Metrics(space), secret=SECRET
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    yield protocol, transport, space, peering
    protocol.connectionLost()


def test_signed_messages_are_taken_and_answers_go_out_signed(connection):
    protocol, transport, space, peering = connection
    protocol.dataReceived(
        enrp_auth.sign(M.encode(presence()), SECRET)
        + enrp_auth.sign(M.encode(update()), SECRET)
    )
    assert 0x20 in peering.peers and space.get(b"Xen", 7) is not None
    sent = transport.value()
    assert (
        sent
        and enrp_auth.verify(sent[: int.from_bytes(sent[2:4], "big")], SECRET)
        is not None
    )
    assert not transport.disconnecting


def test_an_unsigned_message_closes_the_connection_and_changes_nothing(connection):
    protocol, transport, space, peering = connection
    protocol.dataReceived(
        M.encode(update()) + enrp_auth.sign(M.encode(update(8)), SECRET)
    )
    assert (
        transport.disconnecting
        and space.get(b"Xen", 7) is None
        and space.get(b"Xen", 8) is None
    )
    assert not peering.peers and transport.value() == b""
    assert (
        protocol.metrics.errors.labels(
            Cause(Cause.SECURITY_REJECTION).name.lower()
        )._value.get()
        == 1
    )


def test_multicast_presences_must_be_signed_too():
    dialled = []
    space = Handlespace(0x10, POLICIES, rng=random.Random(1))
    multicast = EnrpMulticast(
        Peering(space, Clock()),
        Clock(),
        "239.0.0.51",
        9901,
        interval_s=1,
        interface="",
        ttl=1,
        connect=lambda host, port: dialled.append((host, port)),
        secret=SECRET,
    )
    multicast.datagramReceived(M.encode(presence(0x20)), ("10.0.0.2", 9901))
    assert dialled == []
    multicast.datagramReceived(
        enrp_auth.sign(M.encode(presence(0x30)), SECRET), ("10.0.0.3", 9901)
    )
    assert dialled == [("10.0.0.2", 9901)]  # the address in its Server Information


# ----------------------------------------------------------------- end to end


@pytest.mark.slow
def test_registrars_with_the_secret_share_pes_and_a_stranger_adds_none(tmp_path):
    secret = tmp_path / "enrp.secret"
    secret.write_bytes(SECRET + b"\n")
    ports = {
        n: {"asap": free_port(), "enrp": free_port(), "status": free_port()}
        for n in (1, 2)
    }
    ids = {1: 0x0A0A0D01, 2: 0x0A0A0D02}
    daemons = []
    try:
        for n in (1, 2):
            peers = (
                [f"--peer=tcp:host=127.0.0.1:port={ports[1]['enrp']}"] if n == 2 else []
            )
            daemon = Daemon(
                "xenpool-registrar",
                f"--asap=tcp:{ports[n]['asap']}:interface=127.0.0.1",
                f"--enrp=tcp:{ports[n]['enrp']}:interface=127.0.0.1",
                f"--status=tcp:{ports[n]['status']}:interface=127.0.0.1",
                f"--registrar-id={ids[n]:#x}",
                "--peer-heartbeat-interval=0.2",
                f"--enrp-secret={secret}",
                *peers,
                ready=f"registrar {ids[n]:#010x} started",
                cwd=tmp_path,
            )
            daemon.ports = ports[n]
            daemons.append(daemon)
        first, second = daemons
        second.wait_for(f"ENRP peer {ids[1]:#010x} is up")
        pe = AsapClient(first.ports["asap"])
        assert not pe.request(M.Registration(b"Xen", element(1))).reject
        assert poll(lambda: resolvable(second), lambda pes: pes == {1}) == {
            1
        }  # the signed HANDLE_UPDATE came

        # A stranger speaks ENRP to the first without the secret: cut off, nothing added.
        since = len(first.log)
        with socket.create_connection(
            ("127.0.0.1", ports[1]["enrp"]), timeout=10
        ) as stranger:
            stranger.sendall(
                M.encode(
                    M.HandleUpdate(
                        0x666, ids[1], M.UpdateAction.ADD_PE, b"Xen", element(66)
                    )
                )
            )
            assert stranger.recv(65536) == b""  # closed without an answer
        first.wait_for("without valid authentication: closing", since=since)
        assert resolvable(first) == {1} and resolvable(second) == {1}
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


@pytest.mark.skipif(not pcapcheck.tshark_available(), reason="tshark not installed")
def test_wireshark_reads_a_signed_message_as_the_message_plus_an_unknown_parameter(
    tmp_path,
):
    path = tmp_path / "signed.pcap"
    signed = enrp_auth.sign(M.encode(presence()), SECRET)
    write_pcap(path, [Frame(signed, transport="sctp", ppid=M.ENRP_PPID, dst_port=9901)])
    [packet] = tshark_fields(
        path, ["enrp.message_type", "enrp.sender_servers_id", "enrp.parameter_type"]
    )
    assert packet["enrp.message_type"] == ["1"] and packet[
        "enrp.sender_servers_id"
    ] == ["0x00000020"]
    assert "0x8045" in packet["enrp.parameter_type"]
    assert tshark_malformed(path) == []
