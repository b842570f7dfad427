"""The pool member selection policies (xenpool_plugins.policies), against rsplib's semantics."""

from __future__ import annotations

import collections
import math
import random

import pytest
from zope.interface.verify import verifyObject

from xenpool.interfaces import IPoolPolicy, IPoolSelection
from xenpool.plugins import load_plugins
from xenpool.protocol.params import (
    MAX_LOAD,
    PolicyType,
    PoolPolicy,
    decode_param,
    encode_param,
    load_to_wire,
)
from xenpool_plugins.policies import (
    POLICIES,
    FenwickTree,
    round_distance,
    with_distance,
)

EXPECTED = {
    "RoundRobin": PolicyType.ROUND_ROBIN,
    "WeightedRoundRobin": PolicyType.WEIGHTED_ROUND_ROBIN,
    "Random": PolicyType.RANDOM,
    "WeightedRandom": PolicyType.WEIGHTED_RANDOM,
    "Priority": PolicyType.PRIORITY,
    "LeastUsed": PolicyType.LEAST_USED,
    "LeastUsedDegradation": PolicyType.LEAST_USED_DEGRADATION,
    "PriorityLeastUsed": PolicyType.PRIORITY_LEAST_USED,
    "RandomizedLeastUsed": PolicyType.RANDOMIZED_LEAST_USED,
    "LeastUsedDPF": PolicyType.LEAST_USED_DPF,
    "LeastUsedDegradationDPF": PolicyType.LEAST_USED_DEGRADATION_DPF,
    "WeightedRandomDPF": PolicyType.WEIGHTED_RANDOM_DPF,
    "RandomizedPriorityLeastUsed": PolicyType.RANDOMIZED_PRIORITY_LEAST_USED,
    "PriorityLeastUsedDegradation": PolicyType.PRIORITY_LEAST_USED_DEGRADATION,
    "LeastUsedFreeRAM": PolicyType.LEAST_USED_FREE_RAM,
}


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def policy(name: str):
    return POLICIES[name]()


def pool(
    name: str, pes: dict[int, list[str] | tuple[float, list[str]]], seed: int = 1, **kw
):
    """A selection of policy ``name`` holding PE id -> (load, arguments) or arguments."""
    provider = policy(name)
    selection = provider.new_selection(random.Random(seed), **kw)
    for identifier, spec in pes.items():
        load, arguments = spec if isinstance(spec, tuple) else (0.0, spec)
        selection.update(identifier, provider.make_parameter(load, arguments))
    return provider, selection


def run(selection, times: int, count: int = 1) -> list[int]:
    return [i for _ in range(times) for i in selection.select(count)]


def within_5_sigma(
    counts: dict[int, int], probabilities: dict[int, float], draws: int
) -> None:
    for identifier, p in probabilities.items():
        mean, sigma = draws * p, math.sqrt(draws * p * (1 - p))
        assert abs(counts.get(identifier, 0) - mean) <= 5 * sigma, (
            identifier,
            counts,
            mean,
            sigma,
        )


# -- registration -----------------------------------------------------------------------


def test_every_policy_is_registered_by_name(plugins):
    builtin = {p.name for p in plugins.providers("policy") if p.plugin == "builtin"}
    assert builtin == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_created_policy_and_selection_provide_the_interfaces(plugins, name):
    provider = plugins.create("policy", name)
    assert verifyObject(IPoolPolicy, provider)
    assert (provider.name, provider.policy_type) == (name, EXPECTED[name])
    assert verifyObject(IPoolSelection, provider.new_selection(random.Random(0)))


# -- PE side: make_parameter ----------------------------------------------------------------


def wire(fraction: float) -> int:
    return load_to_wire(fraction)


@pytest.mark.parametrize(
    "name, load, arguments, fields",
    [
        ("RoundRobin", 0.3, [], {}),
        ("Random", 0.3, [], {}),
        ("WeightedRoundRobin", 0.3, ["3"], {"weight": 3}),
        ("WeightedRandom", 0.3, ["0"], {"weight": 0}),
        ("WeightedRandom", 0.3, ["4294967295"], {"weight": 0xFFFFFFFF}),
        ("Priority", 0.3, ["7"], {"priority": 7}),
        ("LeastUsed", 0.3, [], {"load": wire(0.3)}),
        ("LeastUsed", 1.5, [], {"load": MAX_LOAD}),  # the load is clamped, not refused
        (
            "LeastUsedDegradation",
            0.25,
            ["0.05"],
            {"load": wire(0.25), "load_degradation": wire(0.05)},
        ),
        (
            "PriorityLeastUsed",
            0.25,
            ["1"],
            {"load": wire(0.25), "load_degradation": MAX_LOAD},
        ),
        (
            "PriorityLeastUsedDegradation",
            0.0,
            ["0"],
            {"load": 0, "load_degradation": 0},
        ),
        ("RandomizedLeastUsed", 0.5, [], {"load": wire(0.5)}),
        (
            "RandomizedPriorityLeastUsed",
            0.5,
            [],
            {"load": wire(0.5), "load_degradation": 0},
        ),
        (
            "RandomizedPriorityLeastUsed",
            0.5,
            ["0.1"],
            {"load": wire(0.5), "load_degradation": wire(0.1)},
        ),
        (
            "LeastUsedDPF",
            0.5,
            ["0.001"],
            {"load": wire(0.5), "load_dpf": wire(0.001), "distance": 0},
        ),
        (
            "LeastUsedDegradationDPF",
            0.5,
            ["0.02", " 1e-4 "],
            {
                "load": wire(0.5),
                "load_degradation": wire(0.02),
                "load_dpf": wire(0.0001),
                "distance": 0,
            },
        ),
        (
            "WeightedRandomDPF",
            0.5,
            ["10", "0.5"],
            {"weight": 10, "weight_dpf": wire(0.5), "distance": 0},
        ),
    ],
)
def test_make_parameter(name, load, arguments, fields):
    parameter = policy(name).make_parameter(load, arguments)
    assert parameter == PoolPolicy.make(EXPECTED[name], **fields)
    assert decode_param(encode_param(parameter)) == parameter


@pytest.mark.parametrize(
    "name, arguments, message",
    [
        (
            "RoundRobin",
            ["1"],
            r"RoundRobin takes 0 argument\(s\) \(RoundRobin\), got 1",
        ),
        ("LeastUsed", ["0.1"], "LeastUsed takes 0"),
        ("RandomizedLeastUsed", ["x"], "RandomizedLeastUsed takes 0"),
        (
            "WeightedRoundRobin",
            [],
            r"WeightedRoundRobin takes 1 argument\(s\) \(WeightedRoundRobin:weight\), got 0",
        ),
        ("WeightedRoundRobin", ["1", "2"], "takes 1 argument"),
        (
            "WeightedRoundRobin",
            ["1.5"],
            "WeightedRoundRobin: weight must be an integer from 0 to 4294967295, got '1.5'",
        ),
        ("WeightedRandom", ["-1"], "weight must be an integer"),
        ("WeightedRandom", ["4294967296"], "weight must be an integer"),
        ("Priority", ["high"], "Priority: priority must be an integer"),
        ("Priority", [], "Priority:priority"),
        ("LeastUsedDegradation", [], r"LeastUsedDegradation:degradation\), got 0"),
        (
            "LeastUsedDegradation",
            ["1.01"],
            "degradation must be a fraction from 0 to 1, got '1.01'",
        ),
        ("LeastUsedDegradation", ["-0.1"], "degradation must be a fraction"),
        ("LeastUsedDegradation", ["nan"], "degradation must be a fraction"),
        ("LeastUsedDegradation", ["5%"], "degradation must be a fraction"),
        (
            "PriorityLeastUsed",
            ["2"],
            "PriorityLeastUsed: load increment must be a fraction",
        ),
        ("PriorityLeastUsedDegradation", [], "takes 1 argument"),
        (
            "RandomizedPriorityLeastUsed",
            ["0.1", "0.2"],
            r"takes 0 to 1 argument\(s\) "
            r"\(RandomizedPriorityLeastUsed:\[load increment\]\)",
        ),
        ("LeastUsedDPF", [], "LeastUsedDPF:dpf"),
        ("LeastUsedDPF", ["inf"], "LeastUsedDPF: dpf must be a fraction"),
        ("LeastUsedDegradationDPF", ["0.1"], "LeastUsedDegradationDPF:degradation:dpf"),
        ("LeastUsedDegradationDPF", ["2", "0.1"], "degradation must be"),
        ("LeastUsedDegradationDPF", ["0.1", "2"], "dpf must be"),
        ("WeightedRandomDPF", ["10"], "WeightedRandomDPF:weight:dpf"),
        ("WeightedRandomDPF", ["ten", "0.1"], "weight must be"),
        ("WeightedRandomDPF", ["10", "1.1"], "dpf must be"),
    ],
)
def test_make_parameter_refuses_bad_arguments_naming_them(name, arguments, message):
    with pytest.raises(ValueError, match=message):
        policy(name).make_parameter(0.5, arguments)


def test_make_parameter_refuses_a_nan_load():
    with pytest.raises(ValueError, match="LeastUsed: load must be a number"):
        policy("LeastUsed").make_parameter(float("nan"), [])


# -- registrar side: common behaviour ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_empty_pool_and_count_limits(name):
    provider = policy(name)
    selection = provider.new_selection(random.Random(3))
    assert selection.select(5) == []
    arguments = {
        "WeightedRoundRobin": ["2"],
        "WeightedRandom": ["2"],
        "Priority": ["1"],
        "WeightedRandomDPF": ["2", "0"],
    }
    arguments |= dict.fromkeys(
        [
            "LeastUsedDegradation",
            "PriorityLeastUsed",
            "PriorityLeastUsedDegradation",
            "LeastUsedDPF",
        ],
        ["0.01"],
    )
    arguments["LeastUsedDegradationDPF"] = ["0.01", "0.01"]
    for identifier in range(1, 6):
        selection.update(
            identifier,
            provider.make_parameter(identifier / 10, arguments.get(name, [])),
        )
    assert (len(selection), 3 in selection, 6 in selection) == (5, True, False)
    assert selection.select(0) == []
    everyone = selection.select(50)
    assert sorted(everyone) == [1, 2, 3, 4, 5]
    three = selection.select(3)
    assert len(three) == len(set(three)) == 3
    selection.remove(3)
    selection.remove(3)  # unknown now: ignored
    selection.remove(99)
    assert (len(selection), 3 in selection) == (4, False)
    for _ in range(20):
        assert 3 not in selection.select(5)
    assert sorted(selection.select(5)) == [1, 2, 4, 5]
    for identifier in (1, 2, 4, 5):
        selection.remove(identifier)
    assert selection.select(5) == []


@pytest.mark.parametrize("name", ["LeastUsed", "WeightedRandom"])
def test_update_refuses_another_policy_type(name):
    selection = policy(name).new_selection(random.Random(0))
    with pytest.raises(ValueError, match="policy 0x00000001 in a pool of policy"):
        selection.update(1, PoolPolicy.make(PolicyType.ROUND_ROBIN))


# -- round robin -------------------------------------------------------------------------------


def test_round_robin_is_fair():
    _, selection = pool("RoundRobin", {i: [] for i in range(7)})
    counts = collections.Counter(run(selection, 7 * 100 + 3))
    assert set(counts) == set(range(7))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_round_robin_order_and_new_pes_join_at_the_end():
    _, selection = pool("RoundRobin", {10: [], 20: [], 30: []})
    assert run(selection, 4) == [10, 20, 30, 10]
    selection.update(5, PoolPolicy.make(PolicyType.ROUND_ROBIN))
    assert run(selection, 4) == [20, 30, 10, 5]


def test_round_robin_moves_on_by_max_increment_per_selection():
    # rsplib: only the first max_increment PEs of an answer go to the back.
    _, selection = pool("RoundRobin", {1: [], 2: [], 3: [], 4: []})
    assert [selection.select(3) for _ in range(3)] == [[1, 2, 3], [2, 3, 4], [3, 4, 1]]
    _, selection = pool("RoundRobin", {1: [], 2: [], 3: [], 4: []}, max_increment=3)
    assert [selection.select(3) for _ in range(2)] == [[1, 2, 3], [4, 1, 2]]


def test_weighted_round_robin_proportions_and_order():
    _, selection = pool("WeightedRoundRobin", {1: ["1"], 2: ["2"], 3: ["3"]})
    picks = run(selection, 600)
    assert collections.Counter(picks) == {1: 100, 2: 200, 3: 300}
    assert (
        picks[:12] == [1, 2, 2, 3, 3, 3] * 2
    )  # a PE is chosen `weight` times in a row


def test_weighted_round_robin_weight_change_and_late_joiner():
    provider, selection = pool("WeightedRoundRobin", {1: ["3"], 2: ["3"]})
    assert run(selection, 2) == [1, 1]
    selection.update(
        1, provider.make_parameter(0, ["1"])
    )  # its remaining turns shrink to the new weight
    assert run(selection, 4) == [1, 2, 2, 2]
    selection.update(9, provider.make_parameter(0, ["2"]))  # joins the current round
    assert run(selection, 4) == [1, 9, 9, 2]


# -- random ------------------------------------------------------------------------------------


def test_random_is_roughly_uniform():
    _, selection = pool("Random", {i: [] for i in range(10)}, seed=42)
    draws = 20_000
    counts = collections.Counter(run(selection, draws))
    within_5_sigma(counts, dict.fromkeys(range(10), 0.1), draws)


@pytest.mark.parametrize(
    "name, extra", [("WeightedRandom", []), ("WeightedRandomDPF", ["0"])]
)
def test_weighted_random_proportions(name, extra):
    weights = {1: 1, 2: 2, 3: 3, 4: 4, 5: 0}
    _, selection = pool(name, {i: [str(w), *extra] for i, w in weights.items()}, seed=7)
    draws = 20_000
    counts = collections.Counter(run(selection, draws))
    assert 5 not in counts  # weight 0: never chosen, as in rsplib
    within_5_sigma(counts, {i: w / 10 for i, w in weights.items() if w}, draws)
    assert sorted(selection.select(10)) == [1, 2, 3, 4]


def test_weighted_random_draws_distinct_pes_without_replacement():
    # Two of weight 1 and one of 98: the second pick is one of the light ones 50/50.
    _, selection = pool("WeightedRandom", {1: ["1"], 2: ["1"], 3: ["98"]}, seed=5)
    draws = 4_000
    answers = [selection.select(2) for _ in range(draws)]
    assert all(len(set(a)) == 2 for a in answers)
    seconds = collections.Counter(a[1] for a in answers if a[0] == 3)
    within_5_sigma(seconds, {1: 0.5, 2: 0.5}, sum(seconds.values()))


def test_weighted_random_update_and_remove_change_the_odds():
    provider, selection = pool("WeightedRandom", {1: ["1"], 2: ["1"], 3: ["1"]}, seed=9)
    selection.update(2, provider.make_parameter(0, ["0"]))
    selection.remove(3)
    assert set(run(selection, 200)) == {1}
    selection.update(4, provider.make_parameter(0, ["3"]))  # reuses 3's slot
    counts = collections.Counter(run(selection, 4000))
    within_5_sigma(counts, {1: 0.25, 4: 0.75}, 4000)


def test_randomized_least_used_prefers_low_load():
    loads = {1: 0.0, 2: 0.5, 3: 0.9, 4: 1.0}
    _, selection = pool(
        "RandomizedLeastUsed", {i: (load, []) for i, load in loads.items()}, seed=11
    )
    draws = 20_000
    counts = collections.Counter(run(selection, draws))
    spare = {i: max(1 - load, 1 / MAX_LOAD) for i, load in loads.items()}
    within_5_sigma(
        counts, {i: s / sum(spare.values()) for i, s in spare.items()}, draws
    )
    assert counts[1] > counts[2] > counts[3]
    assert sorted(selection.select(4)) == [1, 2, 3, 4]  # a full PE stays selectable


def test_randomized_priority_least_used_counts_the_increment():
    specs = {1: (0.2, ["0.6"]), 2: (0.2, ["0"]), 3: (0.5, [])}  # spare 0.2, 0.8, 0.5
    _, selection = pool("RandomizedPriorityLeastUsed", specs, seed=13)
    draws = 20_000
    counts = collections.Counter(run(selection, draws))
    within_5_sigma(counts, {1: 0.2 / 1.5, 2: 0.8 / 1.5, 3: 0.5 / 1.5}, draws)


# -- least used family ----------------------------------------------------------------------------


def test_least_used_picks_the_minimum_and_sorts_by_load():
    loads = {1: 0.7, 2: 0.1, 3: 0.4, 4: 0.9, 5: 0.2}
    _, selection = pool("LeastUsed", {i: (load, []) for i, load in loads.items()})
    assert selection.select(1) == [2]
    assert selection.select(3) == [2, 5, 3]
    assert selection.select(10) == [2, 5, 3, 1, 4]
    assert run(selection, 5) == [2] * 5  # no degradation: the least used stays first


def test_least_used_breaks_ties_round_robin():
    _, selection = pool(
        "LeastUsed", {3: (0.5, []), 1: (0.5, []), 2: (0.5, []), 4: (0.6, [])}
    )
    assert run(selection, 7) == [3, 1, 2, 3, 1, 2, 3]


def test_least_used_load_update_reorders():
    provider, selection = pool("LeastUsed", {1: (0.1, []), 2: (0.2, [])})
    selection.update(1, provider.make_parameter(0.3, []))
    assert selection.select(2) == [2, 1]


def test_degradation_makes_a_repeatedly_chosen_pe_lose():
    provider, selection = pool(
        "LeastUsedDegradation", {1: (0.10, ["0.05"]), 2: (0.12, ["0.05"])}
    )
    # 1: 0.10 -> picked -> 0.15 > 0.12: 2 -> 0.17 > 0.15: 1 -> 0.20 > 0.17: 2 ...
    assert run(selection, 4) == [1, 2, 1, 2]
    # A re-registration, even with the same values, resets the accumulated degradation.
    selection.update(2, provider.make_parameter(0.12, ["0.05"]))
    assert selection.select(2) == [2, 1]


def test_degradation_only_for_the_first_max_increment_pes():
    _, selection = pool(
        "LeastUsedDegradation",
        {1: (0.10, ["0.5"]), 2: (0.11, ["0.5"]), 3: (0.12, ["0.5"])},
    )
    assert selection.select(2) == [1, 2]
    assert selection.select(3) == [2, 3, 1]  # only 1 degraded
    _, selection = pool(
        "LeastUsedDegradation",
        {1: (0.10, ["0.5"]), 2: (0.11, ["0.5"]), 3: (0.12, ["0.5"])},
        max_increment=2,
    )
    assert selection.select(2) == [1, 2]
    assert selection.select(3) == [3, 1, 2]


def test_degradation_saturates_at_full_load():
    _, selection = pool("LeastUsedDegradation", {1: (0.9, ["1"]), 2: (1.0, ["1"])})
    assert run(selection, 4) == [1, 2, 1, 2]  # both at the maximum: in turn


def test_priority_picks_the_highest_and_rotates_among_equals():
    _, selection = pool("Priority", {1: ["1"], 2: ["9"], 3: ["5"], 4: ["9"]})
    assert selection.select(4) == [2, 4, 3, 1]
    assert run(selection, 4) == [4, 2, 4, 2]


def test_priority_least_used_adds_the_increment_without_accumulating():
    provider, selection = pool(
        "PriorityLeastUsed", {1: (0.5, ["0.3"]), 2: (0.6, ["0.1"])}
    )
    assert run(selection, 3) == [2, 2, 2]  # 0.7 < 0.8 every time
    assert selection.select(2) == [2, 1]
    selection.update(3, provider.make_parameter(0.75, ["0"]))
    assert selection.select(3) == [2, 3, 1]


def test_priority_least_used_degradation_accumulates_the_increment():
    _, selection = pool(
        "PriorityLeastUsedDegradation", {1: (0.5, ["0.1"]), 2: (0.55, ["0.1"])}
    )
    # keys 0.6 / 0.65; 1 picked -> 0.7; 2 picked -> 0.75; 1 -> 0.8; 2 ...
    assert run(selection, 4) == [1, 2, 1, 2]


def distanced(
    provider, load: float, arguments: list[str], distance_ms: int
) -> PoolPolicy:
    return with_distance(provider.make_parameter(load, arguments), distance_ms)


def test_least_used_dpf_penalises_distance():
    provider = policy("LeastUsedDPF")
    selection = provider.new_selection(random.Random(0))
    selection.update(1, distanced(provider, 0.3, ["0.001"], 200))  # 0.3 + 0.2
    selection.update(2, distanced(provider, 0.3, ["0.001"], 50))  # 0.3 + 0.05
    selection.update(3, distanced(provider, 0.4, ["0.001"], 0))  # 0.4
    assert selection.select(3) == [2, 3, 1]
    assert run(selection, 3) == [2, 2, 2]  # no degradation
    selection.update(
        2, distanced(provider, 0.3, ["0.001"], 150)
    )  # the registrar measured again
    assert selection.select(3) == [3, 2, 1]


def test_least_used_degradation_dpf_penalises_distance_and_degrades():
    provider = policy("LeastUsedDegradationDPF")
    selection = provider.new_selection(random.Random(0))
    selection.update(1, distanced(provider, 0.3, ["0.1", "0.001"], 100))  # 0.4
    selection.update(2, distanced(provider, 0.3, ["0.1", "0.001"], 0))  # 0.3
    selection.update(
        3, distanced(provider, 0.2, ["0.1", "0.0"], 500)
    )  # 0.2: dpf 0, distance free
    # 3 -> 0.3 (behind 2, which has the same key and an older sequence number); 2 -> 0.4; 3 -> 0.4 ...
    assert run(selection, 4) == [3, 2, 3, 1]


def test_weighted_random_dpf_penalises_distance():
    provider = policy("WeightedRandomDPF")
    selection = provider.new_selection(random.Random(17))
    selection.update(1, distanced(provider, 0, ["100", "0.001"], 0))  # 100
    selection.update(2, distanced(provider, 0, ["100", "0.001"], 500))  # 100 - 50
    selection.update(
        3, distanced(provider, 0, ["100", "0.01"], 500)
    )  # negative: 1, as rsplib
    draws = 20_000
    counts = collections.Counter(run(selection, draws))
    within_5_sigma(counts, {1: 100 / 151, 2: 50 / 151, 3: 1 / 151}, draws)


def test_with_distance_and_round_distance():
    lu_dpf = policy("LeastUsedDPF").make_parameter(0.5, ["0.001"])
    assert with_distance(lu_dpf, 100).distance == 100
    assert (
        with_distance(with_distance(lu_dpf, 100), 30, add=True).distance == 130
    )  # ENRP adds the peer's
    assert with_distance(lu_dpf, 100).load == lu_dpf.load
    assert with_distance(lu_dpf, 2**40).distance == 0xFFFFFFFF
    least_used = policy("LeastUsed").make_parameter(0.5, [])
    assert with_distance(least_used, 100) is least_used
    assert [round_distance(d) for d in (0, 24, 26, 74, 76, 130)] == [
        0,
        0,
        50,
        50,
        100,
        150,
    ]
    assert round_distance(17, step_ms=10) == 20


# -- data structures ----------------------------------------------------------------------------------


def test_fenwick_tree_matches_a_linear_scan():
    rng = random.Random(23)
    tree, values = FenwickTree(), []
    for _ in range(2000):
        if values and rng.random() < 0.5:
            slot = rng.randrange(len(values))
            values[slot] = rng.choice([0, rng.randrange(1, 50)])
            tree.set(slot, values[slot])
        else:
            values.append(rng.randrange(0, 50))
            assert tree.append(values[-1]) == len(values) - 1
        assert tree.total == sum(values)
        if tree.total:
            target = rng.randrange(tree.total)
            slot = tree.find(target)
            assert sum(values[:slot]) <= target < sum(values[: slot + 1])


@pytest.mark.parametrize(
    "name, arguments",
    [
        ("LeastUsedDegradation", ["0.001"]),
        ("WeightedRandom", ["3"]),
        ("RoundRobin", []),
    ],
)
def test_selection_in_a_pool_of_100000(name, arguments):
    # O(log n) per selected PE: a thousand selections in a huge pool take no time to speak of.
    provider = policy(name)
    selection = provider.new_selection(random.Random(29))
    rng = random.Random(31)
    for identifier in range(100_000):
        selection.update(identifier, provider.make_parameter(rng.random(), arguments))
    for _ in range(1000):
        assert len(selection.select(3)) == 3
    selection.remove(0)
    selection.update(1, provider.make_parameter(0.0, arguments))
    assert len(set(selection.select(20))) == 20


# -- xenpool's LeastUsedFreeRAM ----------------------------------------------------------


def test_least_used_free_ram_skips_pes_without_room_and_books_what_it_chose(plugins):
    provider = plugins.create("policy", "LeastUsedFreeRAM")
    assert provider.make_parameter(0.5, [], free_ram_mb=700).free_ram_mb == 700
    selection = provider.new_selection(random.Random(0))
    for identifier, load, free in (
        (1, 0.1, 100),
        (2, 0.3, 900),
        (3, 0.5, 400),
        (4, 0.7, 2000),
    ):
        selection.update(
            identifier, provider.make_parameter(load, [], free_ram_mb=free)
        )
    assert selection.select(3) == [1, 2, 3]  # no request: plain least used
    assert selection.select(2, ram_mb=300) == [2, 3]  # PE 1 has 100 MB free
    assert selection.select(2, ram_mb=300) == [
        2,
        3,
    ]  # PE 2 still has 600 after one booking
    assert selection.select(2, ram_mb=300) == [2, 3]  # and 300 after two
    assert selection.select(2, ram_mb=300) == [
        3,
        4,
    ]  # now it is full until its next update
    selection.update(
        2, provider.make_parameter(0.3, [], free_ram_mb=900)
    )  # an update clears bookings
    assert selection.select(1, ram_mb=300) == [2]
    assert selection.select(5, ram_mb=5000) == []
