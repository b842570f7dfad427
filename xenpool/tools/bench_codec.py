"""``xenpool bench ...``: speed measured against a baseline taken in the same run.

Benchmarks print numbers and ratios; they never fail on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import struct

from ..protocol import messages, params
from . import samples
from .bench import rate

CODEC_TARGET_DECODES_PER_S = 100_000


def count_unpacks(data: bytes) -> list[tuple[struct.Struct, int]]:
    """The struct reads a minimal decoder of ``data`` needs: the message header, then
    every TLV header and its fixed fields, descending into nested parameters."""
    hdr = struct.Struct("!HH")
    word = struct.Struct("!I")
    reads = [(struct.Struct("!BBH"), 0)]
    nested = {params.ParamType.POOL_ELEMENT: 12, params.ParamType.SERVER_INFORMATION: 4}
    transports = set(params.TRANSPORT_TYPES)

    def walk(start: int, end: int) -> None:
        pos = start
        while pos + 4 <= end:
            ptype, plen = hdr.unpack_from(data, pos)
            reads.append((hdr, pos))
            if ptype in nested:
                reads.append((struct.Struct("!III"), pos + 4))
                walk(pos + 4 + nested[ptype], pos + plen)
            elif ptype in transports:
                reads.append((hdr, pos + 4))
                walk(pos + 8, pos + plen)
            elif ptype == params.ParamType.POOL_MEMBER_SELECTION_POLICY:
                reads.extend((word, off) for off in range(pos + 4, pos + plen, 4))
            pos += plen + (-plen & 3)

    walk(4, len(data))
    return reads


def codec(seconds: float) -> dict[str, float]:
    msg = samples.handle_resolution_response(3)
    data = messages.encode(msg)
    assert messages.decode(data) == msg
    reads = count_unpacks(data)

    def ceiling() -> None:
        for s, offset in reads:
            s.unpack_from(data, offset)

    decode_per_s = rate(lambda: messages.decode(data), seconds)
    encode_per_s = rate(lambda: messages.encode(msg), seconds)
    ceiling_per_s = rate(ceiling, seconds)
    return {
        "message_bytes": len(data),
        "unpack_calls_per_message": len(reads),
        "decode_per_s": round(decode_per_s),
        "encode_per_s": round(encode_per_s),
        "ceiling_per_s": round(ceiling_per_s),
        "decode_ratio": round(decode_per_s / ceiling_per_s, 3),
        "target_decode_per_s": CODEC_TARGET_DECODES_PER_S,
    }


def run(args: argparse.Namespace) -> int:
    result = codec(args.seconds)
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"codec: HANDLE_RESOLUTION_RESPONSE with 3 PEs ({result['message_bytes']} bytes), one core"
    )
    table.add_column("measure")
    table.add_column("per second", justify="right")
    table.add_column("vs ceiling", justify="right")
    ceiling = result["ceiling_per_s"]
    for key in ("decode_per_s", "encode_per_s", "ceiling_per_s"):
        table.add_row(key, f"{result[key]:,}", f"{result[key] / ceiling:.2f}")
    Console().print(table)
    verdict = (
        "meets" if result["decode_per_s"] >= CODEC_TARGET_DECODES_PER_S else "misses"
    )
    print(
        f"ceiling = {result['unpack_calls_per_message']} struct.unpack_from calls over the same bytes; "
        f"decoding {verdict} the target of {CODEC_TARGET_DECODES_PER_S:,}/s"
    )
    return 0
