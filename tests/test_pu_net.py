"""The PU's PE connect timeout: a setting, short by default, used for PE connections."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from xenpool.asap_client import TcpPoolAccess
from xenpool.discovery import Registrars
from xenpool.pu import cli, tap
from xenpool.testing import element


def connect_timeout(access: TcpPoolAccess, reactor: MemoryReactorClock) -> float:
    access.connect(element(1), lambda message: None)
    host, port, factory, timeout, bind = reactor.tcpClients[-1]
    return timeout


def test_a_pu_connects_to_pes_with_its_own_short_timeout():
    reactor = MemoryReactorClock()
    access = TcpPoolAccess(reactor, Registrars(reactor, []), pe_connect_timeout_s=2.0)
    assert (
        connect_timeout(access, reactor) == 2.0 and access.timeout_s == 5.0
    )  # registrars as before


def test_without_it_pe_connections_keep_the_common_timeout():
    reactor = MemoryReactorClock()  # as the PE's own use of TcpPoolAccess
    assert (
        connect_timeout(TcpPoolAccess(reactor, Registrars(reactor, [])), reactor) == 5.0
    )


def test_the_commands_take_a_connect_timeout(tmp_path):
    args = cli.parser().parse_args(["create", "--server-id", "a", "--ram", "1"])
    assert args.connect_timeout == 2.0
    args = cli.parser().parse_args(
        ["create", "--server-id", "a", "--ram", "1", "--connect-timeout", "0.5"]
    )
    assert args.connect_timeout == 0.5
    keep = tmp_path / "vms.conf"
    keep.write_text("[vm a]\nram = 64\n")
    options = tap.Options()
    options.parseOptions(["--keep", str(keep), "--connect-timeout", "0.7"])
    assert options.settings["connect-timeout"] == 0.7
