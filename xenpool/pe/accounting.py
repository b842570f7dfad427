"""A PE's accounting of its host: RAM, per-VM CPU share, the load it reports. Sans-IO.

Follows the prototype (THESIS-NOTES, "PE behaviour"), with its bug fixed: free RAM is
total - hypervisor overhead - every guest's RAM - the host's own reserve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..interfaces import LoadSample, NodeInfo


@dataclass(frozen=True)
class LoadSettings:
    sample_interval_s: float = 30.0  # the prototype's loadUpdateIntervall
    smoothing: float = 3.0  # the prototype's loadUpdateFaktor: new = (sample + k * old) / (k + 1)
    raise_on_refusal: bool = True  # report load 1 after a refusal for lack of RAM, until the next update
    overhead_mb: float = 12.0  # hypervisor overhead: overhead_mb + overhead_kb_per_mb per MB of RAM
    overhead_kb_per_mb: float = 7.0
    host_reserve_mb: float = 0.0  # RAM the host keeps for itself (Domain-0)


@dataclass
class VmUsage:
    ram_kb: int
    cpu_share: float  # smoothed share of all the host's CPUs, 0..1
    last_cpu_ns: int | None = None
    last_sample_at: float | None = None
    samples: int = 0  # CPU measurements so far (0: cpu_share is the RAM-share estimate)


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
        return round(self.settings.overhead_mb * 1024 + self.settings.overhead_kb_per_mb * ram_mb)

    @property
    def used_kb(self) -> int:
        return sum(vm.ram_kb for vm in self.vms.values())

    @property
    def free_kb(self) -> int:
        reserve = round(self.settings.host_reserve_mb * 1024)
        return max(0, self.node.ram_kb - self.overhead_kb - reserve - self.used_kb)

    def fits(self, ram_mb: int) -> bool:
        return ram_mb * 1024 <= self.free_kb

    def reserve(self, name: str, ram_mb: int) -> None:
        """Book a VM's RAM before it starts, so concurrent requests cannot overbook.
        Until its CPU is measured, its load is estimated as its share of the RAM."""
        ram_kb = ram_mb * 1024
        self.vms[name] = VmUsage(ram_kb, cpu_share=ram_kb / self.node.ram_kb)

    def release(self, name: str) -> None:
        self.vms.pop(name, None)

    def refused_for_ram(self) -> None:
        if self.settings.raise_on_refusal:
            self.raised = True

    def _smooth(self, old: float, sample: float) -> float:
        k = self.settings.smoothing
        return (sample + k * old) / (k + 1)

    def sample_vm(self, name: str, cpu_ns: int, now: float) -> None:
        """A VM's cumulative CPU time: its share is the delta over the elapsed time
        and all CPUs, smoothed."""
        vm = self.vms.get(name)
        if vm is None:
            return
        if vm.last_cpu_ns is not None and vm.last_sample_at is not None and now > vm.last_sample_at:
            share = (cpu_ns - vm.last_cpu_ns) / ((now - vm.last_sample_at) * 1e9 * self.node.cpus)
            vm.cpu_share = self._smooth(vm.cpu_share, min(max(share, 0.0), 1.0))
            vm.samples += 1
        vm.last_cpu_ns, vm.last_sample_at = cpu_ns, now

    def sample_host(self, share: float) -> None:
        """The host's own CPU share (what is not a guest), smoothed."""
        self.host_cpu_share = self._smooth(self.host_cpu_share, min(max(share, 0.0), 1.0))

    def sample(self) -> LoadSample:
        used = self.overhead_kb + round(self.settings.host_reserve_mb * 1024) + self.used_kb
        vm_cpu = {name: vm.cpu_share for name, vm in self.vms.items()}
        return LoadSample(cpu=self.host_cpu_share + sum(vm_cpu.values()), ram=used / self.node.ram_kb, vm_cpu=vm_cpu)

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

    def __init__(self, read=lambda: open("/proc/stat").readline()) -> None:  # noqa: SIM115 - one line
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
