"""What the test beds share: network namespaces on a bridge, and a bed torn down on exit.

Both beds (the chaos bed, ``xenpool.chaos.bed``, and the QEMU bed, ``xenpool.tools.qemubed``)
give every node its own network namespace with its own address on a /24, a veth to one
bridge in the root namespace whose first address is the controller's. ``BridgedNamespaces``
creates that network for a name prefix (``xc{tag}``, ``xq{tag}``) and removes it again;
``TornDownOnExit`` makes ``with Bed(...) as bed:`` tear the bed down on any exit, SIGTERM
and SIGHUP included. Root only.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Self

BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def free_subnet(base: str, thirds: range, what: str) -> str:
    """The first ``{base}{third}.`` (``base`` like ``10.213.``) no address or route of
    the root namespace uses, as a prefix of addresses."""
    used = sh("ip", "-4", "-o", "addr").stdout + sh("ip", "-4", "route").stdout
    for third in thirds:
        prefix = f"{base}{third}."
        if prefix not in used:
            return prefix
    raise RuntimeError(f"no free {base}x.0/24 subnet for {what}")


class BridgedNamespaces:
    """The bridge ``{name}br`` (address ``{prefix}1``) and, per node, the namespace
    ``{name}-{node}`` with a veth (``{name}v{i}`` outside on the bridge, ``eth0``
    inside) and the address ``{prefix}{10+i}``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bridge = f"{name}br"
        self.prefix = ""
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.forward_rule: list[str] | None = None

    @property
    def controller(self) -> str:
        """The root namespace's address on the bridge."""
        return f"{self.prefix}1"

    def create(self, prefix: str, nodes: list[str]) -> list[tuple[str, str]]:
        """The network on ``prefix`` (``10.213.200.``); each node's (netns, address)."""
        self.prefix = prefix
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        sh("ip", "addr", "add", f"{self.controller}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        if BRIDGE_NF.exists():
            # bridged frames go through the root namespace's FORWARD chain (and its policy)
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            sh("iptables", "-I", *rule)
            self.forward_rule = rule
        made = []
        for i, node in enumerate(nodes):
            netns = f"{self.name}-{node}"
            sh("ip", "netns", "add", netns)
            self.namespaces.append(netns)
            outside, inside = f"{self.name}v{i}", f"{self.name}p{i}"
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links.append(outside)
            sh("ip", "link", "set", outside, "master", self.bridge, "up")
            sh("ip", "link", "set", inside, "netns", netns)
            address = f"{prefix}{10 + i}"
            for cmd in (
                ["link", "set", "lo", "up"],
                ["link", "set", inside, "name", "eth0"],
                ["addr", "add", f"{address}/24", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
            ):
                sh("ip", "-n", netns, *cmd)
            made.append((netns, address))
        return made

    def remove(self) -> None:
        """Namespaces, links and the FORWARD rule gone (whatever of them was made)."""
        for netns in self.namespaces:
            sh("ip", "netns", "del", netns, check=False)
        for link in self.links:
            sh("ip", "link", "del", link, check=False)
        if self.forward_rule:
            sh("iptables", "-D", *self.forward_rule, check=False)
            self.forward_rule = None
        self.namespaces, self.links = [], []


class TornDownOnExit:
    """``with bed:`` runs ``set_up()`` and, on any exit (a failed set-up, SIGTERM and
    SIGHUP included: they raise SystemExit), ``teardown()``: ``stop_processes()``, then
    ``net.remove()``, then the old signal handlers back."""

    net: BridgedNamespaces
    _old_handlers: dict

    @property
    def bridge(self) -> str:
        return self.net.bridge

    @property
    def prefix(self) -> str:
        """The bed's /24 (``10.213.200.``), empty before its network is built."""
        return self.net.prefix

    def set_up(self) -> None:
        raise NotImplementedError

    def stop_processes(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._old_handlers = {
            s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)
        }
        for s in self._old_handlers:
            signal.signal(s, self._terminated)
        try:
            self.set_up()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _terminated(self, signum, frame) -> None:
        raise SystemExit(128 + signum)  # unwinds through __exit__: a clean teardown

    def teardown(self) -> None:
        self.stop_processes()
        self.net.remove()
        for s, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(s, handler)
        self._old_handlers = {}
