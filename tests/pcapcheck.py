"""Independent wire-format checks for RSerPool (ASAP/ENRP) via Wireshark's tshark.

Stdlib only.  Typical use::

    from pcapcheck import Frame, write_pcap, tshark_fields, tshark_malformed

    write_pcap(path, [Frame(asap_bytes), Frame(asap_bytes, transport="tcp")])
    pkts = tshark_fields(path, ["asap.message_type", "asap.pool_handle_pool_handle"])
    assert pkts[0]["asap.message_type"] == ["5"]
    assert tshark_malformed(path) == []

Packets are Ethernet / IPv4 (127.0.0.1 -> 127.0.0.1) / SCTP or TCP, written
as a classic little-endian pcap file (linktype 1), one frame per second.

Notes on tshark (checked with TShark 4.0.17, Debian 12):
  * ASAP is registered for SCTP PPID 11, SCTP/UDP/TCP port 3863; ENRP for
    SCTP PPID 12 and SCTP/UDP port 9901.  Nothing needs decode-as for these.
  * Byte fields such as asap.pool_handle_pool_handle are printed as lowercase
    hex without separators (b"Xen" -> "58656e").
  * Integer fields are printed in decimal in JSON output ("5").
  * "enrp" is not a valid decode-as target for tcp.port in 4.0.17, so ENRP
    can only be checked over SCTP (PPID 12 / port 9901) or UDP 9901.
  * ASAP over TCP has no PDU framing/reassembly: one TCP segment is dissected
    as exactly one ASAP message.  Put exactly one message in each TCP Frame.
    A message split over two segments is reported malformed; a second message
    in the same segment is silently shown as an "Unknown Parameter".
  * The ASAP message length field is not validated: a header length larger
    (or smaller) than the data is NOT flagged.  Compare asap.message_length
    yourself.  Truncation inside a parameter IS flagged as malformed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "TSHARK",
    "Frame",
    "crc32c",
    "write_pcap",
    "tshark_available",
    "tshark_fields",
    "tshark_malformed",
    "TsharkError",
]

TSHARK: str | None = shutil.which("tshark")

# Preferences forced on every tshark run, so results do not depend on the
# invoking user's ~/.config/wireshark (an empty config dir is used as well).
TSHARK_PREFS: tuple[str, ...] = (
    "sctp.checksum:CRC 32c",  # verify the CRC32c we compute
    "ip.check_checksum:TRUE",
    "tcp.check_checksum:TRUE",
)

MALFORMED_FILTER = "_ws.malformed || _ws.expert.severity == error"

_BASE_TS = 1_700_000_000  # fixed timestamp base -> deterministic files
_MAC = b"\x00\x00\x00\x00\x00\x00"
_LOOPBACK = bytes([127, 0, 0, 1])
_SCTP_VTAG = 0x52535031  # arbitrary, non-zero ("RSP1")
_TCP_ISN = 1000
_TCP_ACK = 1


class TsharkError(RuntimeError):
    pass


@dataclass
class Frame:
    payload: bytes
    transport: str = "sctp"  # "sctp" or "tcp"
    ppid: int = 11  # SCTP payload protocol identifier (11 = ASAP, 12 = ENRP)
    dst_port: int = 3863
    src_port: int = 40000


# --------------------------------------------------------------------------
# checksums


def _make_crc32c_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli); crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


# --------------------------------------------------------------------------
# packet building


def _ipv4(proto: int, ident: int, l4: bytes) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        ident & 0xFFFF,
        0x4000,
        64,
        proto,
        0,
        _LOOPBACK,
        _LOOPBACK,
    )
    csum = _inet_checksum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + l4


def _ethernet(l3: bytes) -> bytes:
    return _MAC + _MAC + struct.pack("!H", 0x0800) + l3


def _sctp(src: int, dst: int, tsn: int, ssn: int, ppid: int, payload: bytes) -> bytes:
    chunk = (
        struct.pack("!BBHIHHI", 0, 0x03, 16 + len(payload), tsn, 0, ssn & 0xFFFF, ppid)
        + payload
    )
    pkt = struct.pack("!HHII", src, dst, _SCTP_VTAG, 0) + _pad4(chunk)
    # RFC 4960 appendix B: the CRC32c is transmitted least significant byte
    # first, i.e. little-endian over the wire.
    return pkt[:8] + struct.pack("<I", crc32c(pkt)) + pkt[12:]


def _tcp(src: int, dst: int, seq: int, payload: bytes) -> bytes:
    hdr = struct.pack(
        "!HHIIBBHHH",
        src,
        dst,
        seq & 0xFFFFFFFF,
        _TCP_ACK,
        5 << 4,
        0x18,
        65535,
        0,
        0,
    )
    seg = hdr + payload
    pseudo = _LOOPBACK + _LOOPBACK + struct.pack("!BBH", 0, 6, len(seg))
    csum = _inet_checksum(pseudo + seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def write_pcap(path, frames: Iterable[Frame]) -> None:
    """Write ``frames`` as a classic pcap (linktype Ethernet) to ``path``.

    SCTP: one DATA chunk per packet (B|E flags, stream 0), TSN starts at 1 and
    SSN at 0 and both increment per frame within each (src_port, dst_port)
    association.  TCP: PSH|ACK segments; sequence numbers continue per
    (src_port, dst_port) flow so consecutive frames form one byte stream.
    """
    sctp_state: dict[tuple[int, int], list[int]] = {}
    tcp_seq: dict[tuple[int, int], int] = {}
    records = []
    for i, f in enumerate(frames):
        key = (f.src_port, f.dst_port)
        if f.transport == "sctp":
            st = sctp_state.setdefault(key, [1, 0])
            l4 = _sctp(f.src_port, f.dst_port, st[0], st[1], f.ppid, f.payload)
            st[0] += 1
            st[1] += 1
            proto = 132
        elif f.transport == "tcp":
            seq = tcp_seq.get(key, _TCP_ISN)
            l4 = _tcp(f.src_port, f.dst_port, seq, f.payload)
            tcp_seq[key] = seq + len(f.payload)
            proto = 6
        else:
            raise ValueError(f"unknown transport {f.transport!r}")
        pkt = _ethernet(_ipv4(proto, i + 1, l4))
        records.append(struct.pack("<IIII", _BASE_TS + i, 0, len(pkt), len(pkt)) + pkt)
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.writelines(records)


# --------------------------------------------------------------------------
# tshark


def tshark_available() -> bool:
    return TSHARK is not None


def _run_tshark(args: Sequence[str], prefs: Sequence[str] = ()) -> str:
    if TSHARK is None:
        raise TsharkError("tshark not found in PATH")
    with tempfile.TemporaryDirectory(prefix="pcapcheck-ws-") as cfg:
        # Empty personal config dir: ignore any ~/.config/wireshark prefs,
        # disabled protocols or decode-as entries of the invoking user.
        env = dict(os.environ, HOME=cfg, WIRESHARK_CONFIG_DIR=cfg, LC_ALL="C.UTF-8")
        cmd = [TSHARK, "-n"]
        for p in (*TSHARK_PREFS, *prefs):  # a later -o wins
            cmd += ["-o", p]
        cmd += list(args)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    # tshark warns on stderr when run as root; only the exit code matters.
    if proc.returncode != 0:
        raise TsharkError(
            f"tshark failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[:2000]}"
        )
    return proc.stdout


def _decode_as_args(decode_as: Iterable[str]) -> list[str]:
    args = []
    for d in decode_as:
        args += ["-d", d]
    return args


def tshark_fields(
    path,
    fields: Sequence[str],
    decode_as: Sequence[str] = (),
    display_filter: str | None = None,
    prefs: Sequence[str] = (),
) -> list[dict[str, list[str]]]:
    """Return one dict per (displayed) packet: field -> list of string values.

    Every requested field is present (empty list when absent).  Each dict also
    carries ``frame.number``, ``_ws.expert.severity`` and ``_ws.expert.message``
    (expert infos of that packet; "Malformed Packet" shows up there too).
    ``decode_as`` entries are passed as ``-d`` (e.g. "udp.port==4000,asap");
    ``prefs`` (``-o`` settings) override ``TSHARK_PREFS``.
    """
    extra = ["frame.number", "_ws.expert.severity", "_ws.expert.message"]
    all_fields = list(dict.fromkeys([*fields, *extra]))
    args = ["-r", str(path), "-T", "json"]
    args += _decode_as_args(decode_as)
    if display_filter:
        args += ["-Y", display_filter]
    for f in all_fields:
        args += ["-e", f]
    out = _run_tshark(args, prefs).strip()
    packets = json.loads(out) if out else []
    result = []
    for pkt in packets:
        layers = pkt.get("_source", {}).get("layers", {})
        result.append({f: [str(v) for v in layers.get(f, [])] for f in all_fields})
    return result


def tshark_malformed(
    path, decode_as: Sequence[str] = (), prefs: Sequence[str] = ()
) -> list[int]:
    """Frame numbers (1-based) that are malformed or carry an expert error."""
    args = [
        "-r",
        str(path),
        "-Y",
        MALFORMED_FILTER,
        "-T",
        "fields",
        "-e",
        "frame.number",
    ]
    args += _decode_as_args(decode_as)
    return [int(line) for line in _run_tshark(args, prefs).split() if line.strip()]
