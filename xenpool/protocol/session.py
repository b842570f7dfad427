"""The PE <-> PU application messages (the prototype's, made portable), sans-IO.

Header (8 bytes, network byte order): type (8 bits), flags (8 bits), length (16 bits,
whole message), version (16 bits), reserved (16 bits). Strings are a 16-bit length and
UTF-8 bytes; integers are fixed-width. The fields are those of the prototype's packed C
structs (README, "The PE<->PU session"), plus vCPUs, a reason text and a stop.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from .errors import Cause, ProtocolError

VERSION = 1
# Our SCTP payload protocol identifier for application messages (and the shim's PPID
# over TCP). Not IANA-assigned: "XPL1".
XENPOOL_PPID = 0x58504C31

MAX_SERVER_ID = 32
MAX_DISK = 256
MAX_IP_LIST = 256
MAX_REASON = 256
MAX_HOST = 128
MAX_SESSION_MESSAGE = 2048
MAX_REPORT_VMS = 64  # VMs listed in one VmReport; the rest count in its host_millicores
MAX_MAC = 64
# StopResult header flag: a target PE identifier follows the reason (planned moves).
# Without it the message is byte for byte what it was before targets existed.
FLAG_TARGET = 0x01
# VmReport and MoveRequest header flag: a MigrationTarget (host, URI) follows the last
# field. Without it both are byte for byte what they were before live migration.
FLAG_MIGRATION = 0x02
MAX_MIGRATION_URI = 256
# A libvirt URI (qemu+tcp://host/system, xen+ssh://...): scheme, "://", printable ASCII.
MIGRATION_URI_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*://[!-~]*")
SERVER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class SessionType(enum.IntEnum):
    CREATE_SERVER = 0x01
    CREATE_FAILED = 0x02
    CREATE_SUCCESS = 0x03
    CHECK_RUNNING = 0x10
    CHECK_RUNNING_RESPONSE = 0x11
    STOP_SERVER = 0x20
    STOP_RESULT = 0x21
    CLAIM_QUERY = 0x30
    CLAIM_ANSWER = 0x31
    VM_QUERY = 0x40
    VM_REPORT = 0x41
    MOVE_REQUEST = 0x42
    MOVE_ANSWER = 0x43
    LEASE_REQUEST = 0x50
    LEASE_ANSWER = 0x51
    PU_PROOF = 0x60


class ResultCode(enum.IntEnum):
    """Answer codes: the prototype's (-1, 0, 11, 12, 13, 50) and xenpool's (14-17, 51)."""

    UNSPECIFIED = -1
    STARTED = 0
    NO_RAM = 11
    DISK_UNREACHABLE = 12
    ALREADY_RUNNING = 13
    COOKIE_REJECTED = 14
    FENCE_FAILED = 15
    INVALID_REQUEST = 16
    # The PU did not prove who it is (no TLS client certificate, no valid PuProof), or
    # it may not manage this VM (the PE's --pu-access file): nothing was done.
    NOT_AUTHORIZED = 17
    NORMAL_END = 50
    MOVED = (
        51  # stopped here to be started on another PE (rebalancing): a planned failover
    )


@dataclass(frozen=True, slots=True)
class SessionMessage:
    TYPE: ClassVar[int]


@dataclass(frozen=True, slots=True)
class CreateServer(SessionMessage):
    """Start (or, after a failover, keep) VM ``server_id``."""

    TYPE = SessionType.CREATE_SERVER
    server_id: str
    disk: str
    ips: tuple[str, ...]
    ram_mb: int
    vcpus: int = 1


@dataclass(frozen=True, slots=True)
class CreateResult(SessionMessage):
    """create_success (code 0) or create_failed (any other code) with a reason."""

    TYPE = SessionType.CREATE_SUCCESS
    server_id: str
    code: int
    available_ram_kb: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == ResultCode.STARTED


@dataclass(frozen=True, slots=True)
class CheckRunning(SessionMessage):
    """The PU's heartbeat; ``interval_s`` is how often it will ask."""

    TYPE = SessionType.CHECK_RUNNING
    server_id: str
    interval_s: int


@dataclass(frozen=True, slots=True)
class CheckRunningResponse(SessionMessage):
    """The VM's libvirt domain state (VIR_DOMAIN_RUNNING = 1, ...)."""

    TYPE = SessionType.CHECK_RUNNING_RESPONSE
    server_id: str
    state: int


@dataclass(frozen=True, slots=True)
class StopServer(SessionMessage):
    TYPE = SessionType.STOP_SERVER
    server_id: str


@dataclass(frozen=True, slots=True)
class StopResult(SessionMessage):
    """``target_pe``: with code MOVED, the PE the VM is planned to go to (0: none, the
    pool policy chooses)."""

    TYPE = SessionType.STOP_RESULT
    server_id: str
    code: int
    reason: str = ""
    target_pe: int = 0


@dataclass(frozen=True, slots=True)
class ClaimQuery(SessionMessage):
    """PE to PE, before a start: does anyone run (or start) this ServerID, disk or IP?"""

    TYPE = SessionType.CLAIM_QUERY
    pe_identifier: int  # the asking PE
    server_id: str
    disk: str
    ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClaimAnswer(SessionMessage):
    """``conflict`` names what the answering PE holds ('' for nothing); ``pending``: it is
    only starting it, so the lower PE identifier wins."""

    TYPE = SessionType.CLAIM_ANSWER
    pe_identifier: int  # the answering PE
    host: str
    conflict: str
    pending: bool = False


@dataclass(frozen=True, slots=True)
class VmQuery(SessionMessage):
    """PE to PE (the rebalancing leader): which VMs do you run, at what CPU and RAM?"""

    TYPE = SessionType.VM_QUERY
    pe_identifier: int  # the asking PE


@dataclass(frozen=True, slots=True)
class VmEntry:
    """One VM in a VmReport. ``cpu_millicores``: its measured CPU demand in thousandths
    of a core; ``samples``: measurements behind it (0xFFFF: a hypervisor that cannot
    measure, the estimate is final); ``movable``: a PU holds it, so it can be moved."""

    server_id: str
    ram_kb: int
    cpu_millicores: int
    samples: int
    movable: bool


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where a live migration to a PE goes: the libvirt URI its hypervisor takes
    incoming migrations at, and the host (fencing identity) its cookies name."""

    host: str
    uri: str


@dataclass(frozen=True, slots=True)
class VmReport(SessionMessage):
    """The answer to a VmQuery. ``host_millicores``: CPU used beside the listed VMs
    (the host's own, VMs beyond MAX_REPORT_VMS). ``migration``: where VMs can be
    live-migrated to this PE (None: only stop-and-restart moves come here)."""

    TYPE = SessionType.VM_REPORT
    pe_identifier: int  # the answering PE
    cpus: int
    ram_kb: int
    free_ram_kb: int
    host_millicores: int
    vms: tuple[VmEntry, ...] = ()
    migration: MigrationTarget | None = None


@dataclass(frozen=True, slots=True)
class MoveRequest(SessionMessage):
    """The leader asks a PE to move one of its VMs to PE ``target_pe`` (a planned
    failover). ``mac``: HMAC-SHA256 over the fields with the pool secret (empty without).
    ``migration``: the target's, when it takes live migrations. ``issued_s``: when the
    leader sent it (seconds, its clock), so an old request cannot be replayed."""

    TYPE = SessionType.MOVE_REQUEST
    pe_identifier: int  # the asking PE (the leader)
    server_id: str
    target_pe: int
    mac: bytes = b""
    migration: MigrationTarget | None = None
    issued_s: int = 0


@dataclass(frozen=True, slots=True)
class MoveAnswer(SessionMessage):
    """``code`` MOVED: the VM is stopped (or live-migrated) and its PU sent to the
    target; any other: why not."""

    TYPE = SessionType.MOVE_ANSWER
    pe_identifier: int  # the answering PE
    server_id: str
    code: int
    reason: str = ""

    @property
    def moved(self) -> bool:
        return self.code == ResultCode.MOVED


class LeaseAction(enum.IntEnum):
    ACQUIRE = 1  # take the keys for a start (also after a fence)
    RENEW = 2  # keep holding them: the VM may run here
    RELEASE = 3  # the VM stopped here: forget the holder


@dataclass(frozen=True, slots=True)
class LeaseRequest(SessionMessage):
    """PE to a voter (a registrar): hold a VM's keys (its ServerID, disk and IPs) for
    ``duration_ms``, or release them. A voter grants at most one host per key while its
    lease runs. ``cleared``: a host this PE has fenced (confirmed off), or that answered it
    does not run the VM: its live lease may be taken over. ``issued_ms`` and ``nonce`` make every request unique; ``mac``:
    HMAC-SHA256 over the fields with the pool secret (empty without one)."""

    TYPE = SessionType.LEASE_REQUEST
    pool_handle: bytes
    pe_identifier: int
    host: str
    action: int
    duration_ms: int
    server_id: str
    disk: str = ""
    ips: tuple[str, ...] = ()
    cleared: str = ""
    issued_ms: int = 0
    nonce: int = 0
    mac: bytes = b""


@dataclass(frozen=True, slots=True)
class Holder:
    """A host that held a VM's keys at a voter: the PE's identifier and its host."""

    pe_identifier: int
    host: str


@dataclass(frozen=True, slots=True)
class LeaseAnswer(SessionMessage):
    """A voter's answer. Granted: ``previous`` lists the hosts whose lease on these keys
    ended without a release (the VM may still run there: fence them, or prove they do
    not run it, before a start). Refused: ``holder`` holds a live lease for
    ``remaining_ms`` more (no holder: refused for ``reason``)."""

    TYPE = SessionType.LEASE_ANSWER
    voter: int
    server_id: str
    granted: bool
    remaining_ms: int = 0
    holder: Holder | None = None
    previous: tuple[Holder, ...] = ()
    reason: str = ""


MAX_LEASE_HOLDERS = 16
MAX_PU_NAME = 64


@dataclass(frozen=True, slots=True)
class PuProof(SessionMessage):
    """PU to PE, just before a create, cookie echo or stop: who the PU is. ``mac``:
    HMAC-SHA256 with that PU's secret (which the PEs know) over its name, ``issued_ms``
    (wall clock), ``nonce`` and the encoded request that follows, so a proof is good for
    that one request, once, for a minute (``pu_proof_mac``)."""

    TYPE = SessionType.PU_PROOF
    pu_name: str
    issued_ms: int
    nonce: int
    mac: bytes


def pu_proof_mac(
    secret: bytes, pu_name: str, issued_ms: int, nonce: int, request: bytes
) -> bytes:
    """What proves a request comes from PU ``pu_name``: ``request`` is the encoded request
    (``encode()`` of a session message, ``messages.encode()`` of a COOKIE_ECHO)."""
    import hashlib
    import hmac

    data = (
        b"xenpool pu\0"
        + pu_name.encode()
        + b"\0"
        + struct.pack("!QI", issued_ms, nonce)
        + request
    )
    return hmac.new(secret, data, hashlib.sha256).digest()


def lease_request_mac(secret: bytes, request: LeaseRequest) -> bytes:
    """What proves a LeaseRequest comes from a PE of the pool: every field is covered."""
    import hashlib
    import hmac

    unsigned = dataclasses.replace(request, mac=b"")
    return hmac.new(
        secret, b"xenpool lease\0" + encode(unsigned), hashlib.sha256
    ).digest()


def move_request_mac(
    secret: bytes,
    pe_identifier: int,
    server_id: str,
    target_pe: int,
    migration: MigrationTarget | None = None,
    issued_s: int = 0,
) -> bytes:
    """What proves a MoveRequest comes from a PE of the pool (which knows its secret).
    The migration target is covered too: else anyone could send a VM to a host of theirs;
    and the issue time: else a recorded request could be sent again later."""
    import hashlib
    import hmac

    data = (
        b"xenpool move\0"
        + struct.pack("!III", pe_identifier, target_pe, issued_s)
        + server_id.encode()
    )
    if migration is not None:
        data += b"\0" + migration.host.encode() + b"\0" + migration.uri.encode()
    return hmac.new(secret, data, hashlib.sha256).digest()


_HEADER = struct.Struct("!BBHHH")
_U16 = struct.Struct("!H")


class _Writer:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def text(self, value: str, limit: int, field: str) -> None:
        raw = value.encode()
        if len(raw) > limit:
            raise ValueError(f"{field} longer than {limit} bytes")
        self.parts.append(_U16.pack(len(raw)) + raw)

    def pack(self, fmt: str, *values: int) -> None:
        self.parts.append(struct.pack(fmt, *values))

    def blob(self, value: bytes, limit: int, field: str) -> None:
        if len(value) > limit:
            raise ValueError(f"{field} longer than {limit} bytes")
        self.parts.append(bytes([len(value)]) + value)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def text(self, limit: int, field: str) -> str:
        start = self.pos
        if len(self.data) - start < 2:
            raise ProtocolError("truncated length", field=field, offset=start)
        (n,) = _U16.unpack_from(self.data, start)
        if n > limit:
            raise ProtocolError(
                f"{n} bytes, at most {limit}", field=field, offset=start
            )
        end = start + 2 + n
        if end > len(self.data):
            raise ProtocolError(
                f"says {n} bytes, message ends first", field=field, offset=start
            )
        self.pos = end
        try:
            return self.data[start + 2 : end].decode()
        except UnicodeDecodeError:
            raise ProtocolError("not UTF-8", field=field, offset=start + 2) from None

    def blob(self, limit: int, field: str) -> bytes:
        start = self.pos
        if start >= len(self.data):
            raise ProtocolError("truncated length", field=field, offset=start)
        n = self.data[start]
        if n > limit:
            raise ProtocolError(
                f"{n} bytes, at most {limit}", field=field, offset=start
            )
        if start + 1 + n > len(self.data):
            raise ProtocolError(
                f"says {n} bytes, message ends first", field=field, offset=start
            )
        self.pos = start + 1 + n
        return bytes(self.data[start + 1 : self.pos])

    def unpack(self, fmt: str, field: str) -> tuple:
        size = struct.calcsize(fmt)
        if len(self.data) - self.pos < size:
            raise ProtocolError("truncated", field=field, offset=self.pos)
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values


def check_server_id(server_id: str, offset: int = 0) -> None:
    if (
        not server_id
        or len(server_id) > MAX_SERVER_ID
        or not SERVER_ID_PATTERN.fullmatch(server_id)
    ):
        raise ProtocolError(
            f"{server_id!r}: 1-{MAX_SERVER_ID} letters, digits, '.', '_' or '-'",
            field="server_id",
            offset=offset,
        )


def check_create(msg: CreateServer, offsets: dict[str, int] | None = None) -> None:
    """The semantic checks of a create request (sizes are checked by the codec).
    ``offsets`` gives each field's byte offset in the message, for the error."""
    at = (offsets or {}).get
    check_server_id(msg.server_id, at("server_id", 0))
    if msg.ram_mb <= 0:
        raise ProtocolError(
            "must be at least 1 MB", field="ram_mb", offset=at("ram_mb", 0)
        )
    if msg.vcpus <= 0:
        raise ProtocolError(
            "must be at least 1", field="vcpus", offset=at("ram_mb", 0) + 4
        )
    for ip in msg.ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ProtocolError(
                f"{ip!r} is not an IP address", field="ips", offset=at("ips", 0)
            ) from None


def _write_migration(w: _Writer, migration: MigrationTarget | None) -> int:
    """Append the optional migration target; returns the header flag it needs."""
    if migration is None:
        return 0
    if not migration.host or not MIGRATION_URI_PATTERN.fullmatch(migration.uri):
        raise ValueError(f"bad migration target {migration!r}")
    w.text(migration.host, MAX_HOST, "migration_host")
    w.text(migration.uri, MAX_MIGRATION_URI, "migration_uri")
    return FLAG_MIGRATION


def _read_migration(r: _Reader, flags: int) -> MigrationTarget | None:
    if not flags & FLAG_MIGRATION:
        return None
    offset = r.pos
    host = r.text(MAX_HOST, "migration_host")
    if not host:
        raise ProtocolError("empty", field="migration_host", offset=offset)
    offset = r.pos
    uri = r.text(MAX_MIGRATION_URI, "migration_uri")
    if not MIGRATION_URI_PATTERN.fullmatch(uri):
        raise ProtocolError(
            f"{uri!r} is not a libvirt URI", field="migration_uri", offset=offset
        )
    return MigrationTarget(host, uri)


def _server_id(r: _Reader, answer: bool = False) -> str:
    """A checked server ID; an answer to a request too broken to name one has ''."""
    offset = r.pos
    server_id = r.text(MAX_SERVER_ID, "server_id")
    if not (answer and server_id == ""):
        check_server_id(server_id, offset)
    return server_id


# -- the codec table: one encoder and one decoder per message ------------------------------
#
# An encoder writes a message's body and returns (message type, header flags); a decoder
# reads the body after the header, given the type and flags, and returns the message.


def _enc_create_server(w: _Writer, msg: CreateServer) -> tuple[int, int]:
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.text(msg.disk, MAX_DISK, "disk")
    w.text(" ".join(msg.ips), MAX_IP_LIST, "ips")
    w.pack("!IH2x", msg.ram_mb, msg.vcpus)
    return msg.TYPE, 0


def _enc_create_result(w: _Writer, msg: CreateResult) -> tuple[int, int]:
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.pack("!iQ", msg.code, msg.available_ram_kb)
    w.text(msg.reason, MAX_REASON, "reason")
    return (SessionType.CREATE_SUCCESS if msg.ok else SessionType.CREATE_FAILED), 0


def _enc_check_running(w: _Writer, msg: CheckRunning) -> tuple[int, int]:
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.pack("!I", msg.interval_s)
    return msg.TYPE, 0


def _enc_check_running_response(
    w: _Writer, msg: CheckRunningResponse
) -> tuple[int, int]:
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.pack("!i", msg.state)
    return msg.TYPE, 0


def _enc_stop_server(w: _Writer, msg: StopServer) -> tuple[int, int]:
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    return msg.TYPE, 0


def _enc_stop_result(w: _Writer, msg: StopResult) -> tuple[int, int]:
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.pack("!i", msg.code)
    w.text(msg.reason, MAX_REASON, "reason")
    if not msg.target_pe:
        return msg.TYPE, 0
    w.pack("!I", msg.target_pe)
    return msg.TYPE, FLAG_TARGET


def _enc_claim_query(w: _Writer, msg: ClaimQuery) -> tuple[int, int]:
    w.pack("!I", msg.pe_identifier)
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.text(msg.disk, MAX_DISK, "disk")
    w.text(" ".join(msg.ips), MAX_IP_LIST, "ips")
    return msg.TYPE, 0


def _enc_claim_answer(w: _Writer, msg: ClaimAnswer) -> tuple[int, int]:
    w.pack("!IB3x", msg.pe_identifier, msg.pending)
    w.text(msg.host, MAX_HOST, "host")
    w.text(msg.conflict, MAX_REASON, "conflict")
    return msg.TYPE, 0


def _enc_vm_query(w: _Writer, msg: VmQuery) -> tuple[int, int]:
    w.pack("!I", msg.pe_identifier)
    return msg.TYPE, 0


def _enc_vm_report(w: _Writer, msg: VmReport) -> tuple[int, int]:
    if len(msg.vms) > MAX_REPORT_VMS:
        raise ValueError(f"{len(msg.vms)} VMs in a report, at most {MAX_REPORT_VMS}")
    w.pack(
        "!IHQQIH",
        msg.pe_identifier,
        msg.cpus,
        msg.ram_kb,
        msg.free_ram_kb,
        msg.host_millicores,
        len(msg.vms),
    )
    for vm in msg.vms:
        w.text(vm.server_id, MAX_SERVER_ID, "server_id")
        w.pack("!QIHB", vm.ram_kb, vm.cpu_millicores, vm.samples, vm.movable)
    return msg.TYPE, _write_migration(w, msg.migration)


def _enc_move_request(w: _Writer, msg: MoveRequest) -> tuple[int, int]:
    w.pack("!III", msg.pe_identifier, msg.target_pe, msg.issued_s)
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.blob(msg.mac, MAX_MAC, "mac")
    return msg.TYPE, _write_migration(w, msg.migration)


def _enc_move_answer(w: _Writer, msg: MoveAnswer) -> tuple[int, int]:
    w.pack("!Ii", msg.pe_identifier, msg.code)
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.text(msg.reason, MAX_REASON, "reason")
    return msg.TYPE, 0


def _enc_lease_request(w: _Writer, msg: LeaseRequest) -> tuple[int, int]:
    w.pack(
        "!IBIQI",
        msg.pe_identifier,
        msg.action,
        msg.duration_ms,
        msg.issued_ms,
        msg.nonce,
    )
    w.blob(msg.pool_handle, MAX_MAC, "pool_handle")
    w.text(msg.host, MAX_HOST, "host")
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    w.text(msg.disk, MAX_DISK, "disk")
    w.text(" ".join(msg.ips), MAX_IP_LIST, "ips")
    w.text(msg.cleared, MAX_HOST, "cleared")
    w.blob(msg.mac, MAX_MAC, "mac")
    return msg.TYPE, 0


def _enc_lease_answer(w: _Writer, msg: LeaseAnswer) -> tuple[int, int]:
    if len(msg.previous) > MAX_LEASE_HOLDERS:
        raise ValueError(
            f"{len(msg.previous)} previous holders, at most {MAX_LEASE_HOLDERS}"
        )
    holders = ((msg.holder,) if msg.holder else ()) + msg.previous
    w.pack(
        "!IBIBB",
        msg.voter,
        msg.granted,
        msg.remaining_ms,
        msg.holder is not None,
        len(msg.previous),
    )
    w.text(msg.server_id, MAX_SERVER_ID, "server_id")
    for holder in holders:
        w.pack("!I", holder.pe_identifier)
        w.text(holder.host, MAX_HOST, "host")
    w.text(msg.reason, MAX_REASON, "reason")
    return msg.TYPE, 0


def _enc_pu_proof(w: _Writer, msg: PuProof) -> tuple[int, int]:
    w.pack("!QI", msg.issued_ms, msg.nonce)
    w.text(msg.pu_name, MAX_PU_NAME, "pu_name")
    w.blob(msg.mac, MAX_MAC, "mac")
    return msg.TYPE, 0


def _dec_pu_proof(r: _Reader, mtype: int, flags: int) -> PuProof:
    issued_ms, nonce = r.unpack("!QI", "issued_ms")
    offset = r.pos
    name = r.text(MAX_PU_NAME, "pu_name")
    if not name:
        raise ProtocolError("empty", field="pu_name", offset=offset)
    return PuProof(name, issued_ms, nonce, r.blob(MAX_MAC, "mac"))


def _dec_vm_report(r: _Reader, mtype: int, flags: int) -> VmReport:
    pe_id, cpus, ram_kb, free_kb, host_millicores, count = r.unpack(
        "!IHQQIH", "pe_identifier"
    )
    if cpus == 0:
        raise ProtocolError(
            "a host has at least one CPU", field="cpus", offset=_HEADER.size + 4
        )
    if free_kb > ram_kb:
        raise ProtocolError(
            f"{free_kb} KB free of {ram_kb} KB",
            field="free_ram_kb",
            offset=_HEADER.size + 14,
        )
    if count > MAX_REPORT_VMS:
        raise ProtocolError(
            f"{count} VMs, at most {MAX_REPORT_VMS}", field="vms", offset=r.pos - 2
        )
    vms, seen = [], set()
    for _ in range(count):
        offset = r.pos
        server_id = _server_id(r)
        if server_id in seen:
            raise ProtocolError(
                f"{server_id} listed twice", field="server_id", offset=offset
            )
        seen.add(server_id)
        vm_ram, millicores, samples, movable = r.unpack("!QIHB", "vm")
        if movable > 1:
            raise ProtocolError(
                f"{movable} is not a boolean", field="movable", offset=r.pos - 1
            )
        vms.append(VmEntry(server_id, vm_ram, millicores, samples, bool(movable)))
    return VmReport(
        pe_id,
        cpus,
        ram_kb,
        free_kb,
        host_millicores,
        tuple(vms),
        _read_migration(r, flags),
    )


def _boolean(value: int, field: str, offset: int) -> bool:
    if value > 1:
        raise ProtocolError(f"{value} is not a boolean", field=field, offset=offset)
    return bool(value)


def _dec_lease_request(r: _Reader, mtype: int, flags: int) -> LeaseRequest:
    pe_id, action, duration_ms, issued_ms, nonce = r.unpack("!IBIQI", "pe_identifier")
    if action not in LeaseAction.__members__.values():
        raise ProtocolError(
            f"action {action}, expected 1-3", field="action", offset=_HEADER.size + 4
        )
    pool_handle = r.blob(MAX_MAC, "pool_handle")
    offset = r.pos
    host = r.text(MAX_HOST, "host")
    if not host:
        raise ProtocolError("empty", field="host", offset=offset)
    server_id = _server_id(r)
    disk = r.text(MAX_DISK, "disk")
    offset = r.pos
    ips = tuple(r.text(MAX_IP_LIST, "ips").split())
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ProtocolError(
                f"{ip!r} is not an IP address", field="ips", offset=offset
            ) from None
    cleared = r.text(MAX_HOST, "cleared")
    return LeaseRequest(
        pool_handle,
        pe_id,
        host,
        action,
        duration_ms,
        server_id,
        disk,
        ips,
        cleared,
        issued_ms,
        nonce,
        r.blob(MAX_MAC, "mac"),
    )


def _dec_lease_answer(r: _Reader, mtype: int, flags: int) -> LeaseAnswer:
    voter, granted, remaining_ms, has_holder, count = r.unpack("!IBIBB", "voter")
    granted = _boolean(granted, "granted", _HEADER.size + 4)
    has_holder = _boolean(has_holder, "holder", _HEADER.size + 9)
    if count > MAX_LEASE_HOLDERS:
        raise ProtocolError(
            f"{count} previous holders, at most {MAX_LEASE_HOLDERS}",
            field="previous",
            offset=_HEADER.size + 10,
        )
    server_id = _server_id(r, answer=True)
    holders = []
    for _ in range(has_holder + count):
        (pe_id,) = r.unpack("!I", "holder")
        holders.append(Holder(pe_id, r.text(MAX_HOST, "holder_host")))
    holder = holders.pop(0) if has_holder else None
    return LeaseAnswer(
        voter,
        server_id,
        granted,
        remaining_ms,
        holder,
        tuple(holders),
        r.text(MAX_REASON, "reason"),
    )


def _dec_create_server(r: _Reader, mtype: int, flags: int) -> CreateServer:
    offsets = {}
    offsets["server_id"] = r.pos
    server_id = r.text(MAX_SERVER_ID, "server_id")
    disk = r.text(MAX_DISK, "disk")
    offsets["ips"] = r.pos
    ips = tuple(r.text(MAX_IP_LIST, "ips").split())
    offsets["ram_mb"] = r.pos
    ram_mb, vcpus = r.unpack("!IH2x", "ram_mb")
    msg = CreateServer(server_id, disk, ips, ram_mb, vcpus)
    check_create(msg, offsets)
    return msg


def _dec_create_result(r: _Reader, mtype: int, flags: int) -> CreateResult:
    server_id = _server_id(r, answer=True)
    code, ram_kb = r.unpack("!iQ", "code")
    if (code == ResultCode.STARTED) != (mtype == SessionType.CREATE_SUCCESS):
        raise ProtocolError(
            f"code {code} in message type {mtype}", field="code", offset=r.pos - 12
        )
    return CreateResult(server_id, code, ram_kb, r.text(MAX_REASON, "reason"))


def _dec_check_running(r: _Reader, mtype: int, flags: int) -> CheckRunning:
    return CheckRunning(_server_id(r), *r.unpack("!I", "interval_s"))


def _dec_check_running_response(
    r: _Reader, mtype: int, flags: int
) -> CheckRunningResponse:
    return CheckRunningResponse(_server_id(r), *r.unpack("!i", "state"))


def _dec_stop_server(r: _Reader, mtype: int, flags: int) -> StopServer:
    return StopServer(_server_id(r))


def _dec_stop_result(r: _Reader, mtype: int, flags: int) -> StopResult:
    server_id = _server_id(r, answer=True)
    (code,) = r.unpack("!i", "code")
    reason = r.text(MAX_REASON, "reason")
    target = r.unpack("!I", "target_pe")[0] if flags & FLAG_TARGET else 0
    if flags & FLAG_TARGET and (code != ResultCode.MOVED or target == 0):
        raise ProtocolError(
            f"target PE {target} with code {code}: only a move (51) names one",
            field="target_pe",
            offset=r.pos - 4,
        )
    return StopResult(server_id, code, reason, target)


def _dec_claim_query(r: _Reader, mtype: int, flags: int) -> ClaimQuery:
    (pe_id,) = r.unpack("!I", "pe_identifier")
    return ClaimQuery(
        pe_id,
        _server_id(r),
        r.text(MAX_DISK, "disk"),
        tuple(r.text(MAX_IP_LIST, "ips").split()),
    )


def _dec_claim_answer(r: _Reader, mtype: int, flags: int) -> ClaimAnswer:
    pe_id, pending = r.unpack("!IB3x", "pe_identifier")
    return ClaimAnswer(
        pe_id, r.text(MAX_HOST, "host"), r.text(MAX_REASON, "conflict"), bool(pending)
    )


def _dec_vm_query(r: _Reader, mtype: int, flags: int) -> VmQuery:
    return VmQuery(*r.unpack("!I", "pe_identifier"))


def _dec_move_request(r: _Reader, mtype: int, flags: int) -> MoveRequest:
    pe_id, target, issued = r.unpack("!III", "pe_identifier")
    if target == 0:
        raise ProtocolError("no target PE", field="target_pe", offset=_HEADER.size + 4)
    return MoveRequest(
        pe_id,
        _server_id(r),
        target,
        r.blob(MAX_MAC, "mac"),
        _read_migration(r, flags),
        issued,
    )


def _dec_move_answer(r: _Reader, mtype: int, flags: int) -> MoveAnswer:
    pe_id, code = r.unpack("!Ii", "pe_identifier")
    return MoveAnswer(
        pe_id, _server_id(r, answer=True), code, r.text(MAX_REASON, "reason")
    )


#: Message class -> its encoder; the wire type -> its decoder (both CREATE_SUCCESS and
#: CREATE_FAILED are a CreateResult).
_ENCODERS = {
    CreateServer: _enc_create_server,
    CreateResult: _enc_create_result,
    CheckRunning: _enc_check_running,
    CheckRunningResponse: _enc_check_running_response,
    StopServer: _enc_stop_server,
    StopResult: _enc_stop_result,
    ClaimQuery: _enc_claim_query,
    ClaimAnswer: _enc_claim_answer,
    VmQuery: _enc_vm_query,
    VmReport: _enc_vm_report,
    MoveRequest: _enc_move_request,
    MoveAnswer: _enc_move_answer,
    LeaseRequest: _enc_lease_request,
    LeaseAnswer: _enc_lease_answer,
    PuProof: _enc_pu_proof,
}
_DECODERS = {
    SessionType.CREATE_SERVER: _dec_create_server,
    SessionType.CREATE_SUCCESS: _dec_create_result,
    SessionType.CREATE_FAILED: _dec_create_result,
    SessionType.CHECK_RUNNING: _dec_check_running,
    SessionType.CHECK_RUNNING_RESPONSE: _dec_check_running_response,
    SessionType.STOP_SERVER: _dec_stop_server,
    SessionType.STOP_RESULT: _dec_stop_result,
    SessionType.CLAIM_QUERY: _dec_claim_query,
    SessionType.CLAIM_ANSWER: _dec_claim_answer,
    SessionType.VM_QUERY: _dec_vm_query,
    SessionType.VM_REPORT: _dec_vm_report,
    SessionType.MOVE_REQUEST: _dec_move_request,
    SessionType.MOVE_ANSWER: _dec_move_answer,
    SessionType.LEASE_REQUEST: _dec_lease_request,
    SessionType.LEASE_ANSWER: _dec_lease_answer,
    SessionType.PU_PROOF: _dec_pu_proof,
}


def _encoder(msg: object):
    for cls in type(msg).__mro__:  # a subclass of a message encodes as that message
        encoder = _ENCODERS.get(cls)
        if encoder is not None:
            return encoder
    raise TypeError(f"not a session message: {msg!r}")


def encode(msg: SessionMessage) -> bytes:
    w = _Writer()
    mtype, flags = _encoder(msg)(w, msg)
    body = b"".join(w.parts)
    if _HEADER.size + len(body) > MAX_SESSION_MESSAGE:
        raise ValueError(
            f"{type(msg).__name__} of {_HEADER.size + len(body)} bytes, at most {MAX_SESSION_MESSAGE}"
        )
    return _HEADER.pack(mtype, flags, _HEADER.size + len(body), VERSION, 0) + body


def decode(data: bytes) -> SessionMessage:
    """Decode exactly one application message; raises ProtocolError."""
    if len(data) < _HEADER.size:
        raise ProtocolError(
            f"{len(data)} bytes, a header needs {_HEADER.size}",
            field="length",
            offset=0,
        )
    mtype, flags, length, version, _reserved = _HEADER.unpack_from(data, 0)
    if length != len(data):
        raise ProtocolError(
            f"says {length} bytes, has {len(data)}", field="length", offset=2
        )
    if version != VERSION:
        raise ProtocolError(
            f"version {version}, this speaks {VERSION}", field="version", offset=4
        )
    decoder = _DECODERS.get(mtype)
    if decoder is None:
        raise ProtocolError(
            f"unknown message type 0x{mtype:02x}",
            field="type",
            offset=0,
            cause=Cause.UNRECOGNIZED_MESSAGE,
            data=bytes(data),
        )
    r = _Reader(data, _HEADER.size)
    msg = decoder(r, mtype, flags)
    if r.pos != len(data):
        raise ProtocolError(
            f"{len(data) - r.pos} bytes after the last field",
            field="length",
            offset=r.pos,
        )
    return msg
