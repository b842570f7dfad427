"""rsplib interoperability over SCTP, in a QEMU guest (this machine's kernel has no SCTP).

Builds the initramfs of tests/guest/image.py (busybox, the kernel's SCTP modules, this
checkout's Python with xenpool, rsplib's programs), boots Debian's kernel with it under QEMU
and reads the scenarios' results (tests/guest/scenarios.py) from the serial console. Skipped,
with one line, without root or the packages (scripts/bootstrap.sh installs them as root).

tcpdump captures the scenarios' SCTP traffic inside the guest; the capture comes back over the
console and Wireshark (tshark) decodes it here: no malformed packet, no expert error, the ASAP
and ENRP messages of the scenarios decoded by Wireshark's own dissectors, every one of them also
parsed by xenpool's codec, and the PE-PU session's own PPID present.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import pytest

from xenpool.protocol import messages as M
from xenpool.protocol import session as S

from . import pcapcheck

sys.path.insert(0, str(Path(__file__).with_name("guest")))
import image

pytestmark = pytest.mark.slow
# software emulation; the whole run stays under about five minutes on an idle machine
# (XENPOOL_GUEST_TIMEOUT=seconds for a machine busy with other guests)
BOOT_TIMEOUT_S = float(os.environ.get("XENPOOL_GUEST_TIMEOUT", 420))


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


PCAP_BLOCK = re.compile(
    r"^PCAP BEGIN (\d+) ([0-9a-f]{64})\n(.*?)^PCAP END\n", re.M | re.S
)


@pytest.fixture(scope="module")
def guest():
    """(the console without the capture, the capture's pcap bytes or why there is none)."""
    reason = image.missing()
    if reason:
        pytest.skip(f"SCTP interop guest: {reason}")
    with tempfile.TemporaryDirectory(prefix="xp-sctp-") as tmp:
        text = image.boot(sys.executable, list(ASSERTED), Path(tmp), BOOT_TIMEOUT_S)
    text = text.replace("\r\n", "\n")
    block = PCAP_BLOCK.search(text)
    if block is None:
        why = re.findall(r"^CAPTURE (?:NONE|FAILED).*$", text, re.M)
        return (
            text,
            f"the guest printed no capture ({'; '.join(why) or 'no reason given'})",
        )
    console = text[: block.start()] + text[block.end() :]
    try:
        pcap = gzip.decompress(base64.b64decode(block.group(3)))
    except (ValueError, OSError, EOFError) as err:
        return console, f"the capture came back unreadable: {err}"
    if len(pcap) != int(block.group(1)):
        return (
            console,
            f"the capture came back cut: {len(pcap)} of {block.group(1)} bytes",
        )
    if hashlib.sha256(pcap).hexdigest() != block.group(2):
        return console, "the capture came back changed (SHA-256 differs)"
    if os.environ.get("XENPOOL_GUEST_PCAP"):  # keep it, to look at it in Wireshark
        Path(os.environ["XENPOOL_GUEST_PCAP"]).write_bytes(pcap)
    return console, pcap


@pytest.fixture(scope="module")
def console(guest):
    return guest[0]


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


# ---------------------------------------------------------------- the capture, through Wireshark

SESSION_PPID = S.XENPOOL_PPID  # xenpool's application messages ("XPL1", 0x58504c31)
# Loopback offloads the SCTP CRC32c to a device that has none: every packet on lo carries 0
# there (asserted below), so the checksum is not verified; everything else is.
CAPTURE_PREFS = ("sctp.checksum:None",)
# Wireshark has no dissector for xenpool's PPID and then falls back on the port: the lease
# messages PEs send to a voter's ASAP port (3863) on that PPID would be dissected as ASAP (an
# "Unknown ASAP type" 0x50, "malformed"). Told that the PPID is not ASAP, it shows them as data.
CAPTURE_DECODE_AS = (f"sctp.ppi=={S.XENPOOL_PPID},data",)
# Message types the scenarios must have produced (Wireshark's names), besides the rest seen.
ASAP_EXPECTED = {
    1: "Registration",
    3: "Registration Response",
    5: "Handle Resolution",
    6: "Handle Resolution Response",
    7: "Endpoint Keep-Alive",
    8: "Endpoint Keep-Alive Acknowledgement",
    9: "Endpoint Unreachable",
    11: "Cookie",
    12: "Cookie Echo",
}
ENRP_EXPECTED = {
    1: "Presence",
    2: "Handle Table Request",
    3: "Handle Table Response",
    4: "Handle Update",
    7: "Init Takeover",
    8: "Init Takeover Ack",
}  # not TAKEOVER_SERVER: who takes over R1 is a race, and R3 takes rspregistrar's PEs alone
XENPOOL_REGISTRARS, RSPREGISTRAR = {0x11, 0x33}, 0x22  # scenarios.py's R1, R3 and RR


def sctp_data_chunks(pcap: bytes):
    """(source port, destination port, PPID, user data, chunk flags) of every SCTP DATA
    chunk in a pcap of Ethernet frames (tcpdump on lo), read here without Wireshark."""
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">"}[pcap[:4]]
    linktype = struct.unpack(endian + "I", pcap[20:24])[0]
    assert linktype == 1, f"link type {linktype}, not Ethernet"
    offset = 24
    while offset < len(pcap):
        caplen, wirelen = struct.unpack(endian + "II", pcap[offset + 8 : offset + 16])
        assert caplen == wirelen, "a packet was cut by the snapshot length"
        frame = pcap[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if frame[12:14] != b"\x08\x00" or frame[23] != 132:
            continue  # IPv4 SCTP only (the filter was "sctp"; the guest uses IPv4)
        ip_total = struct.unpack("!H", frame[16:18])[0]
        sctp = frame[14 + (frame[14] & 0x0F) * 4 : 14 + ip_total]
        source, destination = struct.unpack("!HH", sctp[:4])
        at = 12
        while at + 4 <= len(sctp):
            kind, flags, length = struct.unpack("!BBH", sctp[at : at + 4])
            if kind == 0:  # DATA
                ppid = struct.unpack("!I", sctp[at + 12 : at + 16])[0]
                yield source, destination, ppid, sctp[at + 16 : at + length], flags
            at += max(4, (length + 3) & ~3)


@pytest.fixture(scope="module")
def capture(guest, tmp_path_factory):
    if not pcapcheck.tshark_available():
        pytest.skip(
            "SCTP capture: tshark not installed (scripts/bootstrap.sh installs it)"
        )
    if not Path(image.TCPDUMP).is_file():
        pytest.skip(
            "SCTP capture: tcpdump not installed (scripts/bootstrap.sh installs it as root)"
        )
    console, pcap = guest
    assert isinstance(pcap, bytes), (
        f"{pcap} (tcpdump is installed); console:\n{console[-4000:]}"
    )
    path = tmp_path_factory.mktemp("capture") / "sctp.pcap"
    path.write_bytes(pcap)
    return path


@pytest.fixture(scope="module")
def decoded(capture):
    """One dict per packet of what Wireshark decoded (tshark -T json)."""
    packets = pcapcheck.tshark_fields(
        capture,
        [
            "sctp.checksum",
            "sctp.dstport",
            "sctp.data_payload_proto_id",
            "asap.message_type",
            "enrp.message_type",
            "enrp.sender_servers_id",
        ],
        decode_as=CAPTURE_DECODE_AS,
        prefs=CAPTURE_PREFS,
    )
    assert packets, "Wireshark read no packet from the capture"
    return packets


def counts(packets, field) -> collections.Counter:
    return collections.Counter(int(v) for p in packets for v in p[field])


def test_tcpdump_captured_every_packet(console):
    stats = dict(
        (what, int(n))
        for n, what in re.findall(
            r"^CAPTURE (\d+) packets? (captured|dropped by kernel)", console, re.M
        )
    )
    if not Path(image.TCPDUMP).is_file():
        pytest.skip(
            "SCTP capture: tcpdump not installed (scripts/bootstrap.sh installs it as root)"
        )
    assert stats.get("captured", 0) > 0, console[-3000:]
    assert stats.get("dropped by kernel") == 0, stats


def test_wireshark_finds_no_malformed_packet_in_the_guest_capture(capture, decoded):
    assert (
        pcapcheck.tshark_malformed(
            capture, decode_as=CAPTURE_DECODE_AS, prefs=CAPTURE_PREFS
        )
        == []
    )
    # the one thing not checked: the CRC32c, which loopback leaves unset in every packet
    assert {p["sctp.checksum"][0] for p in decoded} == {"0x00000000"}
    warnings = [
        (p["frame.number"][0], message)
        for p in decoded
        for severity, message in zip(p["_ws.expert.severity"], p["_ws.expert.message"])
        if int(severity, 0) >= 0x00600000  # PI_WARN and above
    ]
    assert not warnings, warnings[:20]


def test_wireshark_decodes_the_scenarios_asap_and_enrp_messages(decoded):
    asap, enrp = (
        counts(decoded, "asap.message_type"),
        counts(decoded, "enrp.message_type"),
    )
    print(f"ASAP message types decoded: {dict(sorted(asap.items()))}")
    print(f"ENRP message types decoded: {dict(sorted(enrp.items()))}")
    missing = {f"ASAP {n} {name}" for n, name in ASAP_EXPECTED.items() if not asap[n]}
    missing |= {f"ENRP {n} {name}" for n, name in ENRP_EXPECTED.items() if not enrp[n]}
    assert not missing, (missing, asap, enrp)
    ppids = counts(decoded, "sctp.data_payload_proto_id")
    # every DATA chunk on ASAP's and ENRP's PPIDs was decoded as one of their messages
    assert ppids[M.ASAP_PPID] == sum(asap.values()) > 0, (ppids, asap)
    assert ppids[M.ENRP_PPID] == sum(enrp.values()) > 0, (ppids, enrp)
    assert ppids[SESSION_PPID] > 0, f"no PE-PU session message in the capture: {ppids}"
    # ... sent by both sides: registrations at the xenpool registrar (rspserver's, port 3863)
    # and at rspregistrar (xenpool's PEs, port 3864); ENRP from every registrar, handle
    # updates from a xenpool registrar and from rspregistrar
    registered_at = {
        int(p["sctp.dstport"][0]) for p in decoded if "1" in p["asap.message_type"]
    }
    assert {3863, 3864} <= registered_at, registered_at
    enrp_from = collections.Counter(
        (int(sender, 16), int(kind))
        for p in decoded
        for kind, sender in zip(p["enrp.message_type"], p["enrp.sender_servers_id"])
    )
    print(f"ENRP (sender, type) decoded: {dict(sorted(enrp_from.items()))}")
    senders = {sender for sender, _ in enrp_from}
    assert XENPOOL_REGISTRARS | {RSPREGISTRAR} <= senders, senders
    updates_from = {sender for sender, kind in enrp_from if kind == 4}
    assert updates_from & XENPOOL_REGISTRARS and RSPREGISTRAR in updates_from, (
        updates_from
    )


def test_every_captured_message_is_whole_and_xenpool_parses_it(guest, capture):
    """Without Wireshark: each ASAP/ENRP message (rsplib's too) and each application message
    on xenpool's PPID is one whole SCTP message whose length field is its size, and
    xenpool's codecs parse it."""
    seen = collections.Counter()
    for source, destination, ppid, data, flags in sctp_data_chunks(guest[1]):
        if ppid not in (M.ASAP_PPID, M.ENRP_PPID, S.XENPOOL_PPID):
            continue
        where = f"PPID {ppid:#x} {source}->{destination}"
        assert flags & 0x03 == 0x03, f"{where}: a message in fragments"
        assert struct.unpack("!H", data[2:4])[0] == len(data), (
            f"{where}: header length {struct.unpack('!H', data[2:4])[0]}, {len(data)} bytes"
        )
        message = S.decode(data) if ppid == S.XENPOOL_PPID else M.decode(data, ppid)
        seen[(ppid, type(message).__name__)] += 1
    print(f"parsed by xenpool: {dict(seen)}")
    assert {(M.ASAP_PPID, "Registration"), (M.ENRP_PPID, "HandleUpdate")} <= set(seen)
    # the PE-PU session (scenarios 2 and 4) and the PEs' lease votes, on xenpool's PPID
    assert {
        (S.XENPOOL_PPID, kind)
        for kind in ("CreateServer", "CheckRunning", "LeaseRequest", "LeaseAnswer")
    } <= set(seen), seen
