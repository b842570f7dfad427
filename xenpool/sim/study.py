"""``xenpool sim SCENARIO.json ...``: runs of a scenario, their metric, a plot."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def load_options(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    from ..pe.tap import weights

    return weights(text)


def pe_overrides(args: argparse.Namespace) -> dict:
    """Command-line changes to the scenario's PE constants."""
    overrides = {}
    if args.load_interval is not None:
        overrides["load_update_interval_s"] = args.load_interval
    if args.smoothing is not None:
        overrides["load_smoothing_factor"] = args.smoothing
    if getattr(args, "load_window", None):
        overrides["load_window_s"] = args.load_window
    if getattr(args, "count_cpu_wait", False):
        overrides["count_cpu_wait"] = True
    return overrides


def _plotting_missing() -> str | None:
    """Why ``--plot`` cannot draw here, or None: matplotlib is the ``sim`` extra."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed: pip install 'xenpool[sim]'"
    return None


def run(args: argparse.Namespace) -> int:
    from ..plugins import PluginError, load_plugins
    from .run import Simulation

    if getattr(args, "plot", None) and (missing := _plotting_missing()) is not None:
        print(f"xenpool sim: {missing}")
        return 2
    try:
        scenario = json.loads(Path(args.scenario).read_text())
    except (OSError, ValueError) as err:
        print(f"xenpool sim: {args.scenario}: {err}")
        return 2
    if getattr(args, "greedy_oracle", False):
        return _greedy_oracle(scenario, args)
    plugins = load_plugins()
    started = time.monotonic()
    results = []
    for i in range(args.runs):
        try:
            sim = Simulation(
                scenario,
                plugins,
                load_plugin=args.load_plugin,
                policy=args.policy,
                seed=args.seed + i,
                load_options=load_options(args.load_weight),
                pe_overrides=pe_overrides(args),
                rebalance=args.rebalance,
                rebalance_interval_s=args.rebalance_interval,
            )
        except PluginError as err:
            print(f"xenpool sim: {err}")
            return 2
        results.append(sim.run())
    wall_s = time.monotonic() - started
    summary = {
        "scenario": scenario.get("name", args.scenario),
        "load_plugin": args.load_plugin,
        "policy": args.policy or scenario.get("policy", "LeastUsed"),
        "pe_overrides": pe_overrides(args),
        "rebalance": args.rebalance,
        "rebalance_interval_s": args.rebalance_interval if args.rebalance else None,
        "runs": [
            {
                "seed": args.seed + i,
                "metric_percent": r.metric_percent,
                "ram_failed_starts": r.ram_failed_starts,
                "not_started": r.not_started,
                "moves": r.moves,
                "samples_percent": r.samples_percent,
                "settled_metric_percent": r.settled_metric_percent,
                "per_pe": r.per_pe,
            }
            for i, r in enumerate(results)
        ],
        "mean_metric_percent": round(
            statistics.mean(r.metric_percent for r in results), 2
        ),
        "mean_ram_failed_starts": round(
            statistics.mean(r.ram_failed_starts for r in results), 2
        ),
        "mean_settled_metric_percent": _mean_or_none(
            [r.settled_metric_percent for r in results]
        ),
        "mean_moves": round(statistics.mean(r.moves for r in results), 2),
        "wall_s": round(wall_s, 2),
    }
    if args.plot:
        plot(scenario, summary, args.plot)
    if args.json:
        print(json.dumps(summary))
        return 0
    _print(summary)
    return 0


def _greedy_oracle(scenario: dict, args: argparse.Namespace) -> int:
    import random

    from .oracle import greedy_deviation

    try:
        runs = [
            greedy_deviation(scenario, random.Random(args.seed + i))
            for i in range(args.runs)
        ]
    except ValueError as err:
        print(f"xenpool sim: {args.scenario}: {err}")
        return 1
    result = {
        "scenario": scenario.get("name", args.scenario),
        "greedy_oracle": True,
        "runs": [
            {"seed": args.seed + i, "metric_percent": round(m, 2)}
            for i, m in enumerate(runs)
        ],
        "mean_metric_percent": round(statistics.mean(runs), 2),
        "min_metric_percent": round(min(runs), 2),
        "max_metric_percent": round(max(runs), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['scenario']}: greedy placement knowing every VM's true CPU demand: mean deviation "
            f"{result['mean_metric_percent']:.1f} % (min {result['min_metric_percent']:.1f} %, "
            f"max {result['max_metric_percent']:.1f} %) over {len(runs)} tie-breaking seeds"
        )
    return 0


def _mean_or_none(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.mean(known), 2) if known else None


def _print(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"{summary['scenario']}: load plugin {summary['load_plugin']}, policy {summary['policy']}"
    )
    for column in (
        "seed",
        "deviation",
        "RAM-failed starts",
        "not started",
        "per-PE theoretical CPU (RAM MB)",
    ):
        table.add_column(column)
    for run in summary["runs"]:
        per_pe = "  ".join(
            f"{p['theoretical_cpu_percent']:.0f}% ({p['ram_mb']})"
            for p in run["per_pe"]
        )
        table.add_row(
            str(run["seed"]),
            f"{run['metric_percent']:.1f} %",
            str(run["ram_failed_starts"]),
            str(run["not_started"]),
            per_pe,
        )
    console.print(table)
    settled = summary["mean_settled_metric_percent"]
    console.print(
        f"mean deviation {summary['mean_metric_percent']:.1f} %"
        + (
            f" (samples from 600 s after the last start on: {settled:.1f} %)"
            if settled is not None
            else ""
        )
        + f", mean RAM-failed starts {summary['mean_ram_failed_starts']:.1f}, mean moves {summary['mean_moves']:.1f},"
        f" {len(summary['runs'])} runs in {summary['wall_s']:.1f} s"
    )


def plot(scenario: dict, summary: dict, path: str) -> None:
    """Each PE's theoretical CPU load stacked by VM type, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = scenario["vm_types"]
    cycle = scenario["load_generator"]["cycle_s"]
    runs = summary["runs"]
    fig, axes = plt.subplots(
        1, len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False, sharey=True
    )
    cpus = {pe["name"]: pe["cpus"] for pe in scenario["pes"]}
    for ax, run in zip(axes[0], runs):
        names = [p["pe"] for p in run["per_pe"]]
        bottom = [0.0] * len(names)
        for vm_type, spec in types.items():
            heights = [
                100
                * sum(
                    spec["busy_s"] / cycle
                    for vm in p["vms"]
                    if vm.rsplit("-", 1)[0] == vm_type
                )
                / cpus[p["pe"]]
                for p in run["per_pe"]
            ]
            ax.bar(names, heights, bottom=bottom, label=vm_type)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(
            f"seed {run['seed']}: {run['metric_percent']:.1f} % deviation", fontsize=9
        )
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[0][0].set_ylabel("theoretical CPU load (%)")
    axes[0][-1].legend(fontsize=7)
    rebalance = (
        f", rebalancing {summary['rebalance']}" if summary.get("rebalance") else ""
    )
    fig.suptitle(
        f"{summary['scenario']}: {summary['load_plugin']}, {summary['policy']}{rebalance} (at the end of each run)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
