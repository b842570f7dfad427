"""Rebalancing after start (seed open problem 4): move a VM from a hot PE to a cold one."""

from __future__ import annotations

import statistics

from zope.interface import implementer

from xenpool.interfaces import IRebalancer, LoadSample


@implementer(IRebalancer)
class HotToCold:
    """The hottest PE, when it is more than ``threshold`` above the pool's mean load,
    moves the one VM whose departure brings it closest to the mean; the pool policy
    then places that VM on the least used PE. One move per decision, so the pool settles
    step by step rather than everyone shedding at once."""

    name = "hot-cold"

    def __init__(self, threshold: float = 0.05) -> None:
        threshold = float(threshold)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.threshold = threshold

    def choose(self, own: LoadSample, vm_ram: dict, pool_loads: list, metric, ram_total_kb: int):
        if len(pool_loads) < 2:
            return None
        load = metric.load(own)
        mean = statistics.mean(pool_loads)
        if load - mean <= self.threshold or load < max(pool_loads) - 1e-9:
            return None
        coldest = min(pool_loads)
        best, best_gap = None, load - mean  # moving must get closer to the mean than staying
        for name, share in own.vm_cpu.items():
            without = LoadSample(
                cpu=own.cpu - share,
                ram=own.ram - vm_ram.get(name, 0) / ram_total_kb,
                vm_cpu={n: s for n, s in own.vm_cpu.items() if n != name},
            )
            moved = load - metric.load(without)  # what this VM adds to a PE's load
            if coldest + moved >= load:  # it would only make the coldest PE the hottest
                continue
            gap = abs(load - moved - mean)
            if gap < best_gap:
                best, best_gap = name, gap
        return best
