"""``twistd -n xenpool-registrar``: the RSerPool pool registrar.

    twistd -n xenpool-registrar --asap tcp:3863 --status tcp:8080 \\
        --config etc/xenpool/registrar.conf
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.python import usage

from ..config import (
    Setting,
    SettingsOptions,
    id32,
    ipv4_address,
    json_log,
    log_settings,
    make_options,
    non_negative_float,
    pool_secret,
    positive_float,
    positive_int,
    registrar_endpoint,
    secret_file,
    yes_no,
)
from ..discovery import DEFAULT_ANNOUNCE_INTERVAL_S, multicast_address
from ..protocol.messages import ASAP_PORT, MAX_MESSAGE_SIZE

SETTINGS = [
    Setting(
        "asap",
        [f"tcp:{ASAP_PORT}"],
        str,
        "ASAP endpoint for PEs and PUs",
        multiple=True,
    ),
    Setting(
        "enrp",
        [],
        str,
        "ENRP endpoint for peer registrars, e.g. tcp:9901",
        multiple=True,
    ),
    Setting(
        "peer",
        [],
        registrar_endpoint,
        "a peer registrar's ENRP endpoint, HOST:PORT or e.g. tcp:host=pr2:port=9901",
        multiple=True,
    ),
    Setting(
        "status",
        None,
        str,
        "HTTP endpoint for /handlespace (JSON) and /metrics (Prometheus); on 127.0.0.1 unless it names an interface",
    ),
    Setting(
        "logfile", None, str, "also write structured logs to this file as JSON lines"
    ),
    *log_settings(),
    Setting(
        "registrar-id",
        None,
        id32,
        "this registrar's 32-bit identifier (default: random)",
    ),
    Setting(
        "keep-alive-interval",
        5.0,
        positive_float,
        "seconds between keep-alives to each PE",
    ),
    Setting(
        "keep-alive-timeout",
        5.0,
        positive_float,
        "seconds a PE has to answer a keep-alive",
    ),
    Setting(
        "peer-heartbeat-interval",
        2.0,
        positive_float,
        "seconds between ENRP PRESENCE messages",
    ),
    Setting(
        "peer-timeout",
        5.0,
        positive_float,
        "seconds of silence before a peer is taken over",
    ),
    Setting(
        "console-pe",
        [],
        str,
        "a PE's status URL (http://host:port) shown on the console pages /, /pool, may repeat",
        multiple=True,
    ),
    Setting(
        "console-keeper",
        [],
        str,
        "a keeper's status URL shown on the console pages, may repeat",
        multiple=True,
    ),
    Setting(
        "alert",
        [],
        str,
        "a command run with every event (host lost, host back) as JSON on stdin and XENPOOL_* variables, may repeat",
        multiple=True,
    ),
    Setting("alert-timeout", 30.0, positive_float, "seconds before an alert is killed"),
    Setting(
        "pool-secret",
        [],
        pool_secret,
        "POOL:FILE: PEs of POOL must prove the secret in FILE",
        multiple=True,
    ),
    Setting(
        "require-pool-secret",
        False,
        yes_no,
        "yes: refuse every PE of a pool without a --pool-secret here (each PE must prove its pool's secret)",
    ),
    Setting(
        "max-bad-pe-reports",
        3,
        positive_int,
        "ENDPOINT_UNREACHABLE reports that remove a PE",
    ),
    Setting(
        "max-resolution-items", 3, positive_int, "PEs per handle resolution answer"
    ),
    Setting(
        "idle-timeout",
        60.0,
        positive_float,
        "seconds before a silent connection is closed",
    ),
    Setting(
        "max-message-size",
        MAX_MESSAGE_SIZE,
        positive_int,
        "largest ASAP message accepted, bytes",
    ),
    Setting(
        "announce",
        None,
        multicast_address,
        "send SERVER_ANNOUNCEs of the ASAP endpoints to GROUP:PORT, e.g. 239.0.0.50:3863 (default: off)",
    ),
    Setting(
        "enrp-announce",
        None,
        multicast_address,
        "send and hear ENRP PRESENCEs on GROUP:PORT, e.g. 239.0.0.51:9901, and connect to the peers heard (default: off)",
    ),
    Setting(
        "enrp-secret",
        None,
        secret_file,
        "FILE: sign every ENRP message with this secret and take only messages signed with it",
    ),
    Setting(
        "state-dir",
        ".",
        str,
        "directory that keeps the VM leases this registrar granted across restarts (vm-leases-<ASAP endpoint>.json)",
    ),
    Setting(
        "vm-lease-max",
        60.0,
        positive_float,
        "longest VM lease granted to a PE, seconds",
    ),
    Setting(
        "fresh-wait",
        0.0,
        non_negative_float,
        "seconds a registrar that finds no lease file takes no new lease holder (give it the PEs' --vm-lease "
        "where a registrar's state may have been lost)",
    ),
    Setting(
        "announce-interface",
        "",
        ipv4_address,
        "the local IPv4 address whose interface announces use",
    ),
    Setting(
        "announce-interval",
        DEFAULT_ANNOUNCE_INTERVAL_S,
        positive_float,
        "seconds between announces",
    ),
    Setting(
        "announce-ttl",
        1,
        positive_int,
        "multicast TTL of announces (1: this network only)",
    ),
]


if TYPE_CHECKING:
    _Options = SettingsOptions
else:
    _Options = make_options(SETTINGS, "registrar", "Run an RSerPool pool registrar.")


class Options(_Options):
    def postOptions(self) -> None:
        super().postOptions()
        from .. import sctp

        try:
            sctp.check(
                [*self.settings["asap"], *self.settings["enrp"], *self.settings["peer"]]
            )
        except ValueError as err:
            raise usage.UsageError(str(err)) from None
        from ..tls import check_server

        for option in ("asap", "enrp"):
            for description in self.settings[option]:
                if not description.startswith("sctp:"):
                    try:
                        check_server(description)
                    except ValueError as err:
                        raise usage.UsageError(f"--{option} {err}") from None
        state_dir = Path(self.settings["state-dir"])
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise usage.UsageError(f"--state-dir {state_dir}: {err.strerror}") from None
        if not os.access(state_dir, os.W_OK):
            raise usage.UsageError(
                f"--state-dir {state_dir}: not writable (the VM leases this registrar grants are kept there)"
            )


def leases_file(state_dir: str, asap_endpoint: str) -> Path:
    """One file per ASAP endpoint, so registrars sharing a directory keep theirs apart
    (named by its kind, port and interface: an ssl: string's certificate paths are left out)."""
    tls_files = (
        "privateKey=",
        "certKey=",
        "caCertsDir=",
        "extraCertChain=",
        "dhParameters=",
    )
    kept = ":".join(
        part for part in asap_endpoint.split(":") if not part.startswith(tls_files)
    )
    return Path(state_dir) / (
        "vm-leases-" + re.sub(r"[^A-Za-z0-9.-]+", "_", kept).strip("_") + ".json"
    )


def makeService(options: Options):
    from twisted.internet import reactor
    from twisted.logger import Logger

    from ..logs import hex_id, pool_name
    from ..plugins import load_plugins
    from ..tls import local_unless_told
    from .core import Registrar, Timers
    from .handlespace import Handlespace
    from .leases import LeaseTable
    from .peering import Peering, PeerTimers
    from .service import Metrics, RegistrarService, Voting

    s = options.settings
    json_log(s, "xenpool-registrar")
    plugins = load_plugins()
    policies = {}
    for name in plugins.names("policy"):
        provider = plugins.create("policy", name)
        policies[provider.policy_type] = provider
    registrar_id = s["registrar-id"] or random.SystemRandom().randrange(1, 2**32)
    handlespace = Handlespace(
        registrar_id,
        policies,
        max_bad_pe_reports=s["max-bad-pe-reports"],
        max_resolution_items=s["max-resolution-items"],
        pool_secrets=dict(s["pool-secret"]),
        require_secret=s["require-pool-secret"],
    )
    log = Logger()
    pools = ", ".join(pool_name(p) for p, _ in s["pool-secret"]) or "none"
    if s["require-pool-secret"]:
        secured = f"every PE must prove its pool's secret (pools with one: {pools})"
    elif s["pool-secret"]:
        secured = (
            f"PEs of {pools} must prove the pool's secret; any other pool takes any PE "
            "that reaches --asap (--require-pool-secret yes refuses them)"
        )
    else:
        secured = None
        log.warn(
            "no pool has a secret (--pool-secret POOL:FILE): anyone who reaches --asap can "
            "register a PE in any pool; --require-pool-secret yes refuses pools without one"
        )
    log.info(
        "xenpool-registrar {id}: ASAP {asap}, ENRP {enrp}, peers {peers}, status {status}, "
        "policies {policies}, state in {state_dir}; {secured}",
        id=hex_id(registrar_id),
        asap=" ".join(s["asap"]),
        enrp=" ".join(s["enrp"]) or "none",
        peers=" ".join(s["peer"]) or "none",
        status=s["status"] or "none",
        policies=", ".join(plugins.names("policy")),
        state_dir=s["state-dir"],
        secured=secured or "no pool secret",
    )
    metrics = Metrics(handlespace)
    peer_timers = PeerTimers(
        s["peer-heartbeat-interval"], s["peer-timeout"], s["peer-timeout"]
    )
    peering = Peering(handlespace, reactor, timers=peer_timers, observer=metrics)
    timers = Timers(s["keep-alive-interval"], s["keep-alive-timeout"])
    registrar = Registrar(handlespace, reactor, timers, observers=[metrics, peering])
    table = LeaseTable(
        registrar_id, max_duration_s=s["vm-lease-max"], secrets=dict(s["pool-secret"])
    )
    voting = Voting(
        table,
        reactor,
        leases_file(s["state-dir"], s["asap"][0]),
        fresh_wait_s=s["fresh-wait"],
    )
    from ..console.events import AlertRunner, EventLog
    from ..console.pool import PoolConsole
    from .service import handlespace_json

    events = EventLog(reactor, f"registrar 0x{registrar_id:08x}")
    if s["alert"]:
        events.alert = AlertRunner(reactor, s["alert"], s["alert-timeout"])
    console = PoolConsole(
        reactor,
        lambda: handlespace_json(registrar, reactor.seconds()),
        s["console-pe"],
        s["console-keeper"],
        events,
    )
    registrar.observer.observers.append(console.observer)
    return RegistrarService(
        registrar,
        peering,
        metrics,
        reactor,
        asap=s["asap"],
        enrp=s["enrp"],
        peers=s["peer"],
        status=local_unless_told(s["status"]) if s["status"] else None,
        idle_timeout=s["idle-timeout"],
        max_message_size=s["max-message-size"],
        announce=s["announce"],
        announce_interface=s["announce-interface"],
        announce_interval_s=s["announce-interval"],
        announce_ttl=s["announce-ttl"],
        enrp_announce=s["enrp-announce"],
        enrp_secret=s["enrp-secret"],
        voting=voting,
        console=console,
    )
