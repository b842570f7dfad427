"""The ``xenpool`` command: demo, plugins, decode, bench, fuzz and chaos tools.

Exit status: 0 success, 1 a check failed (fuzz found a crash), 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__, config


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be seconds >= 0, got {text!r}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.qemu:
        from .tools import qemu_demo

        return qemu_demo.run()
    if args.protocol:
        from .tools.demo import run
    else:
        from .tools.cluster_demo import run
    return run()


def _cmd_plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .plugins import KINDS, PluginError, load_plugins

    try:
        plugins = load_plugins()
    except PluginError as err:
        print(f"xenpool: {err}", file=sys.stderr)
        return 1
    table = Table(title="Installed xenpool plugins")
    for column in ("kind", "name", "plugin", "factory"):
        table.add_column(column)
    for kind in KINDS:
        for p in plugins.providers(kind):
            table.add_row(
                kind,
                p.name,
                p.plugin,
                f"{p.factory.__module__}.{p.factory.__qualname__}",
            )
    Console().print(table)
    for why in plugins.broken.values():  # a broken third-party plugin hides only itself
        print(f"xenpool plugins: warning: {why}; disabled", file=sys.stderr)
    return 0


def _cmd_examples(args: argparse.Namespace) -> int:
    """Copy the shipped sample configs, node files and domain templates to a directory."""
    import importlib.resources
    from pathlib import Path

    target = Path(args.directory)
    shipped = [
        f
        for f in importlib.resources.files("xenpool.etc").iterdir()
        if f.name.endswith((".conf", ".xml"))
    ]
    existing = [f.name for f in shipped if (target / f.name).exists()]
    if existing:
        print(
            f"xenpool examples: {target} has {', '.join(sorted(existing))} already; nothing copied",
            file=sys.stderr,
        )
        return 1
    try:
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(shipped, key=lambda f: f.name):
            (target / f.name).write_bytes(f.read_bytes())
    except OSError as err:
        print(f"xenpool examples: {target}: {err.strerror}", file=sys.stderr)
        return 1
    print(
        f"{len(shipped)} files in {target}: {', '.join(sorted(f.name for f in shipped))}"
    )
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    from .protocol import messages, session
    from .protocol.errors import ProtocolError

    try:
        data = bytes.fromhex(args.hex)
    except ValueError:
        print("xenpool decode: HEX: not hexadecimal", file=sys.stderr)
        return 2
    try:
        if args.protocol == "session":
            msg: object = session.decode(data)
        else:
            ppid = messages.ENRP_PPID if args.protocol == "enrp" else messages.ASAP_PPID
            msg = messages.decode(data, ppid)
    except ProtocolError as err:
        print(f"xenpool decode: {err} (cause {err.cause.name})", file=sys.stderr)
        return 1
    print(msg)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .tools import bench_codec

    return bench_codec.run(args)


def _cmd_bench_registrar(args: argparse.Namespace) -> int:
    from .tools import bench_registrar

    return bench_registrar.run(args)


def _cmd_bench_pe(args: argparse.Namespace) -> int:
    from .tools import bench_pe

    return bench_pe.run(args)


def _cmd_bench_failover(args: argparse.Namespace) -> int:
    if args.qemu:
        from .tools.bench_failover_qemu import run
    else:
        from .tools.bench_failover import run

    return run(args)


def _cmd_fence_confirm(args: argparse.Namespace) -> int:
    from .interfaces import IOperatorConfirmed
    from .plugins import PluginError, load_plugins

    try:
        manual = load_plugins().create("stonith", "manual", state_dir=args.state_dir)
        if not IOperatorConfirmed.providedBy(manual):
            raise ValueError(
                "the installed 'manual' stonith plugin takes no operator confirmations"
            )
        path = manual.confirm(args.host)
    except (PluginError, ValueError, OSError) as err:
        print(f"xenpool fence-confirm: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.host} confirmed off ({path}); the next manual fence of it goes ahead, once"
    )
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from .sim.study import run

    return run(args)


def _cmd_fuzz(args: argparse.Namespace) -> int:
    from .tools.fuzz import run

    return run(cases=args.cases, seed=args.seed, progress=not args.quiet)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = config.OneLineParser(
        prog="xenpool", description="Highly available VMs with Reliable Server Pooling."
    )
    p.add_argument("--version", action="version", version=f"xenpool {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="show xenpool at work: a cluster, a host failure and its failover"
    )
    demo.add_argument(
        "--protocol",
        action="store_true",
        help="instead, walk through the wire protocol",
    )
    demo.add_argument(
        "--qemu",
        action="store_true",
        help="real guests on three QEMU hosts with NBD disks, one powered off (root)",
    )
    demo.set_defaults(func=_cmd_demo)
    ex = sub.add_parser(
        "examples",
        help="copy the sample configs and domain templates xenpool ships to DIRECTORY",
    )
    ex.add_argument("directory")
    ex.set_defaults(func=_cmd_examples)
    sub.add_parser("plugins", help="list installed plugins").set_defaults(
        func=_cmd_plugins
    )

    from .console.cli import add_parsers as add_console

    add_console(sub)

    d = sub.add_parser("decode", help="decode one message given in hex")
    d.add_argument("hex")
    d.add_argument("--protocol", choices=("asap", "enrp", "session"), default="asap")
    d.set_defaults(func=_cmd_decode)

    b = sub.add_parser(
        "bench", help="benchmarks, each against a baseline measured in the same run"
    )
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    codec = bsub.add_parser(
        "codec", help="HANDLE_RESOLUTION_RESPONSE decodes/encodes per second"
    )
    codec.add_argument("--json", action="store_true", help="print one JSON object")
    codec.add_argument(
        "--seconds", type=float, default=1.0, help="time per measurement (default 1)"
    )
    codec.set_defaults(func=_cmd_bench)
    reg = bsub.add_parser(
        "registrar",
        help="handle resolutions per second of a real registrar daemon over TCP",
    )
    reg.add_argument(
        "--pes",
        type=_positive,
        default=1000,
        help="PEs registered in the pool (default 1000)",
    )
    reg.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="time per measured run, after a warm-up (default 3)",
    )
    reg.add_argument("--json", action="store_true", help="print one JSON object")
    reg.add_argument(
        "--profile",
        metavar="FILE",
        help="run the daemon under cProfile and save its stats to FILE",
    )
    reg.set_defaults(func=_cmd_bench_registrar)
    pe = bsub.add_parser(
        "pe", help="CPU a real PE daemon spends on VMs heartbeated by their PUs"
    )
    pe.add_argument(
        "--vms",
        type=_positive,
        default=50,
        help="VMs, one PU session each (default 50)",
    )
    pe.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="length of each measured window (default 60)",
    )
    pe.add_argument("--json", action="store_true", help="print one JSON object")
    pe.add_argument(
        "--profile",
        metavar="FILE",
        help="run the PE daemon under cProfile and save its stats to FILE",
    )
    pe.set_defaults(func=_cmd_bench_pe)

    fo = bsub.add_parser(
        "failover", help="time from a host's loss to its VMs running elsewhere"
    )
    fo.add_argument("--trials", type=_positive, default=10)
    fo.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S")
    fo.add_argument("--heartbeat-timeout", type=float, default=3.0, metavar="S")
    fo.add_argument("--json", action="store_true")
    fo.add_argument(
        "--qemu",
        action="store_true",
        help="real guests on three QEMU hosts with NBD disks (root; see the README)",
    )
    fo.add_argument(
        "--keep-failed",
        action="store_true",
        help="with --qemu: keep the bed's logs, consoles and disks when a trial fails",
    )
    fo.set_defaults(func=_cmd_bench_failover)

    sim = sub.add_parser(
        "sim", help="simulate a scenario with the real registrar, PE and PU code"
    )
    sim.add_argument("scenario", help="a scenario JSON file (scenarios/*.json)")
    sim.add_argument("--load-plugin", default="weighted", help="the PEs' load metric")
    sim.add_argument(
        "--load-weight", default=None, help="its options, e.g. cpu=0.75,ram=0.25"
    )
    sim.add_argument(
        "--policy", default=None, help="the pool policy (default: the scenario's)"
    )
    sim.add_argument(
        "--load-interval",
        type=float,
        default=None,
        metavar="S",
        help="override the PEs' sampling interval",
    )
    sim.add_argument(
        "--smoothing",
        type=float,
        default=None,
        metavar="K",
        help="override the PEs' load smoothing",
    )
    sim.add_argument(
        "--load-window",
        type=_seconds,
        default=None,
        metavar="S",
        help="PEs report a VM's load as its mean CPU over the last S seconds instead of smoothing",
    )
    sim.add_argument(
        "--count-cpu-wait",
        action="store_true",
        help="PEs count the time a VM waited for a core as its load (what it wants, not what it got)",
    )
    sim.add_argument(
        "--rebalance",
        default=None,
        metavar="NAME",
        help="a rebalancer plugin the PEs run, e.g. hot-cold",
    )
    sim.add_argument(
        "--rebalance-interval",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds between a PE's rebalancing decisions (default 120)",
    )
    sim.add_argument(
        "--greedy-oracle",
        action="store_true",
        help="instead: the bound of greedy placement that knows every VM's true CPU demand",
    )
    sim.add_argument("--runs", type=_positive, default=1)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", action="store_true")
    sim.add_argument(
        "--plot",
        metavar="OUT.png",
        help="each PE's theoretical CPU load by VM type, a panel per run",
    )
    sim.set_defaults(func=_cmd_sim)

    fc = sub.add_parser(
        "fence-confirm", help="confirm a host is off, for the 'manual' stonith plugin"
    )
    fc.add_argument("host")
    fc.add_argument(
        "--state-dir",
        default="/var/lib/xenpool/fence",
        help="the manual plugin's state_dir option",
    )
    fc.set_defaults(func=_cmd_fence_confirm)

    from .chaos.campaign import add_parser as add_chaos

    add_chaos(sub)

    f = sub.add_parser("fuzz", help="feed random and mutated bytes to every decoder")
    f.add_argument("--cases", type=_positive, default=100_000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_cmd_fuzz)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
