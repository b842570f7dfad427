"""The whole pool in one document, from the daemons' own status endpoints.

``pool_view`` is pure: it joins the registrar's handlespace, each PE's ``/status`` and
each keeper's ``/vms`` and ``/events`` into hosts (by name, with PE identifier, state,
load, RAM, CPUs and VMs), VMs (host, state, uptime, keeper, last failover) and the recent
events of every daemon, oldest first. ``PoolConsole`` serves it in the registrar (``/pool``,
``/events`` and the web page at ``/``), fetching the PEs' and keepers' documents (their
URLs given with ``--console-pe`` and ``--console-keeper``) and keeping each host's load
over the last hour as the registrar hears it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from ..protocol import params as P
from .events import EventLog

log = Logger()

#: libvirt's domain states by number (virDomainState).
DOMAIN_STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting down",
    5: "shut off",
    6: "crashed",
    7: "suspended",
}
HISTORY_S = 3600.0
HISTORY_STEP_S = 10.0
EVENTS_SHOWN = 100


def _hex(identifier: int) -> str:
    return f"0x{identifier:08x}"


def pool_view(
    handlespace: dict | None,
    pes: dict[str, Any],
    keepers: dict[str, Any],
    now: float,
    registrar_events: Sequence[dict] = (),
    history: dict[str, list] | None = None,
    known_hosts: dict[str, str] | None = None,
    known_urls: dict[str, tuple[str, str]] | None = None,
) -> dict:
    """The pool view. ``pes``: status URL -> its /status document, or an error string;
    ``keepers``: status URL -> {"vms": [...], "events": [...]}, or an error string;
    ``known_hosts``: PE identifier -> host name, for PEs that do not answer now;
    ``known_urls``: status URL -> (PE identifier, host name) as last heard there."""
    names: dict[Any, str] = dict(known_hosts or {})
    registered: dict[Any, dict] = {}
    for pool in (handlespace or {}).get("pools", []):
        for pe in pool["pool_elements"]:
            t = pe["transport"]
            registered[_hex(pe["identifier"])] = {
                "pool": pool["handle"],
                "load": pe["load"],
                "address": f"{t['addresses'][0]}:{t['port']}" if t["addresses"] else "",
                "transport": f"{t['kind']} {','.join(t['addresses'])}:{t['port']}",
                "seconds_since_update": pe["seconds_since_update"],
            }
    events: list[dict] = list(registrar_events)
    hosts: dict[str, dict] = {}  # by PE identifier
    for url, doc in pes.items():
        if not isinstance(doc, dict):
            pe, name = (known_urls or {}).get(url, (None, url))
            hosts[pe or f"?{url}"] = {
                "name": name,
                "pe": pe,
                "state": "unreachable",
                "registered": pe in registered,
                "load": registered.get(pe, {}).get("load"),
                "free_ram_kb": None,
                "ram_kb": None,
                "cpus": None,
                "vms": [],
                "status_url": url,
                "address": registered.get(pe, {}).get("address", ""),
                "transport": registered.get(pe, {}).get("transport", ""),
                "error": str(doc),
            }
            continue
        pe = doc["pe_identifier"]
        names[pe] = doc["host"]
        events.extend(doc.get("events", []))
        hosts[pe] = {
            "name": doc["host"],
            "pe": pe,
            "state": doc.get("state", "up"),
            "maintenance": doc.get("maintenance"),
            "registered": pe in registered,
            "load": doc["load"],
            "free_ram_kb": doc["free_ram_kb"],
            "ram_kb": doc.get("ram_kb"),
            "cpus": doc.get("cpus"),
            "vms": sorted(vm["server_id"] for vm in doc.get("vms", [])),
            "vm_ram_mb": {vm["server_id"]: vm["ram_mb"] for vm in doc.get("vms", [])},
            "orphans": doc.get("orphans", []),
            "status_url": url,
            "address": registered.get(pe, {}).get("address", ""),
            "transport": registered.get(pe, {}).get("transport", ""),
        }
    for pe, entry in registered.items():
        if pe not in hosts:
            hosts[pe] = {
                "name": names.get(pe, pe),
                "pe": pe,
                "state": "up",
                "registered": True,
                "load": entry["load"],
                "free_ram_kb": None,
                "ram_kb": None,
                "cpus": None,
                "vms": [],
                "status_url": None,
                "address": entry["address"],
                "transport": entry["transport"],
            }
    vms = []
    for url, doc in keepers.items():
        if not isinstance(doc, dict):
            continue
        events.extend(doc.get("events", []))
        for vm in doc.get("vms", []):
            pe = vm.get("pe")
            domain = vm.get("domain_state")
            since = vm.get("running_since")
            vms.append(
                {
                    "name": vm["server_id"],
                    "host": (hosts.get(pe) or {}).get("name") or names.get(pe)
                    if pe and vm["state"] not in ("stopped", "refused")
                    else None,
                    "pe": pe,
                    "state": vm["state"],
                    "domain_state": DOMAIN_STATES.get(domain, str(domain))
                    if domain is not None
                    else None,
                    "uptime_s": round(now - since, 1)
                    if since is not None and vm["state"] == "running"
                    else None,
                    "keeper": url,
                    "ram_mb": vm.get("ram_mb"),
                    "failovers": vm.get("failovers", 0),
                    "last_failover_s": vm.get("last_failover_s"),
                }
            )
    kept = {vm["name"] for vm in vms}
    for host in hosts.values():
        for name in host.get("vms", []):
            if name not in kept:  # run by a PU that is not one of the console's keepers
                vms.append(
                    {
                        "name": name,
                        "host": host["name"],
                        "pe": host["pe"],
                        "state": "running",
                        "domain_state": None,
                        "uptime_s": None,
                        "keeper": None,
                        "ram_mb": None,
                        "failovers": 0,
                        "last_failover_s": None,
                    }
                )
    events.sort(key=lambda e: (e.get("time", 0), e.get("sequence", 0)))
    # A host whose PE does not answer and that another PE fenced since it was last heard of.
    for host in hosts.values():
        if host["state"] != "unreachable":
            continue
        name = host["name"]
        fenced = [
            e for e in events if e["kind"] == "fence_success" and e.get("host") == name
        ]
        back = [e for e in events if e["kind"] == "host_back" and e.get("host") == name]
        if fenced and (not back or back[-1]["time"] < fenced[-1]["time"]):
            host["state"] = "fenced"
    last_failover: dict[str, dict] = {}
    for e in events:
        if e["kind"] == "failover":
            last_failover[e["server_id"]] = e
    for vm in vms:
        last = last_failover.get(vm["name"])
        vm["last_failover"] = (
            None
            if last is None
            else {
                "time": last["time"],
                "from": names.get(last.get("from_pe"), last.get("from_pe")),
                "to": names.get(last.get("to_pe"), last.get("to_pe")),
                "took_s": last.get("took_s"),
            }
        )
    for e in events:  # name hosts in events that carry only PE identifiers
        for key in ("pe", "from_pe", "to_pe"):
            if key in e and e[key] in names:
                e[key.replace("pe", "host")] = names[e[key]]
    return {
        "time": now,
        "registrar": _hex(handlespace["registrar_id"]) if handlespace else None,
        "hosts": sorted(hosts.values(), key=lambda h: h["name"]),
        "vms": sorted(vms, key=lambda v: v["name"]),
        "events": events[-EVENTS_SHOWN:],
        "history": {
            names.get(pe, pe): samples for pe, samples in (history or {}).items()
        },
    }


class LoadHistory:
    """Each PE's load as registered, one sample per ``HISTORY_STEP_S``, for an hour."""

    def __init__(self) -> None:
        self.samples: dict[str, deque] = {}

    def add(self, pe: str, now: float, load: float) -> None:
        samples = self.samples.setdefault(pe, deque())
        if samples and now - samples[-1][0] < HISTORY_STEP_S:
            return
        samples.append((round(now, 1), round(load, 4)))
        while samples and now - samples[0][0] > HISTORY_S:
            samples.popleft()

    def describe(self) -> dict[str, list]:
        return {pe: [list(s) for s in samples] for pe, samples in self.samples.items()}


class RegistrarEvents:
    """A registrar observer: host_back when a PE registers anew, host_lost when it is
    removed; and every load it registers, for the history."""

    def __init__(self, events: EventLog, history: LoadHistory, names: dict) -> None:
        self.events, self.history, self.names = events, history, names

    def registered(self, entry, new: bool) -> None:
        pe = _hex(entry.element.identifier)
        self.history.add(
            pe, self.events.clock.seconds(), P.load_from_wire(entry.element.policy.load)
        )
        if new:
            self.events.record("host_back", pe=pe, host=self.names.get(pe, pe))

    def removed(self, entry, why: str) -> None:
        pe = _hex(entry.element.identifier)
        self.events.record("host_lost", pe=pe, host=self.names.get(pe, pe), reason=why)

    def refused(self, cause: int) -> None:
        pass


class PoolConsole:
    """The registrar's console: ``/pool`` and ``/events`` as JSON, the page at ``/``."""

    def __init__(
        self,
        reactor,
        handlespace,
        pe_urls: list[str],
        keeper_urls: list[str],
        events: EventLog,
        timeout_s: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.handlespace = handlespace  # a callable: the handlespace JSON now
        self.pe_urls = [u.rstrip("/") for u in pe_urls]
        self.keeper_urls = [u.rstrip("/") for u in keeper_urls]
        self.events = events
        self.timeout_s = timeout_s
        self.agent = None  # made on the first fetch
        self.history = LoadHistory()
        self.names: dict[str, str] = {}  # PE identifier -> host name, as last heard
        self.urls: dict[str, tuple[str, str]] = {}  # status URL -> (PE, host name)
        self.observer = RegistrarEvents(events, self.history, self.names)

    def _agent(self):
        if self.agent is None:
            from twisted.web import client

            class QuietFactory(client._HTTP11ClientFactory):
                noisy = False  # no two log lines per fetch

            pool = client.HTTPConnectionPool(self.reactor, persistent=True)
            pool._factory = QuietFactory
            pool.maxPersistentPerHost = 2
            self.agent = client.Agent(self.reactor, pool=pool)
        return self.agent

    def _get(self, url: str) -> defer.Deferred:
        from twisted.web.client import readBody

        d = self._agent().request(b"GET", url.encode())
        d.addCallback(readBody)
        d.addCallback(json.loads)
        d.addTimeout(self.timeout_s, self.reactor)
        return d

    async def _document(self) -> dict:
        pe_calls = [self._get(f"{u}/status") for u in self.pe_urls]
        keeper_calls = [
            defer.gatherResults(
                [self._get(f"{u}/vms"), self._get(f"{u}/events")], consumeErrors=True
            )
            for u in self.keeper_urls
        ]
        answers = await defer.DeferredList(pe_calls + keeper_calls, consumeErrors=True)
        pes, keepers = {}, {}
        for url, (ok, doc) in zip(self.pe_urls, answers[: len(pe_calls)]):
            pes[url] = doc if ok else _reason(doc)
        for url, (ok, doc) in zip(self.keeper_urls, answers[len(pe_calls) :]):
            keepers[url] = {"vms": doc[0], "events": doc[1]} if ok else _reason(doc)
        view = pool_view(
            self.handlespace(),
            pes,
            keepers,
            self.reactor.seconds(),
            self.events.describe(),
            self.history.describe(),
            self.names,
            self.urls,
        )
        for host in view["hosts"]:
            if host.get("pe") and host["name"] != host["pe"]:
                self.names[host["pe"]] = host["name"]
            if host.get("status_url") and host["state"] != "unreachable":
                self.urls[host["status_url"]] = (host["pe"], host["name"])
        return view

    def document(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._document())

    def attach(self, site) -> None:
        """Put ``/``, ``/pool`` and ``/events`` on the registrar's status site."""
        from ..status import JsonDocument
        from .page import Page

        site.putChild(b"pool", JsonDocument(self.document))
        site.putChild(b"events", JsonDocument(self.events.describe))
        site.putChild(b"", Page())


def _reason(failure) -> str:
    err = failure.value
    if isinstance(err, defer.FirstError):
        err = err.subFailure.value
    if isinstance(err, defer.TimeoutError | defer.CancelledError):
        return "no answer"
    return str(err) or type(err).__name__
