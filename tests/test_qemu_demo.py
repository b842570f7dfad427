"""``xenpool demo --qemu``: real guests, a host powered off, the guests back with their data."""

from __future__ import annotations

import re

import pytest

from xenpool.tools import qemu_demo, qemubed


@pytest.mark.slow
def test_the_qemu_demo_shows_guests_back_with_what_they_had_synced(capsys):
    reason = qemubed.missing()
    if reason:
        pytest.skip(f"QEMU demo: {reason}")
    assert qemu_demo.run(watch_s=2) == 0
    out = capsys.readouterr().out
    off = re.search(r"POWER OFF (host\d) .*: its guests (.*)", out)
    assert off, out
    had = dict(re.findall(r"(vm\d) had synced (\d+)", off.group(2)))
    back = re.findall(
        r"(vm\d): booted on (host\d), found (\d+) on its disk \(had synced (\d+)\)", out
    )
    assert sorted(vm for vm, *_ in back) == sorted(had), out
    for vm, host, found, synced in back:
        assert host != off.group(1)
        assert int(found) >= int(synced) == int(had[vm])
    assert "WRITES LOST" not in out and "NOT back" not in out
