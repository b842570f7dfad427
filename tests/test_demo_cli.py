"""The README's main job (`make demo`), the protocol walk-through and the xenpool command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from xenpool import __version__, cli
from xenpool.tools import demo


def test_demo_walks_through_the_protocol_and_refusals():
    console = Console(record=True, width=200)
    assert demo.run(console) == 0
    text = console.export_text()
    for expected in (
        "ASAP REGISTRATION, 56 bytes",
        "HANDLE_RESOLUTION_RESPONSE (156 bytes)",
        "bad MAC",
        "expired",
        "create_failed, code 16",
        "UNRECOGNIZED_MESSAGE",
        "weighted = 0.65",  # 0.75 * 0.6 + 0.25 * 0.8
    ):
        assert expected in text, expected
    assert "accepted?!" not in text


def test_version(capsys):
    try:
        cli.main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"xenpool {__version__}"


def test_decode_command(capsys):
    assert cli.main(["decode", "050000140009000758656e00803f000800000003"]) == 0
    assert (
        "HandleResolution(pool_handle=b'Xen', items=3, ram_mb=None)"
        in capsys.readouterr().out
    )
    assert cli.main(["decode", "0500ffff"]) == 1
    assert "message_length at byte 2" in capsys.readouterr().err
    assert cli.main(["decode", "zz"]) == 2


def test_plugins_command(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "weighted" in out and "builtin" in out


def test_bench_codec_json_from_the_console_script():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpool.cli",
            "bench",
            "codec",
            "--json",
            "--seconds",
            "0.05",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out)
    assert {"decode_per_s", "encode_per_s", "ceiling_per_s"} <= set(result)
    assert result["decode_per_s"] > 0 and result["ceiling_per_s"] > 0


@pytest.mark.slow
def test_make_demo_runs_the_cluster_and_a_failover():
    """The README's main job, as a person runs it (no terminal: the tables print as text)."""
    result = subprocess.run(
        [sys.executable, "-m", "xenpool.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "160"},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "placing 6 VMs" in out and "dies now" in out
    assert "fenced host" in out and "off confirmed" in out
    assert "VMs moved, each started exactly once more" in out
    assert "stopping everything" in out


def test_fence_confirm_lets_one_manual_fence_through(tmp_path):
    from twisted.internet import defer

    from xenpool.interfaces import FenceTarget
    from xenpool.plugins import load_plugins

    manual = load_plugins().create("stonith", "manual", state_dir=str(tmp_path))
    first = manual.fence(FenceTarget("host2"))
    failures = []
    first.addErrback(failures.append)
    assert failures and "xenpool fence-confirm host2" in failures[0].getErrorMessage()
    assert cli.main(["fence-confirm", "--state-dir", str(tmp_path), "host2"]) == 0
    results = []
    defer.maybeDeferred(manual.fence, FenceTarget("host2")).addBoth(results.append)
    assert results == [None]
    assert cli.main(["fence-confirm", "--state-dir", str(tmp_path), "../etc"]) == 2
