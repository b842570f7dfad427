"""`xenpool bench failover` runs its trials and reports every key (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_failover_json():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpool.cli",
            "bench",
            "failover",
            "--trials",
            "1",
            "--heartbeat-interval",
            "0.5",
            "--heartbeat-timeout",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in (
        "killed_median_s",
        "killed_max_s",
        "silent_median_s",
        "silent_max_s",
        "heartbeat_timeout_s",
    ):
        assert summary[key] > 0, key
    assert (
        summary["vm_failovers"]["killed"] >= 1
        and summary["vm_failovers"]["silent"] >= 1
    )
    assert summary["killed_median_s"] <= summary["killed_max_s"]
