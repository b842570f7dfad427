"""Pool member selection policies: RFC 5356 and rsplib's extensions, as rsplib runs them.

Each policy is an IPoolPolicy provider registered by its rsplib name. On the PE side
``make_parameter`` turns the policy's arguments (``LeastUsedDegradation:0.05`` gives
``["0.05"]``) into the PoolPolicy parameter; on the registrar side ``new_selection``
gives one pool's selection state.

Selection follows rsplib (poolpolicy-template_impl.h) in two families:

* **ordered** (round robin, weighted round robin, priority, the least-used family):
  PEs sorted by (policy value, sequence number, identifier) in a SortedList. ``select``
  takes the first ``count``; the first ``max_increment`` of them (rsplib's registrar
  MaxIncrement, default 1) get a fresh sequence number, which sends them behind PEs with
  an equal value (round robin among equals), plus their policy's side effect
  (accumulated degradation; the weighted-round-robin counters). O(log n) per selected PE.
* **drawn** (random, weighted random, randomized least used): a Fenwick tree over each
  PE's weight; ``count`` distinct PEs are drawn without replacement, each with
  probability proportional to its weight among those not yet drawn. A PE of weight 0 is
  never drawn. No side effects. O(log n) per drawn PE and per update.

Values follow rsplib: loads, degradations and DPFs are u32 fractions of 0xffffffff and
sums of them saturate there; weights and priorities are plain u32.

Distance (DPF policies): the selection uses the ``distance`` field (milliseconds) of
the policy passed to ``update``. rsplib's registrar fills it in before storing a PE: a
registration over ASAP sets it to the PE's SCTP SRTT/2 rounded to the DistanceStep
(``round_distance``), a PE learned over ENRP gets the peer-to-registrar distance added
(``with_distance(policy, d, add=True)``). A PE's penalty is ``distance * dpf``, in load
units: ``LeastUsedDPF:0.001`` makes 100 ms cost as much as 10 % load.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

from sortedcontainers import SortedList
from zope.interface import implementer

if TYPE_CHECKING:
    from random import Random


from xenpool.interfaces import IPoolPolicy, IPoolSelection
from xenpool.protocol.params import (
    MAX_LOAD,
    POLICY_FIELDS,
    PolicyType,
    PoolPolicy,
    load_to_wire,
)

MAX_U32 = 0xFFFFFFFF
DEFAULT_DISTANCE_STEP_MS = 50  # rsplib's REGISTRAR_DEFAULT_DISTANCE_STEP


# ---------------------------------------------------------------- PE side: arguments


def _fraction(text: str) -> int:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError
    return load_to_wire(value)


def _integer(text: str) -> int:
    value = int(text, 10)
    if not 0 <= value <= MAX_U32:
        raise ValueError
    return value


@dataclass(frozen=True)
class Argument:
    """One argument after the policy name: the PoolPolicy field it fills and how."""

    label: str  # its name in messages
    field: str
    parse: Callable[[str], int]
    expected: str  # what a valid value looks like, for messages
    optional: bool = False  # left out: 0, as rsplib's rspserver sends

    def value(self, policy: str, text: str) -> int:
        try:
            return self.parse(text.strip())
        except ValueError:
            raise ValueError(
                f"{policy}: {self.label} must be {self.expected}, got {text!r}"
            ) from None


FRACTION = "a fraction from 0 to 1"
INTEGER = f"an integer from 0 to {MAX_U32}"
DEGRADATION = Argument("degradation", "load_degradation", _fraction, FRACTION)
LOAD_INCREMENT = Argument(
    "load increment", "load_degradation", _fraction, FRACTION
)  # PLU's field of the same place
LOAD_DPF = Argument("dpf", "load_dpf", _fraction, FRACTION)
WEIGHT_DPF = Argument("dpf", "weight_dpf", _fraction, FRACTION)
WEIGHT = Argument("weight", "weight", _integer, INTEGER)
PRIORITY = Argument("priority", "priority", _integer, INTEGER)


def parse_arguments(
    policy: str, specs: Sequence[Argument], arguments: Sequence[str]
) -> dict[str, int]:
    required = sum(not a.optional for a in specs)
    if not required <= len(arguments) <= len(specs):
        usage = ":".join(
            [policy, *(f"[{a.label}]" if a.optional else a.label for a in specs)]
        )
        wanted = (
            f"{required}" if required == len(specs) else f"{required} to {len(specs)}"
        )
        raise ValueError(
            f"{policy} takes {wanted} argument(s) ({usage}), got {len(arguments)}: {list(arguments)!r}"
        )
    return {a.field: a.value(policy, text) for a, text in zip(specs, arguments)}


# ----------------------------------------------------------- registrar side: state


class _Entry:
    """A PE in an ordered selection. ``degradation`` accumulates per selection and goes
    back to 0 on every update (rsplib's poolElementNodeUpdate)."""

    __slots__ = ("policy", "seq", "key", "degradation", "round", "virtual")
    key: tuple | None  # the sort key, once the PE is in the sorted list

    def __init__(self, policy: PoolPolicy, seq: int) -> None:
        self.policy, self.seq, self.key = policy, seq, None
        self.degradation = self.round = self.virtual = 0


def _check_type(expected: int, policy: PoolPolicy) -> None:
    # The handlespace refuses mixed pools first; this keeps a selection's keys meaningful.
    if policy.policy_type != expected:
        raise ValueError(
            f"policy 0x{policy.policy_type:08x} in a pool of policy 0x{expected:08x}"
        )


@implementer(IPoolSelection)
class OrderedSelection:
    """PEs sorted by (value(entry), sequence number, identifier); see the module doc.

    ``degrades``: a selected PE's degradation grows by its policy's load degradation.
    """

    def __init__(
        self,
        policy_type: int,
        value: Callable[[_Entry], object],
        *,
        degrades: bool = False,
        max_increment: int = 0,
    ) -> None:
        self._policy_type = policy_type
        self._value = value
        self._degrades = degrades
        self._max_increment = max_increment or 1  # 0: the policy default, as in rsplib
        self._sorted = SortedList()
        self._entries: dict[int, _Entry] = {}
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, identifier: int) -> bool:
        return identifier in self._entries

    def update(self, identifier: int, policy: PoolPolicy) -> None:
        _check_type(self._policy_type, policy)
        entry = self._entries.get(identifier)
        if entry is None:
            entry = self._entries[identifier] = _Entry(policy, next(self._sequence))
            self._added(entry)
        else:  # keeps its sequence number, so its place among equals
            self._sorted.remove(entry.key)
            entry.policy, entry.degradation = policy, 0
            self._changed(entry)
        self._link(identifier, entry)

    def remove(self, identifier: int) -> None:
        entry = self._entries.pop(identifier, None)
        if entry is not None:
            self._sorted.remove(entry.key)

    def select(self, count: int) -> list[int]:
        picked = [key[-1] for key in self._sorted.islice(0, max(count, 0))]
        for identifier in picked[: self._max_increment]:
            entry = self._entries[identifier]
            self._sorted.remove(entry.key)
            entry.seq = next(self._sequence)
            self._selected(entry)
            self._link(identifier, entry)
        return picked

    def repeats(self, count: int, picked: list[int]) -> bool:
        """Whether ``select(count)`` would now pick ``picked`` again and change nothing
        that matters (it only renumbers PEs already last among their equals), so the
        registrar may reuse its answer until the pool changes."""
        return (
            not self._degrades
            and [key[-1] for key in self._sorted.islice(0, count)] == picked
        )

    def _link(self, identifier: int, entry: _Entry) -> None:
        entry.key = (self._value(entry), entry.seq, identifier)
        self._sorted.add(entry.key)

    # Policy hooks (weighted round robin overrides them).
    def _added(self, entry: _Entry) -> None:
        pass

    def _changed(self, entry: _Entry) -> None:
        pass

    def _selected(self, entry: _Entry) -> None:
        if self._degrades:
            entry.degradation = min(
                entry.degradation + entry.policy.load_degradation, MAX_LOAD
            )


class WeightedRoundRobinSelection(OrderedSelection):
    """rsplib's weighted round robin, O(log n) per selected PE: PEs ordered by (round,
    virtual counter, sequence number); a PE is chosen ``weight`` times in a row, then
    moves to the next round. A weight of 0 counts as 1, as in rsplib."""

    def __init__(self, policy_type: int, *, max_increment: int = 0) -> None:
        super().__init__(
            policy_type, lambda e: (e.round, e.virtual), max_increment=max_increment
        )

    def _added(self, entry: _Entry) -> None:
        entry.round = (
            self._sorted[0][0][0] if self._sorted else 0
        )  # joins the current round
        entry.virtual = entry.policy.weight

    def _changed(self, entry: _Entry) -> None:
        entry.virtual = min(entry.virtual, entry.policy.weight)

    def repeats(self, count: int, picked: list[int]) -> bool:
        return False  # every selection moves the counters

    def _selected(self, entry: _Entry) -> None:
        if entry.virtual > 1:
            entry.virtual -= 1
        else:
            entry.round, entry.virtual = entry.round + 1, entry.policy.weight


class FenwickTree:
    """Integer values in slots 0.., with prefix sums: O(log n) append, set and search."""

    def __init__(self) -> None:
        self._tree = [0]  # 1-based; node i sums the values of slots (i - lowbit(i), i]
        self._values: list[int] = []
        self.total = 0

    def __len__(self) -> int:
        return len(self._values)

    def value(self, slot: int) -> int:
        return self._values[slot]

    def append(self, value: int) -> int:
        i = len(self._tree)
        node, j, stop = value, i - 1, i - (i & -i)
        while j > stop:  # the nodes covering the rest of the new node's range
            node += self._tree[j]
            j -= j & -j
        self._tree.append(node)
        self._values.append(value)
        self.total += value
        return i - 1

    def set(self, slot: int, value: int) -> None:
        delta = value - self._values[slot]
        self._values[slot] = value
        self.total += delta
        i, tree = slot + 1, self._tree
        while i < len(tree):
            tree[i] += delta
            i += i & -i

    def find(self, target: int) -> int:
        """The slot whose cumulative range holds ``target`` (0 <= target < total)."""
        tree, n, pos = self._tree, len(self._tree) - 1, 0
        step = 1 << n.bit_length() >> 1
        while step:
            if pos + step <= n and tree[pos + step] <= target:
                pos += step
                target -= tree[pos]
            step >>= 1
        return pos


@implementer(IPoolSelection)
class DrawnSelection:
    """PEs drawn at random by weight(policy) from a Fenwick tree; see the module doc."""

    def __init__(
        self, policy_type: int, weight: Callable[[PoolPolicy], int], random: Random
    ) -> None:
        self._policy_type = policy_type
        self._weight = weight
        self._random = random
        self._weights = FenwickTree()
        self._slots: dict[int, int] = {}
        self._owners: list[int | None] = []  # by slot
        self._free: list[int] = []  # slots of removed PEs, reused

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, identifier: int) -> bool:
        return identifier in self._slots

    def update(self, identifier: int, policy: PoolPolicy) -> None:
        _check_type(self._policy_type, policy)
        weight = self._weight(policy)
        slot = self._slots.get(identifier)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._weights.append(0)
                self._owners.append(None)
            self._owners[slot] = identifier
            self._slots[identifier] = slot
        self._weights.set(slot, weight)

    def remove(self, identifier: int) -> None:
        slot = self._slots.pop(identifier, None)
        if slot is not None:
            self._weights.set(slot, 0)
            self._owners[slot] = None
            self._free.append(slot)

    def select(self, count: int) -> list[int]:
        weights, drawn = self._weights, list[tuple[int, int]]()
        while len(drawn) < count and weights.total > 0:
            slot = weights.find(self._random.randrange(weights.total))
            drawn.append((slot, weights.value(slot)))
            weights.set(slot, 0)  # without replacement, until this selection ends
        for slot, weight in drawn:
            weights.set(slot, weight)
        return [cast(int, self._owners[slot]) for slot, _ in drawn]  # drawn: owned


# ------------------------------------------------------ the policies' value functions


def _load_sum(
    e: _Entry,
) -> int:  # LeastUsed (degradation stays 0), LeastUsedDegradation
    return min(e.policy.load + e.degradation, MAX_LOAD)


def _load_increment_sum(
    e: _Entry,
) -> int:  # PriorityLeastUsed[Degradation]: load after one more request
    return min(e.policy.load + e.policy.load_degradation + e.degradation, MAX_LOAD)


def _load_distance_sum(
    e: _Entry,
) -> int:  # LeastUsed[Degradation]DPF; float as rsplib computes it
    p = e.policy
    penalty = p.distance * (p.load_dpf / MAX_LOAD) * MAX_LOAD
    return min(round(p.load + e.degradation + penalty), MAX_LOAD)


def _weight_distance(p: PoolPolicy) -> int:  # WeightedRandomDPF
    value = p.weight - round(p.weight * (p.distance * (p.weight_dpf / MAX_U32)))
    return 1 if value < 0 else value


def _spare_capacity(
    p: PoolPolicy,
) -> int:  # RandomizedLeastUsed and RandomizedPriorityLeastUsed
    return max(
        MAX_LOAD - p.load - p.load_degradation, 1
    )  # never 0: every PE stays selectable


def _ordered(
    value: Callable[[_Entry], object], degrades: bool = False
) -> Callable[..., IPoolSelection]:
    return lambda policy_type, random, max_increment: OrderedSelection(
        policy_type, value, degrades=degrades, max_increment=max_increment
    )


class FreeRamSelection(OrderedSelection):
    """xenpool's LeastUsedFreeRAM: least used first, like LeastUsed, but a request that
    says how much RAM it needs only gets PEs that reported that much free. Each PE chosen
    is booked with the request's RAM until its next update, so a burst of requests does
    not all land on one PE. Skipping PEs without room costs O(skipped) per selection."""

    fits_requests = True

    def __init__(self, policy_type: int, *, max_increment: int = 0) -> None:
        super().__init__(policy_type, _load_sum, max_increment=max_increment)
        self._booked: dict[int, int] = {}

    def update(self, identifier: int, policy: PoolPolicy) -> None:
        super().update(identifier, policy)
        self._booked.pop(identifier, None)  # the PE reported its free RAM afresh

    def remove(self, identifier: int) -> None:
        super().remove(identifier)
        self._booked.pop(identifier, None)

    def select(self, count: int, ram_mb: int | None = None) -> list[int]:
        if not ram_mb:
            return super().select(count)
        picked = []
        for key in self._sorted:
            identifier = key[-1]
            free = self._entries[identifier].policy.free_ram_mb - self._booked.get(
                identifier, 0
            )
            if free >= ram_mb:
                picked.append(identifier)
                if len(picked) == count:
                    break
        for identifier in picked[: max(self._max_increment, 1)]:
            entry = self._entries[identifier]
            self._sorted.remove(entry.key)
            entry.seq = next(self._sequence)
            self._link(identifier, entry)
            self._booked[identifier] = self._booked.get(identifier, 0) + ram_mb
        return picked


def _free_ram(policy_type, random, max_increment) -> IPoolSelection:
    return FreeRamSelection(policy_type, max_increment=max_increment)


def _drawn(weight: Callable[[PoolPolicy], int]) -> Callable[..., IPoolSelection]:
    return lambda policy_type, random, max_increment: DrawnSelection(
        policy_type, weight, random
    )


def _weighted_round_robin(policy_type, random, max_increment) -> IPoolSelection:
    return WeightedRoundRobinSelection(policy_type, max_increment=max_increment)


# -------------------------------------------------------------------- the providers


class Policy:
    """Base of the registered policy classes (one per row of the table below)."""

    name: str
    policy_type: int
    arguments: tuple[Argument, ...] = ()
    _new_selection: Callable[..., IPoolSelection]

    wants_free_ram = False  # make_parameter takes the PE's free RAM (free_ram_mb=...)

    def make_parameter(
        self, load: float, arguments: Sequence[str], free_ram_mb: int = 0
    ) -> PoolPolicy:
        fields = parse_arguments(self.name, self.arguments, arguments)
        if "free_ram_mb" in POLICY_FIELDS[self.policy_type]:
            fields["free_ram_mb"] = max(0, int(free_ram_mb))
        if "load" in POLICY_FIELDS[self.policy_type]:
            load = float(load)
            if math.isnan(load):
                raise ValueError(f"{self.name}: load must be a number, got {load!r}")
            fields["load"] = load_to_wire(load)
        return PoolPolicy.make(self.policy_type, **fields)

    def new_selection(self, random: object, max_increment: int = 0) -> IPoolSelection:
        """``max_increment``: how many of a selection's first PEs get its side effects
        (rsplib's registrar MaxIncrement; 0 = the default, 1). Drawn policies ignore it."""
        return self._new_selection(self.policy_type, random, max_increment)


def _policy(
    name: str, policy_type: PolicyType, arguments: tuple, new_selection, doc: str
) -> type[Policy]:
    attributes = {
        "name": name,
        "wants_free_ram": "free_ram_mb" in POLICY_FIELDS[policy_type],
        "policy_type": int(policy_type),
        "arguments": arguments,
        "_new_selection": staticmethod(new_selection),
        "__doc__": doc,
        "__module__": __name__,
    }
    return cast(
        "type[Policy]", implementer(IPoolPolicy)(type(name, (Policy,), attributes))
    )


T = PolicyType
POLICIES: dict[str, type] = {
    cls.name: cls
    for cls in (
        _policy("RoundRobin", T.ROUND_ROBIN, (), _ordered(lambda e: 0), "In turn."),
        _policy(
            "WeightedRoundRobin",
            T.WEIGHTED_ROUND_ROBIN,
            (WEIGHT,),
            _weighted_round_robin,
            "In turn, `weight` times each.",
        ),
        _policy("Random", T.RANDOM, (), _drawn(lambda p: 1), "Uniformly at random."),
        _policy(
            "WeightedRandom",
            T.WEIGHTED_RANDOM,
            (WEIGHT,),
            _drawn(lambda p: p.weight),
            "At random by weight.",
        ),
        _policy(
            "WeightedRandomDPF",
            T.WEIGHTED_RANDOM_DPF,
            (WEIGHT, WEIGHT_DPF),
            _drawn(_weight_distance),
            "At random by weight * (1 - distance * dpf).",
        ),
        _policy(
            "Priority",
            T.PRIORITY,
            (PRIORITY,),
            _ordered(lambda e: -e.policy.priority),
            "Highest priority first; in turn among equals.",
        ),
        _policy(
            "LeastUsed",
            T.LEAST_USED,
            (),
            _ordered(_load_sum),
            "Lowest load first; in turn among equals.",
        ),
        _policy(
            "LeastUsedFreeRAM",
            T.LEAST_USED_FREE_RAM,
            (),
            _free_ram,
            "xenpool: lowest load first among the PEs with RAM free for the request.",
        ),
        _policy(
            "LeastUsedDegradation",
            T.LEAST_USED_DEGRADATION,
            (DEGRADATION,),
            _ordered(_load_sum, degrades=True),
            "Lowest load + degradation accumulated since the PE's last update.",
        ),
        _policy(
            "LeastUsedDPF",
            T.LEAST_USED_DPF,
            (LOAD_DPF,),
            _ordered(_load_distance_sum),
            "Lowest load + distance * dpf.",
        ),
        _policy(
            "LeastUsedDegradationDPF",
            T.LEAST_USED_DEGRADATION_DPF,
            (DEGRADATION, LOAD_DPF),
            _ordered(_load_distance_sum, degrades=True),
            "Lowest load + accumulated degradation + distance * dpf.",
        ),
        _policy(
            "PriorityLeastUsed",
            T.PRIORITY_LEAST_USED,
            (LOAD_INCREMENT,),
            _ordered(_load_increment_sum),
            "Lowest load + load increment (the load after one more request).",
        ),
        _policy(
            "PriorityLeastUsedDegradation",
            T.PRIORITY_LEAST_USED_DEGRADATION,
            (DEGRADATION,),
            _ordered(_load_increment_sum, degrades=True),
            "Lowest load + load increment + accumulated degradation (the increment accumulates too).",
        ),
        _policy(
            "RandomizedLeastUsed",
            T.RANDOMIZED_LEAST_USED,
            (),
            _drawn(_spare_capacity),
            "At random by spare capacity (1 - load).",
        ),
        _policy(
            "RandomizedPriorityLeastUsed",
            T.RANDOMIZED_PRIORITY_LEAST_USED,
            (replace(LOAD_INCREMENT, optional=True),),
            _drawn(_spare_capacity),
            "At random by 1 - load - load increment. rsplib's rspserver takes no argument (increment 0).",
        ),
    )
}


# ------------------------------------------------------------- registrar helpers


def round_distance(distance_ms: float, step_ms: int = DEFAULT_DISTANCE_STEP_MS) -> int:
    """A distance rounded to the nearest multiple of ``step_ms`` (rsplib: SRTT/2 by 50 ms)."""
    return round(distance_ms / step_ms) * step_ms


def with_distance(
    policy: PoolPolicy, distance_ms: int, *, add: bool = False
) -> PoolPolicy:
    """``policy`` with its distance set to (``add``: increased by) ``distance_ms``, for
    the DPF policies; any other policy comes back unchanged."""
    names = POLICY_FIELDS.get(policy.policy_type, ())
    if "distance" not in names:
        return policy
    values = list(policy.values)
    i = names.index("distance")
    values[i] = min(values[i] + distance_ms if add else distance_ms, MAX_U32)
    return replace(policy, values=tuple(values))
