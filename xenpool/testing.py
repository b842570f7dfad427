"""In-memory fakes of xenpool's contracts for tests (like ``twisted.internet.testing``).

Each fake provides its interface from ``xenpool.interfaces`` (checked with
``verifyObject`` in ``tests/test_testing.py``) or, where the contract is a typing
Protocol, has its methods:

* ``MemoryHypervisor``: an ``IHypervisor`` whose domains are a dict;
* ``RecordingStonith``: an ``IStonith`` that records its targets;
* ``RecordingFencer``: the PE core's ``Fencer`` (``xenpool.pe.core``), recording hosts;
* ``ScriptedPE`` and ``ScriptedPool``: the PU's ``PoolAccess`` (``xenpool.pu.core``)
  with PEs that answer like real ones.

Nothing here runs in a daemon.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from zope.interface import implementer

from .interfaces import (
    RUNNING,
    DomainSpec,
    FenceTarget,
    IHypervisor,
    IStonith,
    NodeInfo,
)
from .protocol import messages as M
from .protocol import params as P
from .protocol import session as S
from .pu.core import LOST

#: The host a MemoryHypervisor is on unless it is given another.
MEMORY_NODE = NodeInfo("memory", cpus=2, ram_kb=1024 * 1024)


class DomainTable(dict):
    """MemoryHypervisor's ``domains``: a dict {name: {"state", "cpu_ns", "spec"}} that is
    also ``IHypervisor.domains()``."""

    def __call__(self) -> defer.Deferred:
        return defer.succeed(
            {name: (d["state"], d["spec"].ram_mb * 1024) for name, d in self.items()}
        )


@implementer(IHypervisor)
class MemoryHypervisor:
    """In-memory stand-in for IHypervisor: a start adds a running domain; ``fail_start``
    makes starts fail with that reason; ``shutdowns`` lists the domains shut down."""

    measures_cpu = True

    def __init__(self, node: NodeInfo = MEMORY_NODE) -> None:
        self.node_information = node
        self.domains = DomainTable()
        self.fail_start: str | None = None
        self.shutdowns: list[str] = []
        self.opened = False
        self.watchers: list[Callable[[str, int], object]] = []

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.opened = False

    def node(self) -> defer.Deferred:
        return defer.succeed(self.node_information)

    def node_info(self) -> NodeInfo:
        return self.node_information

    def free_ram_kb(self) -> defer.Deferred:
        used = sum(d["spec"].ram_mb * 1024 for d in self.domains.values())
        return defer.succeed(max(0, self.node_information.ram_kb - used))

    def start(self, spec: DomainSpec) -> defer.Deferred:
        if self.fail_start:
            return defer.fail(RuntimeError(self.fail_start))
        self.domains[spec.name] = {"state": RUNNING, "cpu_ns": 0, "spec": spec}
        return defer.succeed(None)

    def state(self, name: str) -> defer.Deferred:
        return (
            defer.succeed(self.domains[name]["state"])
            if name in self.domains
            else defer.fail(KeyError(name))
        )

    def cpu_time_ns(self, name: str) -> defer.Deferred:
        return defer.succeed(self.domains[name]["cpu_ns"])

    def cpu_wait_ns(self, name: str) -> defer.Deferred:
        return defer.succeed(None)  # not told

    def shutdown(self, name: str, timeout_s: float) -> defer.Deferred:
        self.shutdowns.append(name)
        self.domains.pop(name, None)
        return defer.succeed(None)

    def destroy(self, name: str) -> defer.Deferred:
        self.domains.pop(name, None)
        return defer.succeed(None)

    def watch(self, callback: Callable[[str, int], object]) -> defer.Deferred:
        """Records ``callback``; fires False: this hypervisor sends no events itself."""
        self.watchers.append(callback)
        return defer.succeed(False)


@implementer(IStonith)
class RecordingStonith:
    """An IStonith that records every target. ``hold``: each fence returns a Deferred
    kept in ``runs`` for the test to fire; else it succeeds, or fails with ``fail``."""

    name = "recording"

    def __init__(self, hold: bool = False, fail: str | None = None) -> None:
        self.hold, self.fail = hold, fail
        self.targets: list[FenceTarget] = []
        self.runs: list[defer.Deferred] = []

    def fence(self, target: FenceTarget) -> defer.Deferred:
        self.targets.append(target)
        if self.hold:
            self.runs.append(defer.Deferred())
            return self.runs[-1]
        if self.fail is not None:
            return defer.fail(RuntimeError(self.fail))
        return defer.succeed(None)


class RecordingFencer:
    """The PE core's Fencer: records the hosts fenced; ``fail`` makes every fence fail."""

    def __init__(self, fail: bool = False) -> None:
        self.fenced: list[str] = []
        self.fail = fail

    def fence(self, host: str, pe_identifier: int = 0) -> defer.Deferred:
        self.fenced.append(host)
        return (
            defer.fail(RuntimeError("agent said: status on"))
            if self.fail
            else defer.succeed(None)
        )


def element(identifier: int) -> P.PoolElement:
    """A pool element with a TCP user transport on 127.0.0.1, port 5000 + identifier."""
    return P.PoolElement(
        identifier,
        1,
        60_000,
        P.TcpTransport(5000 + identifier, ("127.0.0.1",)),
        P.PoolPolicy.make(P.PolicyType.LEAST_USED),
    )


class ScriptedPE:
    """A PE session as the PU sees it, answering like a real PE: a start (or a cookie
    echo) gets a cookie and success, or ``refuse`` as its code; ``silent`` answers
    nothing; ``die()`` ends the session."""

    def __init__(
        self, identifier: int, refuse: int | None = None, silent: bool = False
    ) -> None:
        self.identifier, self.refuse, self.silent = identifier, refuse, silent
        self.received: list = []
        self.deliver: Callable[[object], None] | None = None
        self.closed = False

    def send(self, message: object) -> None:
        self.received.append(message)
        if self.silent or self.deliver is None:
            return
        if isinstance(message, (S.CreateServer, M.CookieEcho)):
            if self.refuse is not None:
                self.deliver(
                    S.CreateResult(
                        "web1", self.refuse, 0, getattr(self, "reason", "no")
                    )
                )
                return
            self.deliver(M.Cookie(f"cookie from {self.identifier}".encode()))
            self.deliver(
                S.CreateResult("web1", 0, 1000, f"started on pe{self.identifier}")
            )
        elif isinstance(message, S.CheckRunning):
            self.deliver(S.CheckRunningResponse("web1", 1))
        elif isinstance(message, S.StopServer):
            self.deliver(S.StopResult("web1", S.ResultCode.NORMAL_END, "shut down"))

    def close(self) -> None:
        self.closed = True

    def die(self) -> None:
        assert self.deliver is not None
        self.deliver(LOST)
        self.deliver = None


class ScriptedPool:
    """The PU's PoolAccess over ScriptedPEs: resolves to every PE not ``down``, connects
    to them, records ``unreachable`` reports."""

    def __init__(self, clock: object, *pes: ScriptedPE) -> None:
        self.clock = clock
        self.pes = {pe.identifier: pe for pe in pes}
        self.unreachable: list[int] = []
        self.down: set[int] = set()

    def resolve(
        self, pool_handle: bytes, items: int, ram_mb: int | None = None
    ) -> defer.Deferred:
        return defer.succeed([element(i) for i in self.pes if i not in self.down])

    def connect(
        self, element: P.PoolElement, deliver: Callable[[object], None]
    ) -> defer.Deferred:
        if element.identifier in self.down:
            return defer.fail(ConnectionRefusedError("refused"))
        pe = self.pes[element.identifier]
        pe.deliver = deliver
        return defer.succeed(pe)

    def report_unreachable(self, pool_handle: bytes, identifier: int) -> None:
        self.unreachable.append(identifier)
