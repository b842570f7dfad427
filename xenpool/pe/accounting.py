"""A PE's accounting of its host: RAM, per-VM CPU share, the load it reports. Sans-IO.

Follows the prototype (docs/load-study.md, "The model"), with its bug fixed: free RAM is
total - hypervisor overhead - every guest's RAM - the host's own reserve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..interfaces import LoadSample, NodeInfo


@dataclass(frozen=True)
class LoadSettings:
    sample_interval_s: float = 30.0  # the prototype's loadUpdateIntervall
    smoothing: float = (
        3.0  # the prototype's loadUpdateFaktor: new = (sample + k * old) / (k + 1)
    )
    raise_on_refusal: bool = (
        True  # report load 1 after a refusal for lack of RAM, until the next update
    )
    overhead_mb: float = (
        12.0  # hypervisor overhead: overhead_mb + overhead_kb_per_mb per MB of RAM
    )
    overhead_kb_per_mb: float = 7.0
    host_reserve_mb: float = 0.0  # RAM the host keeps for itself (Domain-0)
    window_samples: int = (
        10  # measurements in a VM's unsmoothed window share (rebalancing)
    )
    # Instead of smoothing: a VM's load is its mean share over the last this many seconds
    # of samples (0: smoothing). A long window sees a steady VM's demand exactly, where
    # smoothing starts from the RAM-share estimate and forgets it slowly.
    load_window_s: float = 0.0
    # Count the time a VM waited for a core (libvirt's vcpu wait/delay, where the hypervisor
    # reports it) as its load: what it wants, not what a crowded host gave it.
    count_cpu_wait: bool = False


@dataclass
class VmUsage:
    ram_kb: int
    cpu_share: float  # smoothed share of all the host's CPUs, 0..1
    last_cpu_ns: int | None = None
    last_sample_at: float | None = None
    samples: int = 0  # CPU measurements so far (0: cpu_share is the RAM-share estimate)
    # (time, cumulative CPU ns) of the recent samples: an unsmoothed mean over a window,
    # free of the start estimate that the smoothed share keeps for a long time
    history: list = field(default_factory=list)


@dataclass
class HostAccounting:
    node: NodeInfo
    settings: LoadSettings = field(default_factory=LoadSettings)
    vms: dict[str, VmUsage] = field(default_factory=dict)
    host_cpu_share: float = 0.0
    raised: bool = False

    @property
    def overhead_kb(self) -> int:
        ram_mb = self.node.ram_kb / 1024
        return round(
            self.settings.overhead_mb * 1024 + self.settings.overhead_kb_per_mb * ram_mb
        )

    @property
    def used_kb(self) -> int:
        return sum(vm.ram_kb for vm in self.vms.values())

    @property
    def free_kb(self) -> int:
        reserve = round(self.settings.host_reserve_mb * 1024)
        return max(0, self.node.ram_kb - self.overhead_kb - reserve - self.used_kb)

    def fits(self, ram_mb: int) -> bool:
        return ram_mb * 1024 <= self.free_kb

    def reserve(self, name: str, ram_mb: int, cpu_share: float | None = None) -> None:
        """Book a VM's RAM before it starts, so concurrent requests cannot overbook.
        Until its CPU is measured, its load is ``cpu_share`` when known (a VM moved here
        carries what its last PE measured), else estimated as its share of the RAM."""
        ram_kb = ram_mb * 1024
        estimate = cpu_share if cpu_share else ram_kb / self.node.ram_kb
        self.vms[name] = VmUsage(ram_kb, cpu_share=estimate)

    def release(self, name: str) -> None:
        self.vms.pop(name, None)

    def refused_for_ram(self) -> None:
        if self.settings.raise_on_refusal:
            self.raised = True

    def _smooth(self, old: float, sample: float) -> float:
        k = self.settings.smoothing
        return (sample + k * old) / (k + 1)

    def sample_vm(
        self, name: str, cpu_ns: int, now: float, wait_ns: int | None = None
    ) -> None:
        """A VM's cumulative CPU time (and, with ``count_cpu_wait``, its cumulative time
        waiting for a core): its share is the delta over the elapsed time and all CPUs,
        smoothed."""
        vm = self.vms.get(name)
        if vm is None:
            return
        if self.settings.count_cpu_wait and wait_ns is not None:
            cpu_ns += wait_ns
        if (
            vm.last_cpu_ns is not None
            and vm.last_sample_at is not None
            and now > vm.last_sample_at
        ):
            share = (cpu_ns - vm.last_cpu_ns) / (
                (now - vm.last_sample_at) * 1e9 * self.node.cpus
            )
            vm.cpu_share = self._smooth(vm.cpu_share, min(max(share, 0.0), 1.0))
            vm.samples += 1
        vm.last_cpu_ns, vm.last_sample_at = cpu_ns, now
        vm.history.append((now, cpu_ns))
        keep = self.settings.window_samples + 1
        window = self.settings.load_window_s
        if window:  # the samples in the window, and at least the one before the newest
            inside = max(2, sum(1 for t, _ in vm.history if t >= now - window))
            keep = max(keep, inside)
        del vm.history[:-keep]
        if window and vm.samples:
            vm.cpu_share = self._share_between(vm.history[-inside], vm.history[-1])

    def _share_between(
        self, first: tuple[float, int], last: tuple[float, int]
    ) -> float:
        (t0, ns0), (t1, ns1) = first, last
        return min(max((ns1 - ns0) / ((t1 - t0) * 1e9 * self.node.cpus), 0.0), 1.0)

    def window_share(self, name: str) -> float | None:
        """A VM's mean share over its last ``window_samples`` measurements, unsmoothed
        (None before its first measurement)."""
        vm = self.vms.get(name)
        if vm is None or len(vm.history) < 2:
            return None
        return self._share_between(
            vm.history[-(self.settings.window_samples + 1) :][0], vm.history[-1]
        )

    def sample_host(self, share: float) -> None:
        """The host's own CPU share (what is not a guest), smoothed."""
        self.host_cpu_share = self._smooth(
            self.host_cpu_share, min(max(share, 0.0), 1.0)
        )

    def sample(self) -> LoadSample:
        used = (
            self.overhead_kb
            + round(self.settings.host_reserve_mb * 1024)
            + self.used_kb
        )
        vm_cpu = {name: vm.cpu_share for name, vm in self.vms.items()}
        return LoadSample(
            cpu=self.host_cpu_share + sum(vm_cpu.values()),
            ram=used / self.node.ram_kb,
            vm_cpu=vm_cpu,
        )

    def load(self, metric) -> float:
        """The load to report: 1 while raised after a refusal, else the metric's value."""
        if self.raised:
            return 1.0
        return min(max(metric.load(self.sample()), 0.0), 1.0)

    def load_updated(self) -> None:
        """A regular load update went out: the temporary raise is over."""
        self.raised = False


class HostCpu:
    """The host's own CPU share (what its guests do not use) from /proc/stat deltas:
    busy / total over the interval, minus the guests' shares."""

    def __init__(self, read=lambda: open("/proc/stat").readline()) -> None:
        self.read = read
        self.last: tuple[int, int] | None = None

    def _sample(self) -> tuple[int, int]:
        fields = [int(v) for v in self.read().split()[1:]]
        user, nice, system, idle, iowait = fields[:5]
        rest = sum(fields[5:8])  # irq, softirq, steal (guest time is already in user)
        busy = user + nice + system + rest
        return busy, busy + idle + iowait

    def share(self, guests: float) -> float | None:
        """The host's own share since the last call (None on the first call)."""
        busy, total = self._sample()
        last, self.last = self.last, (busy, total)
        if last is None or total <= last[1]:
            return None
        return max(0.0, (busy - last[0]) / (total - last[1]) - guests)
