"""The systemd units in etc/systemd: checked by ``systemd-analyze verify``, run the
daemons with ``twistd -n`` as the xenpool user, configs in /etc/xenpool, state in
/var/lib/xenpool, restarted on failure."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[1] / "etc" / "systemd"
NAMES = ("xenpool-registrar.service", "xenpool-pe@.service", "xenpool-keeper.service")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name", NAMES)
def test_each_unit_runs_its_daemon_as_an_operator_expects(name):
    service = unit(name)["Service"]
    command = service["ExecStart"].split()
    assert command[0] == "/opt/xenpool/bin/twistd"
    assert command[1:4] == ["--nodaemon", "--pidfile=", "--logfile=-"]  # no twistd.pid
    assert command[4] == name.split("@")[0].split(".")[0].replace("keeper", "pu")
    assert any(part.startswith("/etc/xenpool/") for part in command)
    assert service["User"] == "xenpool"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"].startswith("xenpool/")
    assert service["WorkingDirectory"].startswith("/var/lib/xenpool/")
    if "--state-dir" in command:
        assert command[command.index("--state-dir") + 1] == service["WorkingDirectory"]


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    # The units name /opt/xenpool/bin/twistd (a venv there); verify checks that the
    # command exists, so here they run this venv's twistd.
    twistd = Path(sys.executable).with_name("twistd")
    for name in NAMES:
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(
            text.replace("/opt/xenpool/bin/twistd", str(twistd))
        )
    (tmp_path / "xenpool-pe@Xen.service").symlink_to("xenpool-pe@.service")
    result = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            "xenpool-registrar.service",
            "xenpool-pe@Xen.service",
            "xenpool-keeper.service",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # verify warns (and may still exit 0) about a directive it ignores: no output at all
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert not result.stdout.strip(), result.stdout


def test_the_sysusers_file_makes_the_xenpool_user():
    lines = [
        line.split()
        for line in (UNITS / "xenpool.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ["u", "xenpool", "-"] == lines[0][:3]
