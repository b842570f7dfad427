"""The keeper service: a VmKeeper per VM, cookies saved, a status page."""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.application import service
from twisted.logger import Logger
from twisted.web import resource, server

from .. import tls
from ..logs import hex_id
from ..protocol import cookie as C
from ..protocol import session as S
from .core import PuSettings, State, VmKeeper

log = Logger()


class KeeperService(service.MultiService):
    def __init__(
        self,
        vms: list[S.CreateServer],
        access,
        reactor,
        settings: PuSettings,
        state_dir: str,
        status: str | None,
    ) -> None:
        super().__init__()
        self.state_dir = Path(state_dir)
        # A VM of the keep file is this keeper's whatever its state dir says (it may have
        # been killed before it saved a cookie): "already running" means its PE keeps it
        # for the lease, and the refusing PE's cookie names that PE, where it is re-adopted;
        # never a reason to give it up.
        self.keepers = [
            VmKeeper(vm, access, reactor, settings, ran_before=True) for vm in vms
        ]
        for keeper in self.keepers:
            keeper.events.on_state = self._state
            keeper.events.on_cookie = self._save_cookie
        if status:
            tls.service(status, server.Site(_Vms(self)), reactor).setServiceParent(self)

    def _cookie_path(self, keeper: VmKeeper) -> Path:
        return self.state_dir / f"{keeper.server_id}.cookie"

    def startService(self) -> None:
        super().startService()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for keeper in self.keepers:
            self._load_cookie(keeper)
            keeper.run().addErrback(
                lambda f, k=keeper: log.failure(
                    "keeping {server} failed", f, server=k.server_id
                )
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

    def _state(self, keeper: VmKeeper, state: State, why: str) -> None:
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


class _Vms(resource.Resource):
    def __init__(self, keeper: KeeperService) -> None:
        super().__init__()
        self.putChild(b"vms", _VmList(keeper))


class _VmList(resource.Resource):
    isLeaf = True

    def __init__(self, keeper: KeeperService) -> None:
        super().__init__()
        self.keeper = keeper

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.keeper.describe(), indent=1).encode()
