"""Rebalancing after start: move VMs from hot PEs to cold ones.

``hot-cold`` and ``gap-fit`` decide on each PE alone, one VM at a time; ``plan`` plans
for the whole pool on one PE (the leader) and names the target of each move.
"""

from __future__ import annotations

import statistics

from zope.interface import implementer

from xenpool.interfaces import (
    IPoolPlanner,
    IRebalancer,
    LoadSample,
    Move,
    PlannedPe,
    PoolMember,
)


def _without(
    sample: LoadSample, name: str, ram_kb: int, ram_total_kb: int
) -> LoadSample:
    return LoadSample(
        cpu=sample.cpu - sample.vm_cpu[name],
        ram=sample.ram - ram_kb / ram_total_kb,
        vm_cpu={n: s for n, s in sample.vm_cpu.items() if n != name},
    )


def _loads(pool: list) -> list[float]:
    return [m.load for m in pool]


@implementer(IRebalancer)
class HotToCold:
    """The hottest PE, when it is more than ``threshold`` above the pool's mean load,
    moves the one VM whose departure brings it closest to the mean; the pool policy
    then places that VM on the least used PE. One move per decision, so the pool settles
    step by step rather than everyone shedding at once."""

    name = "hot-cold"
    min_samples = 5
    cooldown_s = 600.0

    def __init__(self, threshold: float = 0.05) -> None:
        threshold = float(threshold)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.threshold = threshold

    def choose(
        self, own: LoadSample, vm_ram: dict, pool: list, metric, ram_total_kb: int
    ):
        pool_loads = _loads(pool)
        if len(pool_loads) < 2:
            return None
        load = metric.load(own)
        mean = statistics.mean(pool_loads)
        if load - mean <= self.threshold or load < max(pool_loads) - 1e-9:
            return None
        coldest = min(pool_loads)
        best, best_gap = (
            None,
            load - mean,
        )  # moving must get closer to the mean than staying
        for name in own.vm_cpu:
            moved = load - metric.load(
                _without(own, name, vm_ram.get(name, 0), ram_total_kb)
            )
            if coldest + moved >= load:  # it would only make the coldest PE the hottest
                continue
            gap = abs(load - moved - mean)
            if gap < best_gap:
                best, best_gap = name, gap
        return best


@implementer(IRebalancer)
class GapFit:
    """Any PE may move one VM to the PE the pool policy will give it: the least loaded
    one with free RAM for it (what LeastUsedFreeRAM answers; without free RAM in the
    answer, the least loaded one). Of its measured VMs it moves the one that lowers the
    pool's total deviation from the mean load the most, counting both ends of the move,
    and only when that gain is at least ``min_gain``.

    Every move lowers the sum of |load - mean| over the pool by ``min_gain`` or more, so
    moves cannot go back and forth for ever (no ping-pong) as long as the measured
    shares are right to within half of ``min_gain``. With the ``cpu`` load metric the
    loads are CPU alone and RAM is a constraint, not a weight.

    Works with the PE's moved-VM cookie: the receiving PE counts the newcomer at the
    CPU it used here, so the next decision anywhere already sees the move's effect.
    """

    name = "gap-fit"

    def __init__(
        self,
        min_gain: float = 0.03,
        min_samples: int = 2,
        cooldown_s: float = 120.0,
        room_mb: float = 160.0,
        settle_tolerance: float | None = 0.05,
    ) -> None:
        min_gain, min_samples, cooldown_s = (
            float(min_gain),
            int(min_samples),
            float(cooldown_s),
        )
        if not 0 < min_gain < 1:
            raise ValueError(f"min_gain must be between 0 and 1, got {min_gain}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.min_gain, self.min_samples, self.cooldown_s = (
            min_gain,
            min_samples,
            cooldown_s,
        )
        self.room_mb = float(
            room_mb
        )  # a cold PE with less free RAM makes room; 0: never
        # decide only when the pool's summed load moved less than this since the last
        # decision (no VM started or stopped meanwhile); None: always
        self.settle_tolerance = (
            None if settle_tolerance is None else float(settle_tolerance)
        )

    def choose(
        self, own: LoadSample, vm_ram: dict, pool: list, metric, ram_total_kb: int
    ):
        if len(pool) < 2 or not any(m.own for m in pool):
            return None
        mean = statistics.mean(_loads(pool))
        others = [m for m in pool if not m.own]
        load = next(m.load for m in pool if m.own)
        best, best_gain = None, self.min_gain
        for name in sorted(own.vm_cpu):  # sorted: the same pool state, the same choice
            ram_kb = vm_ram.get(name, 0)
            receiver = self._receiver(others, ram_kb)
            if receiver is None:
                continue
            moved = metric.load(own) - metric.load(
                _without(own, name, ram_kb, ram_total_kb)
            )
            if (
                receiver.load + moved >= load
            ):  # the receiver would end hotter than this PE is
                continue
            before = abs(load - mean) + abs(receiver.load - mean)
            after = abs(load - moved - mean) + abs(receiver.load + moved - mean)
            if before - after > best_gain + 1e-12:
                best, best_gain = name, before - after
        if best is None and self.room_mb > 0:
            return self._make_room(
                own, vm_ram, pool, metric, ram_total_kb, load, mean, others
            )
        return best

    def _make_room(self, own, vm_ram, pool, metric, ram_total_kb, load, mean, others):
        """A cold PE whose RAM is full cannot take a VM from a hot one; it moves out
        the VM that costs the pool least to move (typically much RAM, little CPU), if
        the hottest PE sending it as much as it needs afterwards would gain more."""
        free_kb = next(m.free_ram_kb for m in pool if m.own)
        if (
            mean - load <= self.min_gain
            or free_kb is None
            or free_kb >= self.room_mb * 1024
        ):
            return None
        hottest = max(m.load for m in others)
        best, best_gain = None, self.min_gain
        for name in sorted(own.vm_cpu):
            ram_kb = vm_ram.get(name, 0)
            receiver = self._receiver(others, ram_kb)
            if receiver is None:
                continue
            moved = metric.load(own) - metric.load(
                _without(own, name, ram_kb, ram_total_kb)
            )
            before = abs(load - mean) + abs(receiver.load - mean)
            after = abs(load - moved - mean) + abs(receiver.load + moved - mean)
            then = min(
                hottest - mean, mean - (load - moved)
            )  # what the hottest can then send here
            gain = before - after + 2 * max(then, 0)
            if gain > best_gain + 1e-12 and ram_kb > 0:
                best, best_gain = name, gain
        return best

    @staticmethod
    def _receiver(others: list[PoolMember], ram_kb: int) -> PoolMember | None:
        fitting = [
            m for m in others if m.free_ram_kb is None or m.free_ram_kb >= ram_kb
        ]
        return min(fitting, key=lambda m: m.load, default=None)


def _deviation(cores: list[float], cpus: list[int]) -> float:
    """The pool's mean |load - mean load|, loads as shares of each PE's CPUs."""
    loads = [c / n for c, n in zip(cores, cpus)]
    mean = sum(loads) / len(loads)
    return sum(abs(load - mean) for load in loads) / len(loads)


@implementer(IPoolPlanner)
class PlannedMoves:
    """Plans a short list of moves for the whole pool: a deterministic local search from
    the current placement. Each step takes the single move or the swap (two moves) that
    lowers the pool's mean |load - mean| the most after paying ``move_cost`` per move,
    with every move fitting in the RAM its target has free at that point, and no VM
    moved twice in one plan. It stops when no step pays, or after ``max_moves``.
    The plan is only made when it gains at least ``min_gain`` in all.

    Swaps are what a single-move rebalancer cannot do: with VMs as coarse as 40 % of a
    host, the last few percent come from exchanging a big VM for two smaller ones.
    Loads are CPU demand (the PEs' measured cores over their CPUs); RAM is a constraint.
    """

    name = "plan"

    def __init__(
        self,
        min_gain: float = 0.005,
        move_cost: float = 0.002,
        max_moves: int = 12,
        min_samples: int = 4,
        cooldown_s: float = 900.0,
        quiet_rounds: int = 2,
    ) -> None:
        min_gain, move_cost, max_moves = (
            float(min_gain),
            float(move_cost),
            int(max_moves),
        )
        min_samples, cooldown_s, quiet_rounds = (
            int(min_samples),
            float(cooldown_s),
            int(quiet_rounds),
        )
        if not 0 < min_gain < 1 or not 0 <= move_cost < 1:
            raise ValueError(
                f"min_gain must be in (0, 1) and move_cost in [0, 1), got {min_gain}, {move_cost}"
            )
        if max_moves < 1 or min_samples < 1 or cooldown_s < 0:
            raise ValueError(
                f"max_moves, min_samples must be >= 1 and cooldown_s >= 0, got {max_moves}, {min_samples}, {cooldown_s}"
            )
        self.min_gain, self.move_cost, self.max_moves = min_gain, move_cost, max_moves
        self.min_samples, self.cooldown_s = min_samples, cooldown_s
        # the leader plans once the pool's VMs stayed the same this many rounds
        self.quiet_rounds = max(quiet_rounds, 0)

    def choose(self, own, vm_ram, pool, metric, ram_total_kb):
        return None  # the leader plans for every PE; no PE decides alone

    def plan(self, pool: list[PlannedPe]) -> list[Move]:
        pes = sorted(pool, key=lambda pe: pe.identifier)
        if len(pes) < 2:
            return []
        ids = [pe.identifier for pe in pes]
        cpus = [pe.cpus for pe in pes]
        cores = [pe.load * pe.cpus for pe in pes]
        free = [pe.free_ram_kb for pe in pes]
        # (server_id, PE index, cores, RAM) of every VM that may move, in a fixed order
        vms = [
            (vm.server_id, i, vm.cpu_cores, vm.ram_kb)
            for i, pe in enumerate(pes)
            for vm in sorted(pe.vms, key=lambda v: v.server_id)
            if vm.movable
        ]
        start = current = _deviation(cores, cpus)
        moves: list[Move] = []
        while len(moves) < self.max_moves:
            step = self._best_step(
                vms, cores, cpus, free, current, self.max_moves - len(moves)
            )
            if step is None:
                break
            current = step[0]
            for k, target in step[1]:
                name, source, c, ram = vms[k]
                cores[source] -= c
                cores[target] += c
                free[source] += ram
                free[target] -= ram
                moves.append(Move(name, ids[source], ids[target]))
                vms[k] = (name, target, c, ram)
            moved = {k for k, _ in step[1]}
            vms = [vm for k, vm in enumerate(vms) if k not in moved]
        if start - current < self.min_gain:
            return []
        return moves

    def _best_step(self, vms, cores, cpus, free, current, room):
        """(deviation after, [(VM index, target PE index), ...]) of the best paying step."""
        best, best_score = None, 1e-12
        n = len(cores)

        def consider(after: float, step: list) -> None:
            nonlocal best, best_score
            score = current - after - self.move_cost * len(step)
            if score > best_score + 1e-12:
                best, best_score = (after, step), score

        for k, (_, source, c, ram) in enumerate(vms):
            for target in range(n):
                if target != source and free[target] >= ram:
                    cores[source] -= c
                    cores[target] += c
                    consider(_deviation(cores, cpus), [(k, target)])
                    cores[source] += c
                    cores[target] -= c
        if room < 2:
            return best
        for a, (_, pa, ca, ra) in enumerate(vms):
            for b in range(a + 1, len(vms)):
                _, pb, cb, rb = vms[b]
                if pa == pb:
                    continue
                # either order, as long as the first move fits before the second frees RAM
                if free[pb] >= ra and free[pa] + ra >= rb:
                    order = [(a, pb), (b, pa)]
                elif free[pa] >= rb and free[pb] + rb >= ra:
                    order = [(b, pa), (a, pb)]
                else:
                    continue
                delta = cb - ca
                cores[pa] += delta
                cores[pb] -= delta
                consider(_deviation(cores, cpus), order)
                cores[pa] -= delta
                cores[pb] += delta
        return best
