"""Self-test of tests/pcapcheck.py against the installed tshark."""

import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pcapcheck
from pcapcheck import Frame, crc32c, tshark_fields, tshark_malformed, write_pcap

_skip_without_tshark = pytest.mark.skipif(
    not pcapcheck.tshark_available(), reason="tshark not installed"
)


def needs_tshark(fn):
    """Mark with the project's `tshark` marker and skip if tshark is absent."""
    return pytest.mark.tshark(_skip_without_tshark(fn))


ASAP_HANDLE_RESOLUTION = 0x05
PARAM_POOL_HANDLE = 0x0009

FIELDS = [
    "asap.message_type",
    "asap.message_length",
    "asap.pool_handle_pool_handle",
    "sctp.data_payload_proto_id",
    "sctp.data_tsn_raw",
    "sctp.checksum.status",
    "tcp.seq_raw",
    "tcp.checksum.status",
    "ip.checksum.status",
]


def handle_resolution(pool_handle: bytes, length_override: int | None = None) -> bytes:
    param = struct.pack("!HH", PARAM_POOL_HANDLE, 4 + len(pool_handle)) + pool_handle
    param += b"\x00" * (-len(param) % 4)
    length = 4 + len(param) if length_override is None else length_override
    return struct.pack("!BBH", ASAP_HANDLE_RESOLUTION, 0, length) + param


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_pcap_layout(tmp_path):
    path = tmp_path / "layout.pcap"
    msg = handle_resolution(b"Xen")
    write_pcap(path, [Frame(msg), Frame(msg, transport="tcp")])
    data = path.read_bytes()
    magic, vmaj, vmin, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, vmaj, vmin, linktype) == (0xA1B2C3D4, 2, 4, 1)
    ts1, _, incl1, _ = struct.unpack_from("<IIII", data, 24)
    ts2, _, _, _ = struct.unpack_from("<IIII", data, 24 + 16 + incl1)
    assert ts2 - ts1 == 1
    with pytest.raises(ValueError):
        write_pcap(tmp_path / "x.pcap", [Frame(msg, transport="udp")])


@needs_tshark
def test_handle_resolution_sctp_and_tcp(tmp_path):
    path = tmp_path / "hr.pcap"
    msg = handle_resolution(b"Xen")
    assert len(msg) == 12
    write_pcap(
        path, [Frame(msg, transport="sctp", ppid=11), Frame(msg, transport="tcp")]
    )

    pkts = tshark_fields(path, FIELDS)
    assert len(pkts) == 2
    for p in pkts:
        assert p["asap.message_type"] == ["5"]
        assert p["asap.message_length"] == ["12"]
        assert p["asap.pool_handle_pool_handle"] == [b"Xen".hex()]
        assert p["ip.checksum.status"] == ["1"]  # 1 == Good
        assert p["_ws.expert.severity"] == []
    sctp, tcp = pkts
    assert sctp["sctp.data_payload_proto_id"] == ["11"]
    assert sctp["sctp.checksum.status"] == ["1"]
    assert tcp["tcp.checksum.status"] == ["1"]
    assert tshark_malformed(path) == []


@needs_tshark
def test_sequence_numbers_continue(tmp_path):
    path = tmp_path / "seq.pcap"
    msg = handle_resolution(b"Xen")
    write_pcap(
        path,
        [
            Frame(msg),
            Frame(msg),
            Frame(msg, transport="tcp"),
            Frame(msg, transport="tcp"),
        ],
    )
    pkts = tshark_fields(path, FIELDS)
    assert [p["sctp.data_tsn_raw"] for p in pkts[:2]] == [["1"], ["2"]]
    seqs = [int(p["tcp.seq_raw"][0]) for p in pkts[2:]]
    assert seqs[1] - seqs[0] == len(msg)
    assert [p["asap.message_type"] for p in pkts] == [["5"]] * 4
    assert tshark_malformed(path) == []


@needs_tshark
def test_display_filter(tmp_path):
    path = tmp_path / "filt.pcap"
    msg = handle_resolution(b"Xen")
    write_pcap(path, [Frame(msg), Frame(msg, transport="tcp")])
    pkts = tshark_fields(path, ["asap.message_type"], display_filter="tcp")
    assert [p["frame.number"] for p in pkts] == [["2"]]


@needs_tshark
def test_bad_sctp_checksum_is_reported(tmp_path):
    # Proves checksum verification is really enabled in tshark runs.
    path = tmp_path / "badcrc.pcap"
    write_pcap(path, [Frame(handle_resolution(b"Xen"))])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # corrupt payload padding byte -> CRC32c mismatch
    path.write_bytes(bytes(raw))
    assert tshark_fields(path, ["sctp.checksum.status"])[0]["sctp.checksum.status"] == [
        "0"
    ]
    assert tshark_malformed(path) == [1]


@needs_tshark
def test_truncated_inside_parameter_is_malformed(tmp_path):
    # Header claims 12 bytes, only 9 are present: the Pool Handle parameter
    # (length 7) is cut short.  tshark raises a Malformed Packet exception.
    path = tmp_path / "trunc.pcap"
    msg = handle_resolution(b"Xen")[:9]
    write_pcap(path, [Frame(msg), Frame(msg, transport="tcp")])
    pkts = tshark_fields(path, FIELDS)
    for p in pkts:
        assert p["asap.message_length"] == ["12"]
        assert p["asap.pool_handle_pool_handle"] == []
    assert tshark_malformed(path) == [1, 2]


@needs_tshark
def test_inflated_length_field_is_not_flagged(tmp_path):
    # Real behaviour of tshark 4.0.x: the ASAP dissector does not compare the
    # message length field against the data, so a header claiming 40 bytes on
    # a 12-byte message decodes "fine".  Tests must compare
    # asap.message_length with the payload size themselves.  If this test
    # starts failing after a tshark upgrade, tshark began validating it.
    path = tmp_path / "inflated.pcap"
    msg = handle_resolution(b"Xen", length_override=40)
    write_pcap(path, [Frame(msg), Frame(msg, transport="tcp")])
    pkts = tshark_fields(path, FIELDS)
    for p in pkts:
        assert p["asap.message_type"] == ["5"]
        assert int(p["asap.message_length"][0]) == 40 != len(msg)
        assert p["asap.pool_handle_pool_handle"] == [b"Xen".hex()]
    assert tshark_malformed(path) == []
