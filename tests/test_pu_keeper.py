"""The keeper service's state directory, on a Clock with scripted PEs."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from xenpool.protocol import messages as M
from xenpool.pu import keeper as keeper_module
from xenpool.pu.core import PuSettings, State
from xenpool.pu.keeper import KeeperService
from xenpool.testing import ScriptedPE
from xenpool.testing import ScriptedPool as Pool

from .helpers import REQUEST, sealed


@pytest.fixture
def logged(monkeypatch):
    events: list[dict] = []
    monkeypatch.setattr(keeper_module, "log", Logger(observer=events.append))
    return events


def service(tmp_path, *pes) -> tuple[KeeperService, Pool]:
    clock = Clock()
    pool = Pool(clock, *pes)
    return KeeperService(
        [REQUEST], pool, clock, PuSettings(), str(tmp_path), None
    ), pool


def test_a_saved_cookie_is_echoed_and_a_new_one_saved(tmp_path):
    (tmp_path / "web1.cookie").write_bytes(sealed(1, True))
    pe = ScriptedPE(1)
    keeper, _ = service(tmp_path, pe)
    keeper.startService()
    assert pe.received[0] == M.CookieEcho(sealed(1, True))
    assert (tmp_path / "web1.cookie").read_bytes() == b"cookie from 1"


def test_a_corrupt_state_file_is_ignored_with_one_line_naming_it(tmp_path, logged):
    """A broken cookie in the state dir was echoed forever ("14 ... is not a xenpool
    cookie") and the VM never came back."""
    path = tmp_path / "web1.cookie"
    path.write_bytes(b"\x00half a cookie")
    pe = ScriptedPE(1)
    keeper, _ = service(tmp_path, pe)
    keeper.startService()
    assert pe.received[0] == REQUEST and keeper.keepers[0].state == State.RUNNING
    warnings = [formatEvent(e) for e in logged if e["log_level"].name == "warn"]
    assert (
        len(warnings) == 1
        and str(path) in warnings[0]
        and "is not a xenpool cookie" in warnings[0]
    )
    assert path.read_bytes() == b"cookie from 1"  # the good cookie replaces it


def test_an_unreadable_state_file_is_ignored_and_the_vm_kept(tmp_path, logged):
    path = tmp_path / "web1.cookie"
    path.mkdir()  # exists, cannot be read (nor replaced)
    pe = ScriptedPE(1)
    keeper, _ = service(tmp_path, pe)
    keeper.startService()
    assert pe.received[0] == REQUEST and keeper.keepers[0].state == State.RUNNING
    warnings = [formatEvent(e) for e in logged if e["log_level"].name == "warn"]
    assert (
        str(path) in warnings[0] and len(warnings) == 2
    )  # ignored on load; not saved later


def test_with_an_ignored_state_file_already_running_is_not_final(tmp_path):
    """The keeper ran the VM before: "already running" means its old PE may still hold it
    (until its lease ends), so the keeper waits and asks again instead of giving up."""
    (tmp_path / "web1.cookie").write_bytes(b"garbage")
    pe = ScriptedPE(1, refuse=13)
    keeper, _ = service(tmp_path, pe)
    keeper.startService()
    assert keeper.keepers[0].state == State.WAITING


def test_a_keeper_killed_before_it_saved_a_cookie_follows_the_holder_instead_of_giving_up(
    tmp_path,
):
    """No state file at all (killed during its first placement, before any cookie was
    kept): a PE that refuses because another host runs the VM names it in a cookie, and the
    keeper goes there and keeps it; "already running" never makes it give a VM of its keep
    file up."""
    from .helpers import RedirectingPE, cookie_naming

    holder = ScriptedPE(2)
    keeper, pool = service(tmp_path, RedirectingPE(1, holder=2), holder)
    keeper.startService()
    for _ in range(10):
        pool.clock.advance(1)
    (vm,) = keeper.keepers
    assert vm.state == State.RUNNING and vm.pe.identifier == 2
    assert holder.received[0] == M.CookieEcho(cookie_naming(2))
