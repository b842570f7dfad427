"""Helpers the PE and PU unit tests share (their fakes of xenpool's contracts are in
``xenpool.testing``; the fixtures ``clock`` and ``pe`` in ``conftest.py``)."""

from __future__ import annotations

from xenpool.interfaces import NodeInfo
from xenpool.protocol import cookie as C
from xenpool.protocol import messages as M
from xenpool.protocol import session as S
from xenpool.pu.core import PuSettings, VmKeeper
from xenpool.testing import ScriptedPE

# -- the pool element side ------------------------------------------------------------

SECRET = b"a pool secret of some length"
NODE = NodeInfo("pe1", cpus=2, ram_kb=1024 * 1024)


class Session:
    def __init__(self) -> None:
        self.sent: list = []
        self.closed = False

    def send(self, message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        self.closed = True

    def results(self):
        return [m for m in self.sent if isinstance(m, S.CreateResult)]

    def cookies(self, now: float):
        return [
            C.unseal(m.cookie, SECRET, pool_handle=b"Xen", now=now, max_age_s=60)
            for m in self.sent
            if isinstance(m, M.Cookie)
        ]


def create(pe, server_id="web1", ram=300, session=None, ips=(), disk="") -> Session:
    session = session or Session()
    pe.handle(S.CreateServer(server_id, disk, ips, ram), session)
    return session


# -- the pool user side ---------------------------------------------------------------

REQUEST = S.CreateServer("web1", "", ("10.0.5.1",), 300)


def keeper(clock, pool, rng=lambda: 0.0, **settings) -> VmKeeper:
    k = VmKeeper(REQUEST, pool, clock, PuSettings(**settings), rng=rng)
    k.history = []
    k.events.on_state = lambda kp, state, why: k.history.append((state, why))
    return k


def sealed(pe: int, running: bool) -> bytes:
    return C.seal(
        C.SessionState(b"Xen", "web1", "", (), 300, 1, running, f"pe{pe}", pe, 0.0),
        b"secret",
    )


def cookie_naming(pe: int) -> bytes:
    return C.seal(
        C.SessionState(
            b"Xen", "web1", "", ("10.0.5.1",), 300, 1, True, f"host{pe}", pe, 0.0
        ),
        b"a secret",
    )


class RedirectingPE(ScriptedPE):
    """Refuses with 13 after a cookie naming the host that runs the VM, as a real PE does."""

    def __init__(self, identifier: int, holder: int) -> None:
        super().__init__(identifier, refuse=S.ResultCode.ALREADY_RUNNING)
        self.holder = holder

    def send(self, message) -> None:
        if (
            isinstance(message, (S.CreateServer, M.CookieEcho))
            and self.deliver is not None
        ):
            self.received.append(message)
            self.deliver(M.Cookie(cookie_naming(self.holder)))
            self.deliver(
                S.CreateResult(
                    "web1",
                    S.ResultCode.ALREADY_RUNNING,
                    0,
                    f"web1 runs on host{self.holder}",
                )
            )
            return
        super().send(message)
