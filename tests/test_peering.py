"""ENRP peering between registrars, in memory on one Clock."""

from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock

from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.registrar.core import Registrar, Timers
from xenpool.registrar.handlespace import Handlespace
from xenpool.registrar.peering import TABLE_CHUNK, Peering, PeerTimers

TIMERS = PeerTimers(heartbeat_interval=1, peer_timeout=3, takeover_timeout=3)


@pytest.fixture(scope="module")
def policies():
    plugins = load_plugins()
    return {
        p.policy_type: p
        for p in (plugins.create("policy", n) for n in plugins.names("policy"))
    }


class Wire:
    """One direction of an in-memory ENRP connection: goes through the codec and
    arrives a little later (LATENCY), unless either end is down."""

    LATENCY = 0.01

    def __init__(
        self, network: Network, frm: int, to: int, back: Wire | None = None
    ) -> None:
        self.network, self.frm, self.to, self.back = network, frm, to, back

    def send(self, message: M.Message) -> None:
        if self.frm in self.network.down or self.to in self.network.down:
            return
        decoded = M.decode(M.encode(message), M.ENRP_PPID)
        self.network.sent.append(decoded)
        self.network.clock.callLater(self.LATENCY, self._deliver, decoded)

    def _deliver(self, message: M.Message) -> None:
        if self.frm not in self.network.down and self.to not in self.network.down:
            self.network.nodes[self.to].peering.handle(message, self.back)


class Node:
    def __init__(self, server_id: int, clock: Clock, policies) -> None:
        self.handlespace = Handlespace(
            server_id, policies, rng=random.Random(server_id)
        )
        self.peering = Peering(self.handlespace, clock, timers=TIMERS)
        self.registrar = Registrar(
            self.handlespace, clock, Timers(1000, 1000, 1000), observers=[self.peering]
        )


class Network:
    def __init__(self, ids, policies) -> None:
        self.clock = Clock()
        self.nodes = {i: Node(i, self.clock, policies) for i in ids}
        self.down: set[int] = set()
        self.sent: list[M.Message] = []

    def connect(self, a: int, b: int) -> None:
        """a connects to b (a's --peer is b)."""
        to_b = Wire(self, a, b)
        to_a = Wire(self, b, a, back=to_b)
        to_b.back = to_a
        self.nodes[a].peering.channel_opened(to_b)

    def start(self) -> None:
        for node in self.nodes.values():
            node.peering.start()
            node.registrar.start()

    def kill(self, server_id: int) -> None:
        """The registrar's process is gone: it neither sends nor receives."""
        self.down.add(server_id)
        self.nodes[server_id].peering.stop()
        self.nodes[server_id].registrar.stop()

    def run(self, seconds: float, step: float = 0.005) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)


class Association:
    def __init__(self) -> None:
        self.sent = []

    def send(self, message) -> None:
        self.sent.append(message)

    def send_encoded(self, data: bytes) -> None:
        self.sent.append(M.decode(data))

    def close(self) -> None:
        pass


def element(identifier: int) -> P.PoolElement:
    return P.PoolElement(
        identifier,
        0,
        600_000,
        P.TcpTransport(5000 + identifier, ("127.0.0.1",)),
        P.PoolPolicy.make(P.PolicyType.LEAST_USED),
    )


def homes(node: Node) -> dict[int, int]:
    return {e.identifier: e.home_registrar for e in node.handlespace.entries()}


@pytest.fixture
def net(policies):
    network = Network((1, 2, 3), policies)
    network.start()
    network.connect(2, 1)
    network.connect(3, 1)
    network.connect(3, 2)
    network.run(1)
    return network


def register(node: Node, identifier: int, association=None) -> Association:
    association = association or Association()
    node.registrar.handle(M.Registration(b"Xen", element(identifier)), association)
    node.peering.clock.advance(2 * Wire.LATENCY)  # let the update reach the peers
    return association


def test_every_registrar_knows_every_peer(net):
    for i, node in net.nodes.items():
        assert set(node.peering.peers) == {1, 2, 3} - {i}


def test_registrations_and_removals_spread(net):
    pe = register(net.nodes[1], 7)
    assert homes(net.nodes[2]) == {7: 1} and homes(net.nodes[3]) == {7: 1}
    net.nodes[1].registrar.handle(M.Deregistration(b"Xen", 7), pe)
    net.run(2 * Wire.LATENCY)
    assert homes(net.nodes[2]) == {} and homes(net.nodes[3]) == {}


def test_a_silent_peer_is_taken_over_once(net):
    for i in range(1, 6):
        register(net.nodes[1], i)
    net.kill(1)
    net.run(TIMERS.peer_timeout + TIMERS.heartbeat_interval + 1)
    takeovers = {
        (m.sender_id, m.target_id) for m in net.sent if isinstance(m, M.TakeoverServer)
    }
    assert len(takeovers) == 1
    ((new_home, target),) = takeovers
    assert target == 1 and new_home in (2, 3)
    for n in (2, 3):
        assert homes(net.nodes[n]) == {i: new_home for i in range(1, 6)}, n
        assert net.nodes[n].peering.peers.get(1) is None


def test_simultaneous_takeovers_the_higher_id_wins(net):
    register(net.nodes[1], 1)
    net.kill(1)
    # both start before either hears the other
    net.nodes[2].peering._start_takeover(1)
    net.nodes[3].peering._start_takeover(1)
    net.run(TIMERS.takeover_timeout + 1)
    takeovers = {
        (m.sender_id, m.target_id) for m in net.sent if isinstance(m, M.TakeoverServer)
    }
    assert takeovers == {(3, 1)}
    assert homes(net.nodes[2]) == {1: 3} and homes(net.nodes[3]) == {1: 3}


def test_a_late_peer_is_not_taken_over(net):
    register(net.nodes[1], 1)
    net.down.add(1)
    net.run(TIMERS.peer_timeout - 1)
    net.down.clear()
    net.run(3)
    assert homes(net.nodes[2]) == {1: 1}
    assert not [m for m in net.sent if isinstance(m, M.TakeoverServer)]


def test_a_restarted_registrar_resyncs(net, policies):
    for i in range(1, TABLE_CHUNK + 10):  # more than one HANDLE_TABLE_RESPONSE part
        register(net.nodes[2], i)
    net.nodes[3] = Node(3, net.clock, policies)
    net.nodes[3].peering.start()
    net.connect(3, 2)
    net.run(2)
    assert homes(net.nodes[3]) == {i: 2 for i in range(1, TABLE_CHUNK + 10)}
    parts = [
        m
        for m in net.sent
        if isinstance(m, M.HandleTableResponse)
        and m.receiver_id == 3
        and m.sender_id == 2
    ]
    assert any(m.more_to_send for m in parts)


def test_a_checksum_mismatch_triggers_a_resync(net):
    register(net.nodes[1], 1)
    # node 2 loses the entry without being told (a lost update)
    net.nodes[2].handlespace.deregister(b"Xen", 1)
    net.run(TIMERS.heartbeat_interval * 2)
    assert homes(net.nodes[2]) == {1: 1}


def test_a_peer_cannot_override_a_pe_homed_here(net):
    local = register(net.nodes[2], 9)
    foreign = P.PoolElement(
        9,
        1,
        600_000,
        P.TcpTransport(5009, ("127.0.0.1",)),
        P.PoolPolicy.make(P.PolicyType.LEAST_USED),
    )
    net.nodes[2].peering.handle(
        M.HandleUpdate(1, 2, M.UpdateAction.ADD_PE, b"Xen", foreign), Wire(net, 2, 1)
    )
    entry = net.nodes[2].handlespace.get(b"Xen", 9)
    assert entry.home_registrar == 2 and entry.owner is local
