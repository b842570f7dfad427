"""rsplib interoperability over SCTP, in a QEMU guest (this machine's kernel has no SCTP).

Builds the initramfs of tests/guest/image.py (busybox, the kernel's SCTP modules, this
checkout's Python with xenpool, rsplib's programs), boots Debian's kernel with it under QEMU
and reads the scenarios' results (tests/guest/scenarios.py) from the serial console. Skipped,
with one line, without root or the packages (scripts/bootstrap.sh installs them as root).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("guest")))
import image  # noqa: E402

pytestmark = pytest.mark.slow
BOOT_TIMEOUT_S = 900  # software emulation; the run takes about five minutes here


@pytest.fixture(scope="module")
def console():
    reason = image.missing()
    if reason:
        pytest.skip(f"SCTP interop guest: {reason}")
    with tempfile.TemporaryDirectory(prefix="xp-sctp-") as tmp:
        root = Path(tmp)
        initrd, log = root / "initrd.gz", root / "console.log"
        initrd.write_bytes(image.build(sys.executable))
        qemu = subprocess.Popen(image.qemu_command(initrd, log), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        try:
            while qemu.poll() is None and time.monotonic() < deadline:
                if log.exists() and "GUEST DONE" in log.read_text(errors="replace"):
                    break
                threading.Event().wait(1)
        finally:
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()
        yield log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_scenario_passes_over_sctp_in_the_guest(console, number):
    assert "GUEST booted" in console, console[-3000:]
    lines = re.findall(rf"^SCENARIO {number} (PASS|FAIL)(.*)$", console, re.M)
    assert lines, f"scenario {number} did not report; console:\n{console[-4000:]}"
    assert lines[0][0] == "PASS", f"scenario {number}: {lines[0][1]}\n{console[-6000:]}"


def test_rsplib_refuses_nothing_xenpool_sent(console):
    assert "SCENARIOS " in console, console[-3000:]
    refusals = re.findall(r"^REFUSAL .*$", console, re.M)
    assert not refusals, "\n".join(refusals)
