"""The keeper service: a VmKeeper per VM, cookies saved, a status page."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from .. import tls
from ..console.events import EventLog
from ..logs import hex_id
from ..protocol import cookie as C
from ..protocol import session as S
from ..status import Metrics
from .core import PuSettings, State, VmKeeper

log = Logger()


def _keeping_failed(failure: Failure, keeper: VmKeeper) -> None:
    log.failure("keeping {server} failed", failure, server=keeper.server_id)


class KeeperService(service.MultiService):
    def __init__(
        self,
        vms: list[S.CreateServer],
        access,
        reactor,
        settings: PuSettings,
        state_dir: str,
        status: str | None,
        secret: bytes = b"",
    ) -> None:
        super().__init__()
        self.access, self.reactor, self.settings = access, reactor, settings
        self.secret = secret  # the pool secret: signs the operator's VM commands
        self.events = EventLog(reactor, "keeper")
        self._lost_on: dict[str, tuple] = {}  # VM -> (PE lost or moved off, moved)
        self.state_dir = Path(state_dir)
        # A VM of the keep file is this keeper's whatever its state dir says (it may have
        # been killed before it saved a cookie): "already running" means its PE keeps it
        # for the lease, and the refusing PE's cookie names that PE, where it is re-adopted;
        # never a reason to give it up.
        self.keepers = [
            VmKeeper(vm, access, reactor, settings, ran_before=True) for vm in vms
        ]
        for keeper in self.keepers:
            self._watch(keeper)
        self.registry = CollectorRegistry()
        self.failover_seconds = Histogram(
            "xenpool_keeper_failover_duration_seconds",
            "From a VM's loss to its running again elsewhere",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self._failovers_seen: dict[str, int] = {}
        self.registry.register(_KeeperCollector(self))
        self.keep_file: str | None = None  # reread on SIGHUP (``reload``)
        if status:
            tls.service(status, server.Site(_Vms(self)), reactor).setServiceParent(self)

    def _watch(self, keeper: VmKeeper) -> None:
        keeper.events.on_state = self._state
        keeper.events.on_cookie = self._save_cookie

    def _keep(self, keeper: VmKeeper) -> None:
        keeper.run().addErrback(_keeping_failed, keeper)

    def keeper_of(self, name: str) -> VmKeeper | None:
        return next((k for k in self.keepers if k.server_id == name), None)

    # ------------------------------------------------------------ operator's commands

    def stop_vm(self, name: str) -> defer.Deferred:
        """Stop a VM of the keep file (until ``start_vm`` or a restart of the keeper)."""
        keeper = self.keeper_of(name)
        assert keeper is not None  # the command checked the name (command_target)
        self.events.record("vm_stop", server_id=name, reason="by the operator")
        return keeper.stop()

    def start_vm(self, name: str) -> None:
        """Keep a stopped VM again: a new keeper for it, as at start-up."""
        old = self.keeper_of(name)
        assert old is not None  # the command checked the name (command_target)
        keeper = VmKeeper(
            old.request, self.access, self.reactor, self.settings, ran_before=True
        )
        self._watch(keeper)
        self.keepers[self.keepers.index(old)] = keeper
        self.events.record("vm_start", server_id=name, reason="by the operator")
        self._keep(keeper)

    def command_target(self, action: str):
        def check(name: str) -> str | None:
            keeper = self.keeper_of(name)
            if keeper is None:
                return f"this keeper keeps no VM named {name!r}"
            stopped = keeper.state in (State.STOPPED, State.REFUSED)
            if action == "start" and not stopped:
                return f"{name} is {keeper.state.value}, not stopped"
            if action == "stop" and stopped:
                return f"{name} is {keeper.state.value} already"
            return None

        return check

    def reload(self, vms: list[S.CreateServer]) -> list[str]:
        """The keep file again (SIGHUP): new VMs kept, removed ones stopped, changed
        ones refused (the running VM stays as it is). Returns one line per change."""
        wanted = {vm.server_id: vm for vm in vms}
        lines = []
        for keeper in list(self.keepers):
            vm = wanted.pop(keeper.server_id, None)
            if vm is None:
                lines.append(f"{keeper.server_id}: removed from the keep file: stopped")
                self.keepers.remove(keeper)
                keeper.stop()
            elif vm != keeper.request:
                lines.append(
                    f"{keeper.server_id}: changed in the keep file, not applied: "
                    f"a running VM keeps its RAM, disk and IPs (stop it, remove it, reload, add it back)"
                )
        for name, vm in wanted.items():
            keeper = VmKeeper(vm, self.access, self.reactor, self.settings)
            self._watch(keeper)
            self.keepers.append(keeper)
            self._load_cookie(keeper)
            self._keep(keeper)
            lines.append(f"{name}: new in the keep file: started")
        return lines

    def reload_file(self) -> None:
        from twisted.python import usage

        from .tap import read_vms

        if self.keep_file is None:  # VMs given on the command line: nothing to reread
            return
        try:
            vms = read_vms(self.keep_file)
        except (usage.UsageError, OSError) as err:
            log.warn("SIGHUP: keep file not reloaded: {err}", err=str(err))
            return
        lines = self.reload(vms)
        for line in lines or ["nothing changed"]:
            log.warn("SIGHUP: {line}", line=line)

    def _cookie_path(self, keeper: VmKeeper) -> Path:
        return self.state_dir / f"{keeper.server_id}.cookie"

    def startService(self) -> None:
        super().startService()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for keeper in self.keepers:
            self._load_cookie(keeper)
            self._keep(keeper)
        if self.keep_file:
            import signal

            signal.signal(
                signal.SIGHUP,
                lambda *_: self.reactor.callFromThread(self.reload_file),
            )

    def stopService(self):
        # The VMs stay where they run, kept by their PEs for the lease.
        for keeper in self.keepers:
            keeper.leave()
        return super().stopService()

    def _load_cookie(self, keeper: VmKeeper) -> None:
        """The VM's last cookie, if its state file holds one. A file that cannot be read
        or holds no cookie must not keep the VM down: the keeper asks with a plain
        request (the PEs' uniqueness check refuses a second start)."""
        path = self._cookie_path(keeper)
        try:
            cookie = path.read_bytes()
            C.peek(cookie)
        except FileNotFoundError:
            return
        except (OSError, C.CookieError) as err:
            keeper.ran_before = True
            log.warn(
                "{server}: ignoring its state file {path}: {err}; asking with a plain request",
                server=keeper.server_id,
                path=str(path),
                err=getattr(err, "reason", None) or str(err),
            )
            return
        keeper.cookie = cookie
        log.info(
            "{server}: found its last cookie; going back to it", server=keeper.server_id
        )

    def _save_cookie(self, keeper: VmKeeper, cookie: bytes) -> None:
        path = self._cookie_path(keeper)
        partial = path.with_suffix(".partial")
        try:
            partial.write_bytes(cookie)
            os.replace(partial, path)  # never a torn cookie after a crash
        except (
            OSError
        ) as err:  # the VM runs on; only a restarted keeper would miss the cookie
            log.warn(
                "{server}: cannot save its cookie in {path}: {err}",
                server=keeper.server_id,
                path=str(path),
                err=str(err),
            )

    def _record(self, keeper: VmKeeper, state: State, why: str) -> None:
        """Events for the status page and alerts: a VM lost with its PE, its failover
        (once it runs again), a planned or operator's move, a refusal for good."""
        name, pe = keeper.server_id, hex_id(keeper.pe.identifier) if keeper.pe else None
        if state == State.FAILING_OVER and pe is not None:
            if name in self._lost_on:  # the same loss, another round
                return
            moved = why.startswith("moved off")
            self._lost_on[name] = (pe, moved)
            if not moved:
                self.events.record("vm_lost", server_id=name, pe=pe, reason=why)
        elif state == State.RUNNING and name in self._lost_on:
            old, moved = self._lost_on.pop(name)
            if moved:
                self.events.record("moved", server_id=name, from_pe=old, to_pe=pe)
            else:
                took = keeper.last_failover_s
                self.events.record(
                    "failover",
                    server_id=name,
                    from_pe=old,
                    to_pe=pe,
                    took_s=None if took is None else round(took, 3),
                )
        elif state == State.REFUSED:
            self.events.record("start_refused", server_id=name, reason=why)

    def _state(self, keeper: VmKeeper, state: State, why: str) -> None:
        self._record(keeper, state, why)
        if (
            state == State.RUNNING
            and keeper.last_failover_s is not None
            and self._failovers_seen.get(keeper.server_id) != keeper.failovers
        ):
            self._failovers_seen[keeper.server_id] = keeper.failovers
            self.failover_seconds.observe(keeper.last_failover_s)
        took = (
            f" after a failover of {keeper.last_failover_s:.2f} s"
            if state == State.RUNNING and keeper.last_failover_s
            else ""
        )
        log.info(
            "{server}: {state}: {why}{took}",
            server=keeper.server_id,
            state=state.value,
            why=why,
            took=took,
        )
        if state in (State.STOPPED, State.REFUSED):
            try:
                self._cookie_path(keeper).unlink(missing_ok=True)
            except OSError as err:
                log.warn(
                    "{server}: cannot remove its state file: {err}",
                    server=keeper.server_id,
                    err=str(err),
                )

    def describe(self) -> list[dict]:
        return [
            {
                "server_id": k.server_id,
                "state": k.state.value,
                "pe": hex_id(k.pe.identifier) if k.pe else None,
                "pe_address": f"{k.pe.user_transport.addresses[0]}:{k.pe.user_transport.port}"
                if k.pe
                else None,
                "domain_state": k.domain_state,
                "failovers": k.failovers,
                "last_failover_s": k.last_failover_s,
                "running_since": k.running_since,
                "ram_mb": k.request.ram_mb,
            }
            for k in self.keepers
        ]


class _KeeperCollector:
    """The keeper's Prometheus metrics, collected when scraped."""

    def __init__(self, keeper: KeeperService) -> None:
        self.keeper = keeper

    def collect(self):
        states = GaugeMetricFamily(
            "xenpool_keeper_vms", "VMs kept, by state", labels=["state"]
        )
        counts = {state.value: 0 for state in State}
        for k in self.keeper.keepers:
            counts[k.state.value] += 1
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        failovers = CounterMetricFamily(
            "xenpool_keeper_failovers",
            "Failovers of each VM (its PE lost, another asked)",
            labels=["server_id"],
        )
        for k in self.keeper.keepers:
            failovers.add_metric([k.server_id], k.failovers)
        yield failovers


class _Vms(resource.Resource):
    def __init__(self, keeper: KeeperService) -> None:
        super().__init__()
        self.putChild(b"vms", _VmList(keeper))
        self.putChild(b"metrics", Metrics(keeper.registry))
        self.putChild(b"events", _Events(keeper))
        self.putChild(b"admin", _KeeperAdmin(keeper))


class _VmList(resource.Resource):
    isLeaf = True

    def __init__(self, keeper: KeeperService) -> None:
        super().__init__()
        self.keeper = keeper

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.keeper.describe(), indent=1).encode()


class _Events(resource.Resource):
    isLeaf = True

    def __init__(self, keeper: KeeperService) -> None:
        super().__init__()
        self.keeper = keeper

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.keeper.events.describe(), indent=1).encode()


def _KeeperAdmin(keeper: KeeperService) -> resource.Resource:
    """``POST /admin``: ``stop`` or ``start`` a VM, signed with the pool secret."""
    from ..console.admin import AdminResource, HostCommands

    def run(action: str, name: str) -> dict:
        if action == "stop":
            keeper.stop_vm(name)
            return {"message": f"{name} is stopping"}
        keeper.start_vm(name)
        return {"message": f"{name} is starting"}

    class Commands(HostCommands):
        def take(self, body: bytes) -> dict:
            try:
                action = json.loads(body).get("action", "")
            except (ValueError, AttributeError):
                action = ""
            self.check_target = keeper.command_target(str(action))
            return super().take(body)

    return AdminResource(
        Commands(keeper.secret, "keeper", keeper.reactor, run, ("stop", "start"), None)
    )
