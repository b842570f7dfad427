"""``twistd -n xenpool-pe``: a pool element, one per hypervisor host.

    twistd -n xenpool-pe --load-plugin=weighted --libvirt-uri=qemu:///system \\
        --registrar=tcp:host=pr1:port=3863 --port=5001 --address=10.0.0.11
"""

from __future__ import annotations

import hashlib
import socket
from typing import TYPE_CHECKING

from twisted.python import usage

from .. import discovery
from ..config import (
    Setting,
    SettingsOptions,
    id32,
    json_log,
    log_settings,
    make_options,
    non_negative_float,
    positive_float,
    positive_int,
    registrar_endpoint,
    secret_file,
    yes_no,
)
from ..discovery import listener_settings
from ..protocol import session as S


def weights(text: str) -> dict[str, float]:
    """``cpu=0.75,ram=0.25`` -> {"cpu": 0.75, "ram": 0.25}"""
    result = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected NAME=NUMBER[,NAME=NUMBER...], got {text!r}")
        result[name.strip()] = float(value)
    return result


def options_list(text: str) -> dict[str, str]:
    """``key=value,key=value`` -> dict (values may not contain commas)."""
    result = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
        result[key.strip()] = value
    return result


def transport_name(text: str) -> str:
    if text not in ("tcp", "sctp"):
        raise ValueError(f"expected tcp or sctp, got {text!r}")
    return text


SETTINGS = [
    Setting("pool", "Xen", str, "pool handle"),
    Setting(
        "pe-id",
        None,
        id32,
        "PE identifier, 32 bits (default: derived from --host and --pool, so the same after a restart)",
    ),
    Setting(
        "registrar",
        [],
        registrar_endpoint,
        "a registrar's ASAP endpoint, HOST:PORT or an endpoint string; tried in order (default: tcp:host=127.0.0.1:port=3863 unless --registrar-announce)",
        multiple=True,
    ),
    *listener_settings(),
    Setting(
        "voter",
        [],
        registrar_endpoint,
        "a registrar that votes on who may start a VM (its ASAP endpoint); a start needs a lease from a majority "
        "of them; give every PE the same list (default: the --registrar list)",
        multiple=True,
    ),
    Setting(
        "voter-timeout",
        1.0,
        positive_float,
        "seconds a voter has to answer a lease request, connecting included",
    ),
    Setting(
        "vm-lease",
        15.0,
        positive_float,
        "seconds a VM lease from the voters lasts; renewed every third of it",
    ),
    Setting("port", 5001, positive_int, "port for PU sessions"),
    Setting(
        "transport",
        "tcp",
        transport_name,
        "tcp or sctp: how PUs reach this PE (sctp needs kernel SCTP)",
    ),
    Setting(
        "address",
        "",
        str,
        "address PUs reach this PE at (registered with the pool; default: the one this host reaches its registrar from)",
    ),
    Setting("bind", "", str, "interface to listen on (default: all)"),
    Setting(
        "listen",
        None,
        str,
        "the session port as a server endpoint string, instead of --transport/--port/--bind, e.g. "
        "ssl:5001:privateKey=pe.key:certKey=pe.pem:caCertsDir=/etc/xenpool/ca (TLS, PUs need a certificate "
        "the CA signed); its port is the one registered",
    ),
    Setting(
        "pu-access",
        None,
        str,
        "INI file: the PUs that may create, adopt and stop VMs here, how each proves who it is (a secret, or a "
        "TLS client certificate with its name as CN) and which VMs each may manage (default: anyone)",
    ),
    Setting(
        "pe-tls",
        None,
        str,
        "reach other PEs' session ports over TLS with these tls: options, e.g. "
        "trustRoots=/etc/xenpool/ca:certificate=pe.pem:privateKey=pe.key",
    ),
    Setting(
        "host",
        socket.gethostname(),
        str,
        "this host's fencing identity, put in cookies",
    ),
    Setting(
        "libvirt-uri",
        "test:///default",
        str,
        "libvirt URI: test:///PATH/node.xml, qemu:///system, xen:///system, ...",
    ),
    Setting(
        "domain-template",
        None,
        str,
        "domain XML template (default: etc/xenpool/domain-<driver>.xml)",
    ),
    Setting(
        "migration-uri",
        "",
        str,
        "libvirt URI other hosts' libvirtd live-migrate VMs to this one at, e.g. qemu+tcp://host1/system "
        "(default: none, planned moves here stop and restart VMs)",
    ),
    Setting(
        "load-plugin",
        "weighted",
        str,
        "load metric: max, cpu, weighted or an installed plugin",
    ),
    Setting(
        "load-weight", {}, weights, "options of the load metric, e.g. cpu=0.75,ram=0.25"
    ),
    Setting(
        "policy",
        "LeastUsed",
        str,
        "pool policy and its arguments, e.g. LeastUsedDegradation:0.05",
    ),
    Setting(
        "load-interval",
        30.0,
        positive_float,
        "seconds between load samples and re-registrations",
    ),
    Setting(
        "smoothing", 3.0, float, "load smoothing k: new = (sample + k * old) / (k + 1)"
    ),
    Setting(
        "load-window",
        0.0,
        non_negative_float,
        "instead of smoothing: a VM's load is its mean CPU over the last this many seconds (0: smoothing)",
    ),
    Setting(
        "raise-on-refusal",
        True,
        yes_no,
        "report load 1 after a refusal for lack of RAM until the next update",
    ),
    Setting(
        "host-cpu",
        True,
        yes_no,
        "count the host's own CPU use (what its guests do not use) from this machine's /proc/stat where libvirt is local; no: this machine is not the host alone (several PEs on one machine) (yes/no)",
    ),
    Setting(
        "count-cpu-wait",
        False,
        yes_no,
        "count the time a VM waited for a host core as CPU it wanted (Xen and QEMU report it) (yes/no)",
    ),
    Setting("overhead-mb", 12.0, float, "hypervisor overhead: this many MB ..."),
    Setting(
        "overhead-kb-per-mb", 7.0, float, "... plus this many KB per MB of host RAM"
    ),
    Setting("host-reserve-mb", 0.0, float, "RAM the host keeps for itself"),
    Setting(
        "registration-life",
        90.0,
        positive_float,
        "seconds a registration lives without an update",
    ),
    Setting(
        "pool-secret-file",
        None,
        secret_file,
        "the pool's secret: seals cookies, proves registrations",
    ),
    Setting(
        "cookie-max-age",
        86400.0,
        positive_float,
        "seconds a cookie is accepted after it was issued",
    ),
    Setting(
        "rebalance",
        None,
        str,
        "a rebalancer plugin: plan (the lowest PE identifier plans moves for the pool), gap-fit, hot-cold",
    ),
    Setting(
        "rebalance-interval",
        120.0,
        positive_float,
        "seconds between rebalancing decisions",
    ),
    Setting(
        "lease",
        60.0,
        float,
        "seconds a VM outlives its PU, waiting for its keeper to come back (0: none)",
    ),
    Setting(
        "stonith",
        None,
        str,
        "fencing plugin for failovers: fence-agent, libvirt, command, manual, watchdog",
    ),
    Setting(
        "stonith-option",
        {},
        options_list,
        "its options, e.g. agent=fence_virsh,ip=10.0.0.1",
    ),
    Setting(
        "fence-map",
        None,
        str,
        "INI file: a [HOST] section per fencing target with its options",
    ),
    Setting(
        "shutdown-timeout",
        30.0,
        positive_float,
        "seconds a guest has to shut down before it is destroyed",
    ),
    Setting(
        "idle-timeout",
        60.0,
        positive_float,
        "seconds of PU silence that end its session",
    ),
    Setting(
        "status",
        None,
        str,
        "HTTP endpoint for /status (JSON), /metrics and /admin (signed host commands); on 127.0.0.1 unless it names an interface",
    ),
    Setting(
        "alert",
        [],
        str,
        "a command run with every event (fence, refused start, maintenance) as JSON on stdin and XENPOOL_* variables, may repeat",
        multiple=True,
    ),
    Setting("alert-timeout", 30.0, positive_float, "seconds before an alert is killed"),
    Setting(
        "logfile", None, str, "also write structured logs to this file as JSON lines"
    ),
    *log_settings(),
]


if TYPE_CHECKING:
    _Options = SettingsOptions
else:
    _Options = make_options(
        SETTINGS, "pe", "Run a pool element on this hypervisor host."
    )


class Options(_Options):
    def postOptions(self) -> None:
        super().postOptions()
        from twisted.internet import reactor

        from ..plugins import PluginError, load_plugins

        s = self.settings
        from .. import sctp

        try:
            sctp.check(
                [
                    *s["registrar"],
                    *s["voter"],
                    *([f"sctp:{s['port']}"] if s["transport"] == "sctp" else []),
                ]
            )
        except ValueError as err:
            raise usage.UsageError(str(err)) from None
        self.access_rules = None
        if s["pu-access"]:
            from .access import read_access

            self.access_rules = read_access(s["pu-access"])
        self.pe_tls = None
        if s["pe-tls"]:
            from ..tls import PeTls

            try:
                self.pe_tls = PeTls(s["pe-tls"])
            except Exception as err:
                raise usage.UsageError(f"--pe-tls: {err}") from None
        self.user_port = s["port"]
        if s["listen"]:
            from ..tls import check_server, listen_port

            try:
                self.user_port = listen_port(s["listen"])
                check_server(s["listen"])
            except Exception as err:
                raise usage.UsageError(f"--listen: {err}") from None
        self.plugins = load_plugins(
            reactor=reactor
        )  # passed to the stonith, storage and hypervisor providers
        try:
            self.metric = self.plugins.create(
                "load", s["load-plugin"], **s["load-weight"]
            )
        except PluginError as err:
            raise usage.UsageError(f"--load-plugin: {err}") from None
        name, _, arguments = s["policy"].partition(":")
        try:
            self.policy = self.plugins.create("policy", name)
            self.policy_arguments = arguments.split(":") if arguments else []
            self.policy.make_parameter(0.0, self.policy_arguments)
        except (PluginError, ValueError) as err:
            raise usage.UsageError(f"--policy: {err}") from None
        if s["migration-uri"] and not S.MIGRATION_URI_PATTERN.fullmatch(
            s["migration-uri"]
        ):
            raise usage.UsageError(
                f"--migration-uri: {s['migration-uri']!r} is not a libvirt URI"
            )
        self.rebalancer = None
        if s["rebalance"]:
            try:
                self.rebalancer = self.plugins.create("rebalancer", s["rebalance"])
            except PluginError as err:
                raise usage.UsageError(f"--rebalance: {err}") from None
        self.fencer = None
        self.watchdog = None  # the feeder of a self-fencing stonith (watchdog)
        if s["stonith"]:
            from .fencing import StonithFencer, read_fence_map

            try:
                stonith = self.plugins.create(
                    "stonith", s["stonith"], **s["stonith-option"]
                )
            except PluginError as err:
                raise usage.UsageError(f"--stonith: {err}") from None
            fence_map = read_fence_map(s["fence-map"]) if s["fence-map"] else {}
            self.fencer = StonithFencer(stonith, fence_map)
            from ..interfaces import ISelfFencing

            if ISelfFencing.providedBy(stonith) and not s["pe-id"]:
                # a restarted PE must re-register as the same PE, or a takeover would wait out
                # a watchdog that the new process keeps fed while the old VMs still run
                raise usage.UsageError(
                    f"--stonith {s['stonith']}: needs a fixed --pe-id"
                )
            if ISelfFencing.providedBy(stonith):
                try:  # opened (armed) now: a PE that cannot feed its watchdog never registers
                    self.watchdog = stonith.feeder(reactor)
                except (OSError, ValueError) as err:
                    why = (
                        err.strerror
                        if isinstance(err, OSError) and err.strerror
                        else err
                    )
                    raise usage.UsageError(f"--stonith-option {why}") from None


def derived_pe_id(host: str, pool: str) -> int:
    """The default PE identifier: the same for a host (``--host``) and pool after every
    restart, so logs, status and cookies keep naming the same PE."""
    digest = hashlib.sha256(f"xenpool-pe\0{pool}\0{host}".encode()).digest()
    return int.from_bytes(digest[:4], "big") or 1


def makeService(options: Options):
    from twisted.internet import reactor

    from .accounting import HostAccounting, LoadSettings
    from .core import PeSettings, PoolElementCore
    from .service import HypervisorService, PoolElementService

    s = options.settings
    json_log(s, "xenpool-pe")
    try:
        hypervisor = options.plugins.create(
            "hypervisor",
            "libvirt",
            uri=s["libvirt-uri"],
            domain_template=s["domain-template"],
        )
        node = hypervisor.node_info()  # blocking, once, before the reactor runs
    except Exception as err:
        if "domain template" in str(err):
            raise usage.UsageError(f"--domain-template: {err}") from None
        raise usage.UsageError(f"--libvirt-uri {s['libvirt-uri']}: {err}") from None
    load_settings = LoadSettings(
        sample_interval_s=s["load-interval"],
        smoothing=s["smoothing"],
        raise_on_refusal=s["raise-on-refusal"],
        overhead_mb=s["overhead-mb"],
        overhead_kb_per_mb=s["overhead-kb-per-mb"],
        host_reserve_mb=s["host-reserve-mb"],
        count_cpu_wait=s["count-cpu-wait"],
        load_window_s=s["load-window"],
    )
    settings = PeSettings(
        pool_handle=s["pool"].encode(),
        pe_identifier=s["pe-id"] or derived_pe_id(s["host"], s["pool"]),
        host=s["host"],
        secret=s["pool-secret-file"] or b"",
        cookie_max_age_s=s["cookie-max-age"],
        shutdown_timeout_s=s["shutdown-timeout"],
        lease_s=s["lease"],
        migration_uri=s["migration-uri"],
    )
    from twisted.internet import endpoints
    from twisted.logger import Logger

    from ..asap_client import TcpPoolAccess
    from ..logs import hex_id
    from ..tls import local_unless_told
    from .disks import disk_release_function, disk_xml_function
    from .leases import LeaseSettings, VmLeases
    from .service import TcpClaimAsker, TcpVoter

    log = Logger()

    target = "xvda" if s["libvirt-uri"].startswith("xen") else "vda"
    registrars, announce_listener = discovery.registrars(
        reactor, s["registrar"], s["registrar-announce"], s["announce-interface"]
    )
    pool_access = TcpPoolAccess(reactor, registrars, pe_tls=options.pe_tls)
    claims = TcpClaimAsker(
        reactor, pool_access, settings.pool_handle, settings.pe_identifier
    )
    voters = [
        TcpVoter(reactor, endpoints.clientFromString(reactor, d), s["voter-timeout"])
        for d in dict.fromkeys(s["voter"] or s["registrar"])
    ]
    if not voters:
        log.warn(
            "no --voter and no --registrar list: starts are not arbitrated by VM leases, so two PEs asked at "
            "once may both start a VM; give every PE the same --voter list"
        )
    lease_settings = LeaseSettings(
        settings.pool_handle,
        settings.pe_identifier,
        settings.host,
        settings.secret,
        s["vm-lease"],
    )
    leases = VmLeases(voters, lease_settings, reactor)
    if options.fencer is not None:
        options.fencer.clock = reactor  # failed fences are held off for a while
    else:
        log.warn(
            "no --stonith: this PE cannot fence a dead host, so it refuses every failover of a VM "
            "that may still run elsewhere (code 15); give it --stonith and --stonith-option"
        )
    log.info(
        "xenpool-pe {pe} ({host}) for pool {pool}: load {load}, policy {policy}, stonith {stonith}, "
        "storage {storage}, hypervisor {uri}, sessions on {sessions}, registrars {registrars}, "
        "voters {voters}, status {status}, pool secret {secret}",
        pe=hex_id(settings.pe_identifier),
        host=settings.host,
        pool=s["pool"],
        load=s["load-plugin"],
        policy=s["policy"],
        stonith=s["stonith"] or "NONE",
        storage=", ".join(options.plugins.names("storage")),
        uri=s["libvirt-uri"],
        sessions=f"{s['transport']}:{s['port']}"
        + (f":interface={s['bind']}" if s["bind"] else ""),
        registrars=" ".join(s["registrar"]) or "default",
        voters=" ".join(s["voter"]) or "the registrars",
        status=s["status"] or "none",
        secret="yes" if s["pool-secret-file"] else "NONE",
    )
    core = PoolElementCore(
        settings,
        hypervisor,
        HostAccounting(node, load_settings),
        options.metric,
        reactor,
        fencer=options.fencer,
        claims=claims,
        leases=leases,
        disk_xml=disk_xml_function(options.plugins, target),
        disk_release=disk_release_function(options.plugins),
    )
    if s["alert"]:
        from ..console.events import AlertRunner

        core.events.alert = AlertRunner(reactor, s["alert"], s["alert-timeout"])
    if options.access_rules is not None:
        from .access import PuAccess

        core.access = PuAccess(options.access_rules, reactor)
    bind = f":interface={s['bind']}" if s["bind"] else ""
    pe = PoolElementService(
        core,
        options.policy,
        options.policy_arguments,
        reactor,
        registrars=registrars,
        user_endpoint=s["listen"] or f"{s['transport']}:{s['port']}{bind}",
        user_address=s["address"],
        user_port=options.user_port,
        load_interval_s=s["load-interval"],
        registration_life_ms=round(s["registration-life"] * 1000),
        idle_timeout=s["idle-timeout"],
        status=local_unless_told(s["status"]) if s["status"] else None,
        rebalancer=options.rebalancer,
        rebalance_interval_s=s["rebalance-interval"],
        pool_access=pool_access,
    )
    if (
        s["host-cpu"]
        and "://" in s["libvirt-uri"]
        and s["libvirt-uri"].split("://", 1)[1].startswith("/")
        and hypervisor.measures_cpu
    ):
        from .accounting import HostCpu

        core.host_cpu = (
            HostCpu()
        )  # a local hypervisor: this machine's /proc/stat is the host's
    HypervisorService(hypervisor).setServiceParent(pe)
    if announce_listener is not None:
        announce_listener.setServiceParent(pe)
    if options.fencer is not None and options.watchdog is not None:
        from .fencing import attach_self_fencing

        attach_self_fencing(
            options.fencer.stonith, options.watchdog, pe, core, registrars, reactor
        )
    return pe
