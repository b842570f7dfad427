"""rsplib interoperability over SCTP, in a QEMU guest (this machine's kernel has no SCTP).

Builds the initramfs of tests/guest/image.py (busybox, the kernel's SCTP modules, this
checkout's Python with xenpool, rsplib's programs), boots Debian's kernel with it under QEMU
and reads the scenarios' results (tests/guest/scenarios.py) from the serial console. Skipped,
with one line, without root or the packages (scripts/bootstrap.sh installs them as root).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("guest")))
import image

pytestmark = pytest.mark.slow
BOOT_TIMEOUT_S = 420  # software emulation; the whole run stays under about five minutes


# The scenarios this suite asserts (tests/guest/scenarios.py names them); the guest runs
# exactly these. See the README's interop matrix for any left out, and run those by hand:
#   sudo .venv/bin/python tests/guest/image.py 1 2 3 4
SCENARIOS = {
    1: "rsplib_server_and_terminal_through_a_xenpool_registrar",
    2: "xenpool_pes_at_rspregistrar_and_a_pu_failing_over",
    3: "enrp_between_xenpool_and_rspregistrar",
    4: "xenpool_session_and_enrp_over_sctp",
}
ASSERTED = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def console():
    reason = image.missing()
    if reason:
        pytest.skip(f"SCTP interop guest: {reason}")
    with tempfile.TemporaryDirectory(prefix="xp-sctp-") as tmp:
        yield image.boot(sys.executable, list(ASSERTED), Path(tmp), BOOT_TIMEOUT_S)


@pytest.mark.parametrize("number", ASSERTED, ids=[SCENARIOS[n] for n in ASSERTED])
def test_scenario_passes_over_sctp_in_the_guest(console, number):
    assert "GUEST booted" in console, console[-3000:]
    lines = re.findall(rf"^SCENARIO {number} (PASS|FAIL)(.*)$", console, re.M)
    assert lines, (
        f"scenario {number} ({SCENARIOS[number]}) did not report; console:\n{console[-4000:]}"
    )
    assert lines[0][0] == "PASS", (
        f"scenario {number} ({SCENARIOS[number]}): {lines[0][1]}\n{console[-6000:]}"
    )


def test_rsplib_refuses_nothing_xenpool_sent(console):
    assert "SCENARIOS " in console, console[-3000:]
    refusals = re.findall(r"^REFUSAL .*$", console, re.M)
    assert not refusals, "\n".join(refusals)
