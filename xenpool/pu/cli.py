"""``xenpool-pu create ...``: ask the pool for a VM and keep it, in this terminal.

Exit status: 0 the VM was stopped cleanly (Ctrl-C or SIGTERM), 2 bad command line, 3 the pool
refused it for good (it runs elsewhere already, or the request is invalid), 1 anything
else.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from .. import config, discovery
from ..config import ipv4_address, secret_file
from ..discovery import multicast_address
from ..protocol import session as S
from ..protocol.errors import ProtocolError
from ..tls import PeTls
from .core import PuSettings, State, VmKeeper


def registrar_endpoint(text: str) -> str:
    """HOST:PORT (or [IPv6]:PORT, or a Twisted endpoint string) -> endpoint string."""
    try:
        return config.registrar_endpoint(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def argparse_type(parse):
    """``parse`` as an argparse type: its ValueError's message becomes the error shown."""

    def checked(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return checked


def parser() -> argparse.ArgumentParser:
    p = config.OneLineParser(
        prog="xenpool-pu",
        description="A pool user: get a VM from the pool and keep it.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser(
        "create",
        help="create a VM and keep it until Ctrl-C",
        epilog="exit status: 0 the VM was stopped cleanly (Ctrl-C), 2 bad command line, 3 the pool refused it "
        "for good (it runs already, or the request is invalid), 1 anything else",
    )
    c.add_argument(
        "--server-id", required=True, help="the VM's name, 1-32 of A-Za-z0-9._-"
    )
    c.add_argument("--ram", type=positive(int), required=True, help="RAM in MB")
    c.add_argument("--vcpus", type=positive(int), default=1)
    c.add_argument(
        "--disk",
        default="",
        help="nbd://host:port/export, iscsi://host/iqn/lun, aoe:e1.1 or a path",
    )
    c.add_argument(
        "--ip", action="append", default=[], help="an IP address of the VM (may repeat)"
    )
    c.add_argument("--pool", default="Xen")
    c.add_argument(
        "--registrar",
        action="append",
        type=registrar_endpoint,
        default=[],
        metavar="HOST:PORT",
        help="a registrar (may repeat; default 127.0.0.1:3863 unless --registrar-announce)",
    )
    c.add_argument(
        "--registrar-announce",
        type=argparse_type(multicast_address),
        metavar="GROUP:PORT",
        help="also use the registrars heard announcing there, e.g. 239.0.0.50:3863",
    )
    c.add_argument(
        "--announce-interface",
        type=argparse_type(ipv4_address),
        metavar="IP",
        help="the local IPv4 address whose interface announces are heard on",
    )
    c.add_argument(
        "--heartbeat-interval",
        type=positive(float),
        default=1.0,
        metavar="S",
        help="default 1",
    )
    c.add_argument(
        "--heartbeat-timeout",
        type=positive(float),
        default=3.0,
        metavar="S",
        help="seconds without an answer before failing over (default 3)",
    )
    c.add_argument(
        "--connect-timeout",
        type=positive(float),
        default=PuSettings.connect_timeout_s,
        metavar="S",
        help="seconds to wait for a PE's connection before trying the next one (default 2)",
    )
    add_credential_arguments(c)
    return p


def add_credential_arguments(c: argparse.ArgumentParser) -> None:
    """Who this PU is to the PEs (their --pu-access) and how it reaches them."""
    c.add_argument(
        "--pu-name",
        metavar="NAME",
        help="this PU's name at the PEs (their --pu-access file)",
    )
    c.add_argument(
        "--pu-secret-file",
        metavar="FILE",
        type=argparse_type(secret_file),
        help="this PU's secret, which the PEs know: each create, adoption and stop is proven with it",
    )
    c.add_argument(
        "--pe-tls",
        metavar="OPTIONS",
        type=argparse_type(PeTls),
        help="reach the PEs over TLS with these tls: options, e.g. "
        "trustRoots=/etc/xenpool/ca:certificate=pu.pem:privateKey=pu.key",
    )


def credential(name: str | None, secret: bytes | None, clock):
    """--pu-name and --pu-secret-file as a PuCredential (None without a secret)."""
    from ..asap_client import PuCredential

    if secret is None:
        return None
    if not name:
        raise ValueError("--pu-secret-file needs --pu-name")
    return PuCredential(name, secret, clock)


def status_line(k: VmKeeper, state: State, why: str) -> str:
    """What the terminal shows for each state change: while waiting, every PE's answer."""
    extra = (
        f" (failover took {k.last_failover_s:.2f} s)"
        if state == State.RUNNING and k.last_failover_s
        else ""
    )
    return f"{time.strftime('%H:%M:%S')} {k.server_id}: {state.value}: {why}{extra}"


def show(k: VmKeeper, state: State, why: str) -> None:
    print(status_line(k, state, why), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    request = S.CreateServer(
        args.server_id, args.disk, tuple(args.ip), args.ram, args.vcpus
    )
    try:
        S.check_create(request)
    except ProtocolError as err:
        option = {"ips": "ip", "ram_mb": "ram"}.get(err.field, err.field)
        print(
            f"xenpool-pu: --{option.replace('_', '-')}: {err.reason}",
            file=sys.stderr,
        )
        return 2
    if args.disk:
        from ..interfaces import DiskSpecError
        from ..pe.disks import storage_for
        from ..plugins import PluginError, load_plugins

        try:  # parsed only: whether the disk is reachable is the PE's to check
            storage_for(load_plugins(), args.disk)
        except (DiskSpecError, PluginError) as err:
            print(f"xenpool-pu: --disk: {err}", file=sys.stderr)
            return 2
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorThreads

    from ..asap_client import TcpPoolAccess

    settings = PuSettings(
        pool_handle=args.pool.encode(),
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout,
        connect_timeout_s=args.connect_timeout,
    )
    registrars, announce_listener = discovery.registrars(
        reactor, args.registrar, args.registrar_announce, args.announce_interface or ""
    )
    if announce_listener is not None:
        announce_listener.startService()
    try:
        proof = credential(args.pu_name, args.pu_secret_file, reactor)
    except ValueError as err:
        print(f"xenpool-pu: {err}", file=sys.stderr)
        return 2
    access = TcpPoolAccess(
        reactor,
        registrars,
        pe_connect_timeout_s=settings.connect_timeout_s,
        pe_tls=args.pe_tls,
        credential=proof,
    )
    keeper = VmKeeper(request, access, reactor, settings)

    keeper.events.on_state = show
    outcome: list[State] = []

    stopping: list[int] = []  # the signals received
    # "left": a second signal left the VM running; "stopped": reactor.stop() was called
    # (a second call would raise ReactorNotRunning from the keeper's last callback)
    flags = {"left": False, "stopped": False}

    def stop_reactor() -> None:
        if not flags["stopped"]:
            flags["stopped"] = True
            reactor.stop()

    def finished(state: State) -> None:
        outcome.append(state)
        stop_reactor()

    def failed(failure) -> None:
        print(f"xenpool-pu: {failure.getErrorMessage()}", file=sys.stderr)
        stop_reactor()

    def interrupted(signum, frame) -> None:
        # SIGTERM (systemd, kill) stops the VM as Ctrl-C does; a second one leaves it
        if stopping:
            print(
                f"\n{args.server_id}: left running; its PE keeps it for its --lease",
                flush=True,
            )
            flags["left"] = True
            IReactorThreads(reactor).callFromThread(stop_reactor)
            return
        stopping.append(signum)
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(
            f"\n{args.server_id}: stopping the VM ({again} again to leave it running)",
            flush=True,
        )
        IReactorThreads(reactor).callFromThread(keeper.stop)

    def start() -> None:
        signal.signal(signal.SIGINT, interrupted)
        signal.signal(signal.SIGTERM, interrupted)
        keeper.run().addCallbacks(finished, failed)

    reactor.callWhenRunning(start)
    # Twisted's IReactorCore.run() omits installSignalHandlers, which ReactorBase.run takes.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    if not outcome or flags["left"]:
        return 1
    return {State.STOPPED: 0, State.REFUSED: 3}.get(outcome[0], 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
