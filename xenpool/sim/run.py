"""One simulated run of a scenario: the real registrar, PE and PU code in one process, on
a virtual clock, connected in memory (every message still goes through the codec).

What is simulated: the hypervisors (guests follow the scenario's load profiles) and the
network (in-memory, no delay). What is real: the handlespace and its policy plugins, the
registrar's ASAP behaviour, the PE core (accounting, load metric plugin, temporary raise,
RAM checks), the PU's VmKeeper (resolution, refusals, retries).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from ..interfaces import NodeInfo
from ..pe.accounting import HostAccounting, LoadSettings
from ..pe.core import PeSettings, PoolElementCore
from ..protocol import messages as M
from ..protocol import params as P
from ..protocol import session as S
from ..pu.core import LOST, PuSettings, State, VmKeeper
from ..registrar.core import Registrar, Timers
from ..registrar.handlespace import Handlespace
from .hypervisor import SimulatedHypervisor

REGISTRAR_ID = 0x51A00001
SETTLED_AFTER_S = 600.0  # "within 10 minutes after the last start"


def _copy(message):
    """Through the codec and back, as the bytes on a wire would be."""
    if isinstance(message, M.Message):
        return M.decode(M.encode(message), message.PPID)
    return S.decode(S.encode(message))


class _ToClient:
    """The registrar's side of an in-memory ASAP association."""

    def __init__(self, deliver) -> None:
        self.deliver = deliver

    def send(self, message: M.Message) -> None:
        self.deliver(_copy(message))

    def send_encoded(self, data: bytes) -> None:
        self.deliver(M.decode(data))

    def close(self) -> None:
        pass


class _PeSide:
    """The PE's side of an in-memory PU session."""

    def __init__(self, deliver) -> None:
        self.deliver = deliver
        self.open = True

    def send(self, message) -> None:
        if self.open:
            self.deliver(_copy(message))

    def close(self) -> None:
        if self.open:
            self.open = False
            self.deliver(LOST)


class _PuSide:
    """The PU's side of an in-memory PE session."""

    def __init__(self, pe: SimPE, deliver) -> None:
        self.pe = pe
        self.peer = _PeSide(deliver)

    def send(self, message) -> None:
        if self.peer.open:
            self.pe.core.handle(_copy(message), self.peer)

    def close(self) -> None:
        if self.peer.open:
            self.peer.open = False
            self.pe.core.session_lost(self.peer)


class _AnswerSide:
    """The asking PE's side of an in-memory PE-to-PE exchange: fires with the first
    answer, or None when the other PE closes without one."""

    def __init__(self) -> None:
        self.answer: defer.Deferred = defer.Deferred()

    def send(self, message) -> None:
        if not self.answer.called:
            self.answer.callback(_copy(message))

    def close(self) -> None:
        if not self.answer.called:
            self.answer.callback(None)


class SimPeers:
    """The rebalancing leader's PeerAsker in memory: the other PE's core handles the
    request as it would one from its session port."""

    def __init__(self, sim: Simulation, identifier: int) -> None:
        self.sim, self.identifier = sim, identifier

    def _ask(self, element: P.PoolElement, message) -> defer.Deferred:
        side = _AnswerSide()
        self.sim.pes[element.identifier].core.handle(_copy(message), side)
        return side.answer

    def report(self, element: P.PoolElement) -> defer.Deferred:
        return self._ask(element, S.VmQuery(self.identifier))

    def move(self, element: P.PoolElement, request: S.MoveRequest) -> defer.Deferred:
        return self._ask(element, request)


class SimPE:
    """A PE host: the real PE core on a simulated hypervisor, registered in memory."""

    def __init__(self, sim: Simulation, spec: dict, identifier: int) -> None:
        self.sim = sim
        self.name = spec["name"]
        self.identifier = identifier
        self.hypervisor = SimulatedHypervisor(
            sim.clock,
            name=self.name,
            cpus=spec["cpus"],
            memory_mb=spec["memory_mb"],
            profiles=sim.busy_seconds,
            rng=random.Random(sim.rng.random()),
            **sim.generator,
        )
        node = NodeInfo(self.name, spec["cpus"], spec["memory_mb"] * 1024)
        self.core = PoolElementCore(
            PeSettings(
                sim.pool_handle,
                identifier,
                host=self.name,
                secret=b"",
                lease_s=0,
                shutdown_timeout_s=1,
            ),
            self.hypervisor,
            HostAccounting(node, sim.load_settings),
            sim.metric,
            sim.clock,
            load_changed=self.load_changed,
        )
        self.core.peers = SimPeers(sim, identifier)
        self.association = _ToClient(self.from_registrar)
        self.transport = P.TcpTransport(5000 + identifier, (f"10.0.0.{identifier}",))
        self._early: IDelayedCall | None = None
        self.register()
        sim.clock.callLater(
            sim.load_settings.sample_interval_s * sim.rng.random(), self._regular_update
        )
        if sim.rebalancer is not None:
            sim.clock.callLater(
                sim.rebalance_interval_s * (1 + sim.rng.random()), self._rebalance
            )

    def register(self) -> None:
        registration = self.core.registration(
            self.sim.policy, self.sim.policy_arguments, self.transport, 3_600_000
        )
        self.sim.registrar.handle(_copy(registration), self.association)

    def from_registrar(self, message: M.Message) -> None:
        if isinstance(message, M.EndpointKeepAlive):
            self.sim.registrar.handle(
                _copy(M.EndpointKeepAliveAck(message.pool_handle, self.identifier)),
                self.association,
            )
        elif isinstance(message, M.RegistrationResponse) and message.reject:
            raise RuntimeError(f"{self.name}: registration refused: {message.error}")

    def load_changed(self) -> None:
        if self._early is None or not self._early.active():
            self._early = self.sim.clock.callLater(0, self.register)

    def _rebalance(self) -> None:
        resolved = self.sim.access.resolve(self.sim.pool_handle, 256)  # fired at once
        elements = cast(list, resolved.result)
        self.core.rebalance(self.sim.rebalancer, elements)  # as the PE daemon does
        self.sim.clock.callLater(self.sim.rebalance_interval_s, self._rebalance)

    def _regular_update(self) -> None:
        self.core.sample_load()  # the simulated hypervisor answers at once
        self.core.accounting.load_updated()
        self.register()
        self.sim.clock.callLater(
            self.sim.load_settings.sample_interval_s, self._regular_update
        )


class SimPoolAccess:
    """What a PU reaches: the registrar and the PEs, in memory."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def resolve(
        self, pool_handle: bytes, items: int, ram_mb: int | None = None
    ) -> defer.Deferred:
        answers: list[M.Message] = []
        self.sim.registrar.handle(
            _copy(M.HandleResolution(pool_handle, items, ram_mb)),
            _ToClient(answers.append),
        )
        answer = cast(M.HandleResolutionResponse, answers[0])  # in memory: at once
        return defer.succeed(list(answer.pool_elements))

    def connect(self, element: P.PoolElement, deliver) -> defer.Deferred:
        return defer.succeed(_PuSide(self.sim.pes[element.identifier], deliver))

    def report_unreachable(self, pool_handle: bytes, identifier: int) -> None:
        self.sim.registrar.handle(
            _copy(M.EndpointUnreachable(pool_handle, identifier)),
            _ToClient(lambda m: None),
        )


@dataclass
class RunResult:
    metric_percent: float
    ram_failed_starts: int
    not_started: int
    moves: int
    per_pe: list[dict] = field(default_factory=list)
    samples_percent: list[float] = field(
        default_factory=list
    )  # each measurement sample, in order
    # The mean of the samples taken 600 s or more after the last start: the pool's state
    # "within 10 minutes" of it, for rebalancing (not the scenario's metric).
    settled_metric_percent: float | None = None


class Simulation:
    def __init__(
        self,
        scenario: dict,
        plugins,
        *,
        load_plugin: str,
        policy: str | None,
        seed: int,
        load_options: dict | None = None,
        pe_overrides: dict | None = None,
        rebalance: str | None = None,
        rebalance_interval_s: float = 120.0,
    ) -> None:
        self.scenario = scenario
        self.clock = Clock()
        self.rng = random.Random(seed)
        self.backoff_rng = random.Random(
            f"pu back-off {seed}"
        )  # its own stream: the runs' other draws stay as they were
        self.pool_handle = scenario.get("pool_handle", "Xen").encode()
        self.types = scenario["vm_types"]
        self.vm_type = {
            start["server_id"]: start["type"] for start in scenario["starts"]
        }
        constants = {**scenario.get("pe_constants", {}), **(pe_overrides or {})}
        self.load_settings = LoadSettings(
            sample_interval_s=constants.get("load_update_interval_s", 30),
            smoothing=constants.get("load_smoothing_factor", 3),
            raise_on_refusal=constants.get("temporary_load_raise", True),
            count_cpu_wait=constants.get("count_cpu_wait", False),
            load_window_s=constants.get("load_window_s", 0.0),
        )
        generator = scenario["load_generator"]
        self.generator = {
            "cycle_s": generator["cycle_s"],
            "jitter": tuple(generator["busy_jitter_s"]),
            "jitter_p": tuple(generator["busy_jitter_p"]),
        }
        self.metric = plugins.create("load", load_plugin, **(load_options or {}))
        self.rebalancer = plugins.create("rebalancer", rebalance) if rebalance else None
        self.rebalance_interval_s = rebalance_interval_s
        name, _, arguments = (policy or scenario.get("policy", "LeastUsed")).partition(
            ":"
        )
        self.policy = plugins.create("policy", name)
        self.policy_arguments = arguments.split(":") if arguments else []
        policies = {
            p.policy_type: p
            for p in (plugins.create("policy", n) for n in plugins.names("policy"))
        }
        handlespace = Handlespace(
            REGISTRAR_ID, policies, rng=random.Random(self.rng.random())
        )
        self.registrar = Registrar(
            handlespace,
            self.clock,
            Timers(keep_alive_interval=60, keep_alive_timeout=30),
        )
        self.registrar.start()
        self.pes = {
            i: SimPE(self, spec, i) for i, spec in enumerate(scenario["pes"], 1)
        }
        self.access = SimPoolAccess(self)
        self.keepers: list[VmKeeper] = []
        self.pu_settings = PuSettings(
            pool_handle=self.pool_handle,
            heartbeat_interval_s=10,
            heartbeat_timeout_s=30,
            retry_initial_s=5,
            retry_max_s=60,
        )

    def busy_seconds(self, server_id: str) -> float:
        return self.types[self.vm_type[server_id]]["busy_s"]

    def _start_vm(self, start: dict) -> None:
        vm = self.types[start["type"]]
        keeper = VmKeeper(
            S.CreateServer(start["server_id"], "", (), vm["ram_mb"]),
            self.access,
            self.clock,
            self.pu_settings,
            rng=self.backoff_rng.random,
        )
        self.keepers.append(keeper)
        keeper.run()

    def run(self) -> RunResult:
        for start in self.scenario["starts"]:
            self.clock.callLater(start["at_s"], self._start_vm, start)
        measurement = self.scenario["measurement"]
        last_start = max(start["at_s"] for start in self.scenario["starts"])
        sample_times = [
            last_start
            + measurement["settle_after_last_start_s"]
            + i * measurement["sample_interval_s"]
            for i in range(measurement["samples"])
        ]
        samples = []
        for at in sample_times:
            self._advance_to(at)
            samples.append(self._deviation())
        settled = [
            v
            for at, v in zip(sample_times, samples)
            if at - last_start >= SETTLED_AFTER_S
        ]
        per_pe = [
            {
                "pe": pe.name,
                "theoretical_cpu_percent": round(
                    pe.hypervisor.theoretical_load() * 100, 1
                ),
                "ram_mb": pe.hypervisor.ram_used_mb(),
                "vms": sorted(pe.hypervisor.guests()),
            }
            for pe in self.pes.values()
        ]
        return RunResult(
            metric_percent=round(statistics.mean(samples), 2),
            ram_failed_starts=sum(
                pe.core.refusals.get(S.ResultCode.NO_RAM, 0) for pe in self.pes.values()
            ),
            not_started=sum(1 for k in self.keepers if k.state != State.RUNNING),
            moves=sum(k.moves for k in self.keepers),
            per_pe=per_pe,
            samples_percent=[round(v, 2) for v in samples],
            settled_metric_percent=round(statistics.mean(settled), 2)
            if settled
            else None,
        )

    def _advance_to(self, at: float) -> None:
        while self.clock.seconds() < at:
            self.clock.advance(min(1.0, at - self.clock.seconds()))

    def _deviation(self) -> float:
        loads = [pe.hypervisor.theoretical_load() for pe in self.pes.values()]
        mean = statistics.mean(loads)
        return statistics.mean(abs(load - mean) for load in loads) * 100
