"""The simulator: real registrar, PE and PU code on a virtual clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xenpool.plugins import load_plugins
from xenpool.sim.run import Simulation

SCENARIOS = (
    Path(__file__).resolve().parents[1] / "scenarios"
)  # copies of the prototype's scenarios
MIXED = SCENARIOS / "thesis-mixed-order.json"
BY_TYPE = SCENARIOS / "thesis-by-type-order.json"


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def simulate(plugins, path: Path, load_plugin: str, seed: int):
    return Simulation(
        json.loads(path.read_text()),
        plugins,
        load_plugin=load_plugin,
        policy=None,
        seed=seed,
    ).run()


def test_every_vm_is_placed_once_within_ram(plugins):
    result = simulate(plugins, MIXED, "weighted", 1)
    placed = [vm for pe in result.per_pe for vm in pe["vms"]]
    assert len(placed) == len(set(placed)) == 40 and result.not_started == 0
    assert all(
        pe["ram_mb"] <= 1024 - 12 - 7 for pe in result.per_pe
    )  # the overhead formula holds


def test_same_seed_same_result(plugins):
    a, b = simulate(plugins, MIXED, "max", 3), simulate(plugins, MIXED, "max", 3)
    assert (a.metric_percent, a.per_pe) == (b.metric_percent, b.per_pe)
    assert simulate(plugins, MIXED, "max", 4).per_pe != a.per_pe


def test_by_type_order_reaches_the_ideal_as_the_prototype_did(plugins):
    result = simulate(plugins, BY_TYPE, "max", 0)
    assert result.metric_percent == 0 and {
        pe["theoretical_cpu_percent"] for pe in result.per_pe
    } == {86.7}


def test_cpu_only_fails_more_starts_for_lack_of_ram(plugins):
    cpu = sum(
        simulate(plugins, MIXED, "cpu", seed).ram_failed_starts for seed in range(3)
    )
    weighted = sum(
        simulate(plugins, MIXED, "weighted", seed).ram_failed_starts
        for seed in range(3)
    )
    assert cpu > weighted


def test_the_command_prints_json_and_draws_the_plot(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpool.cli",
            "sim",
            str(MIXED),
            "--load-plugin",
            "weighted",
            "--runs",
            "2",
            "--json",
            "--plot",
            str(tmp_path / "plot.png"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary = json.loads(out)
    assert [
        set(r) >= {"metric_percent", "ram_failed_starts", "not_started", "moves"}
        for r in summary["runs"]
    ] == [True] * 2
    assert summary["mean_metric_percent"] == pytest.approx(
        sum(r["metric_percent"] for r in summary["runs"]) / 2, abs=0.01
    )
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpool.cli",
            "sim",
            str(MIXED),
            "--load-plugin",
            "nosuch",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "installed: cpu, max, weighted" in bad.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "xenpool.cli", "sim", str(MIXED), "--load-window", "-1"],
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2
        and "--load-window: must be seconds >= 0, got '-1'" in bad.stderr
    )


def test_the_greedy_oracle_places_by_true_demand_within_ram():
    import random

    from xenpool.sim.oracle import greedy_deviation

    scenario = json.loads(BY_TYPE.read_text())
    assert greedy_deviation(scenario, random.Random(0)) == pytest.approx(
        0.0, abs=1e-9
    )  # one of each type per PE
    tiny = {
        "load_generator": {"cycle_s": 30},
        "pes": [
            {"name": "a", "cpus": 1, "memory_mb": 1024},
            {"name": "b", "cpus": 1, "memory_mb": 1024},
        ],
        "vm_types": {
            "big": {"ram_mb": 900, "busy_s": 15},
            "small": {"ram_mb": 100, "busy_s": 3},
        },
        "starts": [
            {"server_id": "big-1", "type": "big", "at_s": 0},
            {"server_id": "big-2", "type": "big", "at_s": 1},
            {"server_id": "small-1", "type": "small", "at_s": 2},
        ],
    }
    # big-1 and big-2 take a PE each (50 %, 105 MB left after the 19 MB overhead); small-1 (10 %) then goes to
    # either: loads 60 % and 50 %, a mean deviation of 5 %
    assert greedy_deviation(tiny, random.Random(0)) == pytest.approx(5.0)
    tiny["starts"].append({"server_id": "big-3", "type": "big", "at_s": 3})
    with pytest.raises(ValueError, match="big-3 fits on no PE"):
        greedy_deviation(tiny, random.Random(0))


def test_the_command_prints_the_greedy_oracle():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpool.cli",
            "sim",
            str(MIXED),
            "--greedy-oracle",
            "--runs",
            "20",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary = json.loads(out)
    assert (
        len(summary["runs"]) == 20
        and summary["min_metric_percent"]
        <= summary["mean_metric_percent"]
        <= summary["max_metric_percent"]
    )
    assert (
        summary["mean_metric_percent"] > 5
    )  # arrival order defeats even perfect knowledge


def test_a_load_window_reaches_the_simulated_pes(plugins):
    def run(overrides):
        return Simulation(
            json.loads(MIXED.read_text()),
            plugins,
            load_plugin="weighted",
            policy="LeastUsedFreeRAM",
            seed=5,
            pe_overrides=overrides,
        )

    windowed = run({"load_window_s": 1200})
    assert windowed.load_settings.load_window_s == 1200
    assert (
        windowed.run().per_pe != run({}).run().per_pe
    )  # the PEs report other loads, so VMs go elsewhere


def test_plot_without_matplotlib_says_which_extra_to_install(
    tmp_path, monkeypatch, capsys
):
    from xenpool import cli

    monkeypatch.setitem(
        sys.modules, "matplotlib", None
    )  # import matplotlib raises ImportError
    assert (
        cli.main(
            ["sim", str(MIXED), "--runs", "1", "--plot", str(tmp_path / "plot.png")]
        )
        == 2
    )
    assert "pip install 'xenpool[sim]'" in capsys.readouterr().out
    assert not (tmp_path / "plot.png").exists()
