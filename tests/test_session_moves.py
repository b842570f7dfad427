"""The PE-to-PE rebalancing messages (VmQuery/VmReport 0x40/0x41, MoveRequest/MoveAnswer
0x42/0x43) and StopResult's optional move target: bounds and validation."""

from __future__ import annotations

import struct

import pytest

from xenpool.protocol import session as S
from xenpool.protocol.errors import ProtocolError

REPORT = S.VmReport(
    1,
    2,
    1 << 20,
    5000,
    100,
    (S.VmEntry("vm1", 65536, 500, 3, True), S.VmEntry("vm2", 65536, 80, 0, False)),
)


def _retyped(data: bytes, **fields) -> bytes:
    """``data`` with header fields replaced (flags=..., mtype=...)."""
    mtype, flags, length, version, reserved = struct.unpack_from("!BBHHH", data)
    header = struct.pack(
        "!BBHHH",
        fields.get("mtype", mtype),
        fields.get("flags", flags),
        length,
        version,
        reserved,
    )
    return header + data[8:]


def test_a_stop_result_without_target_is_byte_for_byte_the_old_one():
    data = S.encode(S.StopResult("web1", S.ResultCode.MOVED, "moved"))
    assert (
        data[1] == 0 and len(data) == 8 + 2 + 4 + 4 + 2 + 5
    )  # no flag, no extra field
    with_target = S.encode(
        S.StopResult("web1", S.ResultCode.MOVED, "moved", target_pe=7)
    )
    assert (
        with_target[1] == S.FLAG_TARGET and with_target[8:-4] == data[8:]
    )  # the target is appended
    assert S.decode(with_target).target_pe == 7


@pytest.mark.parametrize(
    "data, field",
    [
        # a target flag on a normal end: only a move names a target
        (
            S.encode(S.StopResult("web1", S.ResultCode.MOVED, "", 7)).replace(
                b"\x00\x00\x00\x33", b"\x00\x00\x00\x32"
            ),
            "target_pe",
        ),
        # the flag without the field
        (
            _retyped(
                S.encode(S.StopResult("web1", S.ResultCode.MOVED, "")),
                flags=S.FLAG_TARGET,
            ),
            "target_pe",
        ),
        (
            S.encode(S.MoveRequest(1, "vm1", 2)).replace(
                b"\x00\x00\x00\x02", b"\x00\x00\x00\x00", 1
            ),
            "target_pe",
        ),
        (S.encode(S.MoveRequest(1, "vm1", 2, b"m" * 8))[:-1], "mac"),
        (S.encode(S.MoveRequest(1, "bad id!", 2)), "server_id"),
        (
            S.encode(S.VmReport(1, 2, 100, 50, 0)).replace(b"\x00\x02", b"\x00\x00", 1),
            "cpus",
        ),
        (S.encode(S.VmReport(1, 2, 100, 500, 0)), "free_ram_kb"),
        (
            S.encode(
                S.VmReport(1, 2, 100, 50, 0, (S.VmEntry("vm1", 1, 1, 1, True),) * 2)
            ),
            "server_id",
        ),
        (
            S.encode(S.VmReport(1, 2, 100, 50, 0, (S.VmEntry("vm1", 1, 1, 1, True),)))[
                :-1
            ]
            + b"\x02",
            "movable",
        ),
        (S.encode(REPORT)[:-3], "vm"),
        (S.encode(S.VmQuery(1)) + b"\x00", "length"),  # bytes after the last field
    ],
)
def test_malformed_rebalancing_messages_are_refused_naming_the_field(data, field):
    with pytest.raises(ProtocolError) as raised:
        S.decode(_fix_length(data))
    assert raised.value.field == field


def _fix_length(data: bytes) -> bytes:
    return data[:2] + struct.pack("!H", len(data)) + data[4:]


def test_a_report_says_how_many_vms_and_no_more_than_the_limit():
    count_at = 8 + 4 + 2 + 8 + 8 + 4
    data = bytearray(S.encode(S.VmReport(1, 2, 100, 50, 0)))
    data[count_at : count_at + 2] = struct.pack("!H", S.MAX_REPORT_VMS + 1)
    with pytest.raises(ProtocolError, match="at most 64"):
        S.decode(bytes(data))
    with pytest.raises(ValueError, match="at most 64"):
        S.encode(
            S.VmReport(
                1,
                2,
                100,
                50,
                0,
                tuple(S.VmEntry(f"vm{i}", 1, 1, 1, True) for i in range(65)),
            )
        )
    full = S.VmReport(
        1,
        2,
        100,
        50,
        0,
        tuple(
            S.VmEntry(f"vm-with-a-long-name-{i:08d}", 1, 1, 1, True) for i in range(64)
        ),
    )
    with pytest.raises(
        ValueError, match="at most 2048"
    ):  # every message fits a session frame
        S.encode(full)
    with pytest.raises(ValueError, match="mac longer"):
        S.encode(S.MoveRequest(1, "vm1", 2, b"m" * (S.MAX_MAC + 1)))


def test_the_move_mac_binds_leader_vm_and_target():
    mac = S.move_request_mac(b"secret", 1, "vm1", 2)
    assert len(mac) == 32 and mac != S.move_request_mac(b"secret", 1, "vm1", 3)
    assert mac != S.move_request_mac(
        b"secret", 1, "vm2", 2
    ) and mac != S.move_request_mac(b"other", 1, "vm1", 2)


MIGRATION = S.MigrationTarget("host2", "qemu+tcp://host2/system")


@pytest.mark.parametrize(
    "plain, with_migration",
    [
        (
            REPORT,
            S.VmReport(
                *[
                    getattr(REPORT, f)
                    for f in (
                        "pe_identifier",
                        "cpus",
                        "ram_kb",
                        "free_ram_kb",
                        "host_millicores",
                        "vms",
                    )
                ],
                MIGRATION,
            ),
        ),
        (
            S.MoveRequest(1, "vm1", 2, b"m" * 32),
            S.MoveRequest(1, "vm1", 2, b"m" * 32, MIGRATION),
        ),
    ],
)
def test_a_migration_target_is_an_optional_trailer(plain, with_migration):
    data, extended = S.encode(plain), S.encode(with_migration)
    assert (
        data[1] == 0
        and extended[1] == S.FLAG_MIGRATION
        and extended[8:].startswith(data[8:])
    )
    assert S.decode(extended) == with_migration and S.decode(data) == plain


@pytest.mark.parametrize(
    "migration, field",
    [
        (S.MigrationTarget("", "qemu+tcp://host2/system"), "migration_host"),
        (S.MigrationTarget("host2", "not a uri"), "migration_uri"),
        (S.MigrationTarget("host2", "qemu+tcp://host2/system\n"), "migration_uri"),
        (S.MigrationTarget("host2", "qemu+tcp://" + "h" * 250), "migration_uri"),
    ],
)
def test_a_bad_migration_target_is_refused_both_ways(migration, field):
    with pytest.raises(ValueError):
        S.encode(S.MoveRequest(1, "vm1", 2, b"", migration))
    raw = struct.pack("!H", len(migration.host)) + migration.host.encode()
    raw += struct.pack("!H", len(migration.uri.encode())) + migration.uri.encode()
    flagged = _retyped(S.encode(S.MoveRequest(1, "vm1", 2)), flags=S.FLAG_MIGRATION)
    with pytest.raises(ProtocolError) as raised:
        S.decode(_fix_length(flagged + raw))
    assert raised.value.field == field
    with pytest.raises(ProtocolError) as raised:  # the flag without the trailer
        S.decode(_fix_length(flagged))
    assert raised.value.field == "migration_host"


def test_the_move_mac_covers_the_migration_target():
    plain = S.move_request_mac(b"s", 1, "vm1", 2)
    assert plain == S.move_request_mac(
        b"s", 1, "vm1", 2, None
    )  # unchanged for moves without
    assert S.move_request_mac(b"s", 1, "vm1", 2, MIGRATION) not in (
        plain,
        S.move_request_mac(
            b"s", 1, "vm1", 2, S.MigrationTarget("host2", "qemu+tcp://evil/system")
        ),
    )
