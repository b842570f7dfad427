"""``xenpool bench registrar`` end to end: a real registrar daemon, a ceiling server and a
load generator, all started and stopped by the bench. No timing is asserted.

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
        reason="finds left-over processes through /proc",
    ),
]

KEYS = (
    "resolutions_per_s",
    "ceiling_per_s",
    "ratio",
    "registrations_per_s",
    "resolutions_per_s_with_updates",
    "load_updates_sent",
    "resolve_us_100",
    "resolve_us_100000",
    "bytes_per_pe",
)


def bench(marker: str, *args: str, **kwargs) -> subprocess.Popen:
    return bench_process("registrar", marker, *args, **kwargs)


def test_small_run_prints_every_measure_and_leaves_no_process():
    marker = uuid.uuid4().hex
    proc = bench(
        marker,
        "--pes",
        "50",
        "--seconds",
        "0.3",
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
    for key in KEYS:
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result)
    assert result["pes"] == 50 and result["load_updates_per_s"] == pytest.approx(
        50 / 30, abs=0.1
    )
    assert "registrar pid" in err  # the daemon really ran
    assert processes_with(marker) == []


def test_terminated_mid_run_stops_its_processes():
    marker = uuid.uuid4().hex
    proc = bench(
        marker,
        "--pes",
        "20",
        "--seconds",
        "60",
        "--json",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # wait, with a deadline, until the load generator runs against the daemon
        read_until(proc, "resolving for")
        assert any("twistd" in cmd for cmd in processes_with(marker))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert processes_with(marker) == []
