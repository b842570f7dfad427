"""What a pool element keeps per PU session: the session it answers on and the VM it holds for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..protocol import session as S

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall


class Session(Protocol):
    def send(self, message: object) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class VmSession:
    """One VM kept for one PU connection."""

    request: S.CreateServer
    running: bool = False  # may be running (a start was attempted)
    lease_end: IDelayedCall | None = None  # the pending shutdown while no PU holds it
    stopping: bool = False  # this PE is stopping it: its lifecycle events are expected
    migrating: bool = False  # being live-migrated away: it runs, here or there
    discovered: bool = (
        False  # found running (start-up, live migration): its disk and IPs unknown
    )
