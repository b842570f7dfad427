"""``xenpool bench pe`` end to end: a real registrar, a real PE daemon on libvirt's test
driver and a load generator, all started and stopped by the bench. No timing is asserted.

Every process the bench starts inherits a marker in its environment; afterwards none
may be left (found through /proc, so Linux only).
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from .daemons import bench_process, processes_with, read_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path("/proc/self/environ").exists(),
        reason="reads CPU times, finds processes in /proc",
    ),
]


def bench(marker: str, *args: str, **kwargs) -> subprocess.Popen:
    return bench_process("pe", marker, *args, **kwargs)


def test_small_run_reports_the_pe_cpu_and_leaves_no_process():
    marker = uuid.uuid4().hex
    proc = bench(
        marker,
        "--vms",
        "3",
        "--seconds",
        "2",
        "--json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["vms"] == 3 and result["seconds"] == 2
    assert result["pe_cpu_percent"] >= 0 and result["idle_cpu_percent"] >= 0
    assert isinstance(result["heartbeat_cpu_percent"], (int, float))
    # 3 sessions x 2 heartbeats, each answered "running"
    assert result["heartbeats"] == result["heartbeats_expected"] == 6
    assert result["cpu_us_per_heartbeat"] >= 0
    assert (
        result["load_interval_s"] == 30
    )  # the PE's default: load sampling is part of the run
    assert 0 < result["rtt_ms"]["median"] <= result["rtt_ms"]["max"]
    assert result["pe_rss_kb"] > 0 and result["targets"]["pe_cpu_percent"] == 1.0
    for window in ("idle", "heartbeat"):
        assert (
            result["windows"][window]["elapsed_s"] >= 2
            and result["windows"][window]["cpu_s"] >= 0
        )
    for kind in ("twisted", "selectors"):  # baselines of the same run, same load
        assert (
            result["baselines"][kind]["heartbeats"] == 6
            and result["baselines"][kind]["cpu_percent"] >= 0
        )
        assert f"ratio_to_{kind}" in result
        assert f"a minimal {kind} server, pid" in err
    assert "PE pid" in err and "registrar pid" in err  # the daemons really ran
    assert processes_with(marker) == []


def test_terminated_mid_run_stops_its_processes():
    marker = uuid.uuid4().hex
    proc = bench(
        marker,
        "--vms",
        "3",
        "--seconds",
        "60",
        "--json",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # wait, with a deadline, until the VMs run and the measuring has begun
        read_until(proc, "idle window")
        commands = processes_with(marker)
        assert sum("twistd" in cmd for cmd in commands) == 2, (
            commands
        )  # the registrar and the PE
        assert any("xenpool.tools.bench_pe client" in cmd for cmd in commands), commands
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert processes_with(marker) == []
