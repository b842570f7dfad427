"""The contracts between xenpool's core and its plugins (zope.interface).

The core only ever talks to these. A plugin registers a *factory* (usually a class) by
name through a hook in ``xenpool.hookspecs``; the plugin manager checks the factory with
``verifyClass`` when it is loaded and every object it makes with ``verifyObject``.

Methods that do I/O (fencing, storage checks, hypervisor calls) return Deferreds; the
others are plain, side-effect free functions of their arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    import random as _random

    from twisted.internet.defer import Deferred

    from .protocol.params import PoolPolicy


@dataclass(frozen=True, slots=True)
class LoadSample:
    """What a PE measured, smoothed, as fractions of the host's capacity.

    ``cpu``: host's own share plus every VM's share of all CPUs (may exceed 1 while
    overcommitted); ``ram``: used / total; ``vm_cpu``: each VM's share, by name.
    """

    cpu: float
    ram: float
    vm_cpu: dict[str, float] = field(default_factory=dict)


class ILoadMetric(Interface):
    """Turns a PE's measured load into the one number it reports to its registrar."""

    name = Attribute("The name operators select it by (``--load-plugin NAME``).")

    def load(sample: LoadSample) -> float:
        """The load to report, in [0, 1] (the caller clamps anything outside)."""


class IPoolSelection(Interface):
    """One pool's selection state inside a registrar, for one policy."""

    def update(identifier: int, policy: PoolPolicy) -> None:
        """Add PE ``identifier`` or change its policy parameter (a PoolPolicy)."""

    def remove(identifier: int) -> None:
        """Forget PE ``identifier``; unknown identifiers are ignored."""

    def select(count: int) -> list[int]:
        """Up to ``count`` distinct PE identifiers, best first, by the policy."""


class IPoolPolicy(Interface):
    """A pool member selection policy (RFC 5525 or an extension)."""

    name = Attribute("rsplib-style name, e.g. ``LeastUsed``.")
    policy_type = Attribute("The 32-bit policy type code on the wire.")

    def make_parameter(load: float, arguments: list[str]) -> object:
        """The PoolPolicy parameter a PE registers with, from its current load and the
        policy's arguments as written after the name (``LeastUsedDegradation:0.05``).
        Raises ValueError naming the bad argument."""

    def new_selection(random: _random.Random) -> IPoolSelection:
        """Fresh selection state for one pool; ``random`` is a ``random.Random``."""


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One PE of the pool as a registrar's resolution answer shows it."""

    load: float
    free_ram_kb: int | None = (
        None  # known where the pool's policy carries it (LeastUsedFreeRAM)
    )
    own: bool = False  # the PE that is deciding


class IRebalancer(Interface):
    """Decides, on one PE, which VM (if any) to move away so the pool evens out."""

    name = Attribute("The name a PE selects it by (``--rebalance NAME``).")
    min_samples = Attribute(
        "CPU measurements a VM needs before it may be moved (before, its share is a guess)."
    )
    cooldown_s = Attribute("Seconds a PE waits after a move before it decides again.")

    def choose(
        own: LoadSample, vm_ram: dict, pool: list, metric: object, ram_total_kb: int
    ) -> object:
        """The server ID to move off this PE now, or None. ``own``: this PE's sample
        (``vm_cpu`` has the share of each VM that may move, measured over a recent
        window); ``vm_ram``: each VM's RAM in KB; ``pool``: a PoolMember for every PE
        of the pool (this one included, marked ``own``, with the load it reports now);
        ``metric``: the ILoadMetric that turns samples into those loads."""


@dataclass(frozen=True, slots=True)
class PlannedVm:
    """One VM as the rebalancing leader sees it. ``cpu_cores``: its measured demand;
    ``movable``: a PU holds it, it is measured enough and was not moved lately."""

    server_id: str
    cpu_cores: float
    ram_kb: int
    movable: bool = True


@dataclass(frozen=True, slots=True)
class PlannedPe:
    """One PE of the pool as its VmReport shows it. ``base_cores``: CPU used beside
    the listed VMs."""

    identifier: int
    cpus: int
    free_ram_kb: int
    vms: tuple[PlannedVm, ...] = ()
    base_cores: float = 0.0

    @property
    def load(self) -> float:
        return (self.base_cores + sum(vm.cpu_cores for vm in self.vms)) / self.cpus


@dataclass(frozen=True, slots=True)
class Move:
    """Move VM ``server_id`` from PE ``source`` to PE ``target``."""

    server_id: str
    source: int
    target: int


class IPoolPlanner(IRebalancer):
    """A rebalancer that plans for the whole pool on one PE, the leader (the pool's
    lowest PE identifier), from every PE's VM report; ``choose`` is never asked then.
    ``cooldown_s`` is how long a moved VM stays where it went."""

    quiet_rounds = Attribute(
        "Rounds the pool's set of VMs must stay the same before the leader plans."
    )

    def plan(pool: list) -> list:
        """The Moves to make, in order, for ``pool`` (a PlannedPe per PE): each one must
        fit in the RAM its target has free after the moves before it. [] to leave
        the pool as it is."""


@dataclass(frozen=True, slots=True)
class FenceTarget:
    """Whom to fence: a host identity from a cookie, mapped through the PE config.
    ``pe_identifier``: the pool element that ran there, from the same cookie (0: not
    known); only providers that ask the pool about it (``watchdog``) need it."""

    host: str
    options: dict[str, str] = field(default_factory=dict)
    pe_identifier: int = 0


class IStonith(Interface):
    """Shoot The Other Node In The Head: make sure a host runs nothing any more."""

    name = Attribute("The name a PE config selects it by.")

    def fence(target: FenceTarget) -> Deferred[None]:
        """Power the target off and confirm it is off. Returns a Deferred that fires
        with None once it is off, or fails (never a start after a failed fence)."""


class IOperatorConfirmed(IStonith):
    """A stonith provider that fences by an operator's word (``manual``): ``xenpool
    fence-confirm HOST`` records through it that the operator saw ``host`` is off."""

    def confirm(host: str) -> object:
        """Record that an operator confirmed ``host`` is off, so its next fence succeeds
        (once); returns where it was recorded. Raises ValueError or OSError naming the problem."""


class ISelfFencing(IStonith):
    """A stonith provider whose hosts fence themselves (``watchdog``): every PE configured
    with it feeds a watchdog while the registrars confirm its registrations, and a fence
    asks the pool whether the old host's PE is still registered. The PE daemon wires it:
    ``attach`` before the reactor runs, the feeder as a child service, and a registration
    refresh at least every ``refresh_interval_s``."""

    refresh_interval_s = Attribute(
        "The longest a PE may go without sending a registration (refresh)."
    )

    def attach(membership: Any, holds_vms: Callable[[], bool]) -> None:
        """``membership.registered(pe_identifier)``: a Deferred firing True or False, or
        failing when the pool cannot tell; ``holds_vms()``: whether the PE runs or keeps
        any VM now (a clean stop may disarm the watchdog only when it does not)."""

    def feeder(clock: object) -> object:
        """The feeding service (an IService) of this PE, with the device opened (raises
        OSError or ValueError naming the problem); it is told of registrations:
        ``sent(channel)``, ``answered(channel, accepted)``, ``lost(channel)``."""


class DiskSpecError(ValueError):
    """A disk spec that cannot be used; the message (one line) names the problem. Raised by
    ``IStorage.parse`` and by the PE's dispatch of a spec to its storage plugin."""


@dataclass(frozen=True, slots=True)
class Disk:
    """A parsed disk spec: its scheme and the parts the storage plugin needs."""

    scheme: str
    spec: str
    parts: dict[str, str] = field(default_factory=dict)


class IStorage(Interface):
    """Turns a disk spec from a create request into something libvirt can attach."""

    name = Attribute("The plugin's name.")
    schemes = Attribute("Disk spec schemes it handles, e.g. ('nbd',).")

    def parse(spec: str) -> Disk:
        """Parse and validate ``spec``; raises ValueError naming the problem."""

    def check(disk: Disk) -> Deferred[None]:
        """A Deferred firing None when the disk is reachable, failing when not."""

    def domain_xml(disk: Disk, target: str) -> str:
        """The libvirt ``<disk>`` element attaching ``disk`` as device ``target``."""

    def release(disk: Disk) -> Deferred[None]:
        """A Deferred firing once the disk is released after its VM stopped."""


# libvirt domain states (virDomainState): what IHypervisor.state and domains report.
NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN, SHUTOFF, CRASHED, PMSUSPENDED = range(8)
#: States of a domain that exists and may run: it is "running" for a PE.
NORMAL_STATES = {NOSTATE, RUNNING, BLOCKED, PAUSED}
STATE_NAMES = (
    "nostate",
    "running",
    "blocked",
    "paused",
    "shutdown",
    "shutoff",
    "crashed",
    "pmsuspended",
)


def state_name(state: int) -> str:
    """A libvirt domain state by name (``running``, not 1), for logs and status output."""
    return STATE_NAMES[state] if 0 <= state < len(STATE_NAMES) else f"state {state}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    hostname: str
    cpus: int
    ram_kb: int


@dataclass(frozen=True, slots=True)
class DomainSpec:
    name: str
    ram_mb: int
    vcpus: int
    disk_xml: str
    ips: tuple[str, ...] = ()


class IHypervisor(Interface):
    """A host's hypervisor. Every method returns a Deferred: calls may block (libvirt),
    so implementations run them off the reactor thread (except ``node_info``)."""

    measures_cpu = Attribute(
        "True when cpu_time_ns is the CPU time a guest received; False where it is not load "
        "(libvirt's test driver reports wall-clock time): a PE then keeps each VM's estimate."
    )

    def open() -> None:
        """Make ready what calls need (threads, a connection); idempotent. The PE calls
        it when its service starts; a call made before opens it too."""

    def close() -> None:
        """Release that again (blocks briefly; meant for shutdown); a later call opens anew."""

    def node() -> Deferred[NodeInfo]:
        """NodeInfo of this host."""

    def node_info() -> NodeInfo:
        """NodeInfo of this host, blocking: asked once before the reactor runs, because
        the PE's accounting needs the host's CPUs and RAM to start. Raises with the
        hypervisor's own message when it cannot be reached."""

    def free_ram_kb() -> Deferred[int]:
        """RAM left for new guests, in KB."""

    def domains() -> Deferred[dict[str, tuple[int, int]]]:
        """{name: (state, ram_kb)} of every domain that is running (or paused, ...)."""

    def start(spec: DomainSpec) -> Deferred[object]:
        """Define and start a domain; fails if it cannot. (Not the service lifecycle:
        that is ``open``/``close``.)"""

    def state(name: str) -> Deferred[int]:
        """The libvirt domain state (int), or fails if the domain is unknown."""

    def cpu_time_ns(name: str) -> Deferred[int]:
        """Cumulative CPU time of the domain in nanoseconds."""

    def cpu_wait_ns(name: str) -> Deferred[int | None]:
        """Cumulative time the domain's vCPUs waited for a core, in nanoseconds; None
        where the hypervisor does not tell (a PE counts it with ``count_cpu_wait``)."""

    def shutdown(name: str, timeout_s: float) -> Deferred[object]:
        """Ask the guest to shut down; destroy it if it has not after ``timeout_s``."""

    def destroy(name: str) -> Deferred[object]:
        """Stop the domain at once."""

    def watch(callback: Callable[[str, int], object]) -> Deferred[bool]:
        """Call ``callback(name, state)`` on every lifecycle event, where supported; fires
        True once events flow, False where the hypervisor has none."""


class ILiveMigration(Interface):
    """An IHypervisor that may move a running domain to another host's hypervisor
    without stopping it. Optional: a PE moves VMs by stop-and-restart without it."""

    live_migration = Attribute(
        "True when this hypervisor can live-migrate at all (known once connected)."
    )

    def migrate(name: str, destination_uri: str) -> Deferred[None]:
        """Live-migrate domain ``name`` to the hypervisor at ``destination_uri``. The
        Deferred fires once it runs there and is gone here; it fails with
        MigrationUnsupported where the hypervisor cannot, else with the reason (the
        domain then normally still runs here)."""


class MigrationUnsupported(Exception):
    """The hypervisor (or this pair of hypervisors) cannot live-migrate."""
