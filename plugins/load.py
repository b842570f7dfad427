"""The prototype's three load definitions (compared in docs/load-study.md)."""

from __future__ import annotations

from zope.interface import implementer

from xenpool.interfaces import ILoadMetric, LoadSample


def _cap(value: float) -> float:
    return min(max(value, 0.0), 1.0)


@implementer(ILoadMetric)
class MaxLoad:
    """max(cpu, ram): the scarcer resource decides."""

    name = "max"

    def load(self, sample: LoadSample) -> float:
        return _cap(max(sample.cpu, sample.ram))


@implementer(ILoadMetric)
class CpuLoad:
    """CPU only; RAM is left to the PE's free-RAM check."""

    name = "cpu"

    def load(self, sample: LoadSample) -> float:
        return _cap(sample.cpu)


@implementer(ILoadMetric)
class WeightedLoad:
    """cpu_weight * cpu + ram_weight * ram (the prototype used 0.75 / 0.25)."""

    name = "weighted"

    def __init__(self, cpu: float = 0.75, ram: float = 0.25) -> None:
        cpu, ram = float(cpu), float(ram)
        if cpu < 0 or ram < 0 or cpu + ram <= 0:
            raise ValueError(
                f"weights must be >= 0 and not both 0, got cpu={cpu}, ram={ram}"
            )
        self.cpu_weight = cpu
        self.ram_weight = ram

    def load(self, sample: LoadSample) -> float:
        return _cap(self.cpu_weight * sample.cpu + self.ram_weight * sample.ram)
