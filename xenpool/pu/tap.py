"""``twistd -n xenpool-pu --keep etc/xenpool/vms.conf``: one keeper for many VMs.

The VMs do not depend on an operator's terminal. Each VM's last cookie is saved in the
state directory; when the keeper stops, its VMs keep running on their PEs for the PEs'
lease, and a keeper started again with the same state directory re-adopts them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.python import usage

from .. import discovery
from ..config import (
    Setting,
    SettingsOptions,
    json_log,
    log_settings,
    make_options,
    positive_float,
    read_ini,
    registrar_endpoint,
    secret_file,
    writable_dir,
)
from ..discovery import listener_settings
from ..protocol import messages as M
from ..protocol import session as S

SETTINGS = [
    Setting(
        "registrar",
        [],
        registrar_endpoint,
        "a registrar's ASAP endpoint, may repeat (default: 127.0.0.1:3863 unless --registrar-announce)",
        multiple=True,
    ),
    *listener_settings(),
    Setting("pool", "Xen", str, "pool handle"),
    Setting(
        "state-dir",
        "/var/lib/xenpool/keeper",
        str,
        "where each VM's last cookie is kept",
    ),
    Setting("heartbeat-interval", 1.0, positive_float, "seconds between heartbeats"),
    Setting(
        "heartbeat-timeout",
        3.0,
        positive_float,
        "seconds without an answer before failing over",
    ),
    Setting(
        "connect-timeout",
        2.0,
        positive_float,
        "seconds to wait for a PE's connection before trying the next one",
    ),
    Setting(
        "status",
        None,
        str,
        "HTTP endpoint for /vms and /events (JSON), /metrics and /admin (signed VM commands); on 127.0.0.1 unless it names an interface",
    ),
    Setting(
        "pool-secret-file",
        None,
        secret_file,
        "the pool's secret: the operator's VM commands (xenpool vm stop|start) are signed with it",
    ),
    Setting(
        "alert",
        [],
        str,
        "a command run with every event (VM lost, failover, move) as JSON on stdin and XENPOOL_* variables, may repeat",
        multiple=True,
    ),
    Setting("alert-timeout", 30.0, positive_float, "seconds before an alert is killed"),
    Setting("pu-name", None, str, "this keeper's name at the PEs (their --pu-access)"),
    Setting(
        "pu-secret-file",
        None,
        secret_file,
        "this keeper's secret, which the PEs know: each create, adoption and stop is proven with it",
    ),
    Setting(
        "pe-tls",
        None,
        str,
        "reach the PEs over TLS with these tls: options, e.g. "
        "trustRoots=/etc/xenpool/ca:certificate=pu.pem:privateKey=pu.key",
    ),
    Setting(
        "logfile", None, str, "also write structured logs to this file as JSON lines"
    ),
    *log_settings(),
]


def read_vms(path: str) -> list[S.CreateServer]:
    """The ``[vm NAME]`` sections of the keep file, checked."""
    parser = read_ini(path, "keep")
    vms = []
    for section in parser.sections():
        kind, _, name = section.partition(" ")
        if kind != "vm":
            continue
        vm = parser[section]
        unknown = set(vm) - {"ram", "vcpus", "disk", "ips"}
        if unknown:
            raise usage.UsageError(
                f"--keep: [{section}]: unknown key {sorted(unknown)[0]!r} (known: ram, vcpus, disk, ips)"
            )
        try:
            request = S.CreateServer(
                name.strip(),
                vm.get("disk", ""),
                tuple(vm.get("ips", "").split()),
                int(vm["ram"]),
                int(vm.get("vcpus", "1")),
            )
            S.check_create(request)
        except KeyError:
            raise usage.UsageError(f"--keep: [{section}]: ram is missing") from None
        except ValueError as err:
            raise usage.UsageError(f"--keep: [{section}]: {err}") from None
        if request.disk:
            from ..interfaces import DiskSpecError
            from ..pe.disks import storage_for
            from ..plugins import PluginError, load_plugins

            try:  # parsed only: a spec no storage plugin takes is refused here
                storage_for(load_plugins(), request.disk)
            except (DiskSpecError, PluginError) as err:
                raise usage.UsageError(f"--keep: [{section}]: disk: {err}") from None
        vms.append(request)
    if not vms:
        raise usage.UsageError(f"--keep: {path} has no [vm NAME] section")
    return vms


if TYPE_CHECKING:
    _Options = SettingsOptions
else:
    _Options = make_options(
        SETTINGS, "keeper", "Keep the VMs of a keep file available."
    )


class Options(_Options):
    optParameters = make_options(SETTINGS, "keeper", "").optParameters + [
        [
            "keep",
            "k",
            None,
            "the VMs to keep: an INI file with a [vm NAME] section per VM",
        ],
    ]

    def postOptions(self) -> None:
        if not self["keep"]:
            raise usage.UsageError("--keep FILE is required")
        self.vms = read_vms(self["keep"])
        if not self["config"]:
            self["config"] = self["keep"]  # the keep file may carry a [keeper] section
        super().postOptions()
        writable_dir(
            "state-dir",
            self.settings["state-dir"],
            "each VM's last cookie is kept there",
        )
        if self.settings["pu-secret-file"] and not self.settings["pu-name"]:
            raise usage.UsageError("--pu-secret-file needs --pu-name")
        self.pe_tls = None
        if self.settings["pe-tls"]:
            from ..tls import PeTls

            try:
                self.pe_tls = PeTls(self.settings["pe-tls"])
            except Exception as err:
                raise usage.UsageError(f"--pe-tls: {err}") from None


def makeService(options: Options):
    from twisted.internet import reactor

    from ..asap_client import TcpPoolAccess
    from ..tls import local_unless_told
    from .cli import credential
    from .core import PuSettings
    from .keeper import KeeperService

    s = options.settings
    json_log(s, "xenpool-pu")
    settings = PuSettings(
        pool_handle=s["pool"].encode(),
        heartbeat_interval_s=s["heartbeat-interval"],
        heartbeat_timeout_s=s["heartbeat-timeout"],
        resolution_items=M.MAX_RESOLUTION_ITEMS,
        connect_timeout_s=s["connect-timeout"],
    )
    registrars, announce_listener = discovery.registrars(
        reactor, s["registrar"], s["registrar-announce"], s["announce-interface"]
    )
    access = TcpPoolAccess(
        reactor,
        registrars,
        pe_connect_timeout_s=settings.connect_timeout_s,
        pe_tls=options.pe_tls,
        credential=credential(s["pu-name"], s["pu-secret-file"], reactor),
    )
    keeper = KeeperService(
        options.vms,
        access,
        reactor,
        settings,
        s["state-dir"],
        local_unless_told(s["status"]) if s["status"] else None,
        secret=s["pool-secret-file"] or b"",
    )
    keeper.keep_file = options["keep"]  # reread on SIGHUP
    if s["alert"]:
        from ..console.events import AlertRunner

        keeper.events.alert = AlertRunner(reactor, s["alert"], s["alert-timeout"])
    if announce_listener is not None:
        announce_listener.setServiceParent(keeper)
    from twisted.logger import Logger

    Logger().info(
        "xenpool-pu keeper for pool {pool}: {count} VMs ({names}), registrars {registrars}, "
        "state in {state_dir}, status {status}",
        pool=s["pool"],
        count=len(options.vms),
        names=", ".join(vm.server_id for vm in options.vms),
        registrars=" ".join(s["registrar"]) or "default",
        state_dir=s["state-dir"],
        status=s["status"] or "none",
    )
    return keeper
