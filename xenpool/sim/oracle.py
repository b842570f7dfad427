"""The greedy placement bound: what a policy that knew every VM's true CPU demand in
advance would reach, placing each VM in the scenario's order on the PE with the least
theoretical load among those with RAM for it (ties broken at random). No protocol, no
measurement: a yardstick for the real policies, not a policy."""

from __future__ import annotations

import random
import statistics

from ..pe.accounting import LoadSettings


def greedy_deviation(scenario: dict, rng: random.Random) -> float:
    """One greedy placement of the scenario's starts; its metric in percent (mean over PEs
    of |theoretical CPU load - the mean|). Raises ValueError if a VM fits nowhere."""
    cycle = scenario["load_generator"]["cycle_s"]
    pes = scenario["pes"]
    settings = LoadSettings()  # the hypervisor overhead the simulated PEs count
    load = [0.0] * len(pes)
    free_mb = [
        pe["memory_mb"]
        - settings.overhead_mb
        - settings.overhead_kb_per_mb * pe["memory_mb"] / 1024
        for pe in pes
    ]
    for start in sorted(scenario["starts"], key=lambda s: s["at_s"]):
        vm = scenario["vm_types"][start["type"]]
        fits = [i for i in range(len(pes)) if free_mb[i] >= vm["ram_mb"]]
        if not fits:
            raise ValueError(f"{start['server_id']} fits on no PE")
        least = min(load[i] for i in fits)
        chosen = rng.choice([i for i in fits if load[i] - least < 1e-12])
        load[chosen] += vm["busy_s"] / cycle / pes[chosen]["cpus"]
        free_mb[chosen] -= vm["ram_mb"]
    mean = statistics.mean(load)
    return statistics.mean(abs(x - mean) for x in load) * 100
