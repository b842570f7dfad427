"""The built-in storage plugins: where a VM's disk comes from, one IStorage provider per disk spec scheme.

A create request names its disk with a *spec*; one ``IStorage`` provider per scheme turns it
into a libvirt ``<disk>`` element:

========  ==========================================  ===============================================
provider  spec                                        libvirt disk
========  ==========================================  ===============================================
``nbd``   ``nbd://HOST[:PORT]/EXPORT``                ``type='network'``, ``protocol='nbd'``
``iscsi`` ``iscsi://HOST[:PORT]/IQN/LUN``             ``type='network'``, ``protocol='iscsi'``
``aoe``   ``aoe:eSHELF.SLOT``                         ``type='block'``, ``/dev/etherd/eSHELF.SLOT``
``path``  ``/ABS/PATH`` or ``file:///ABS/PATH``       ``type='file'`` (``type='block'`` under /dev/)
========  ==========================================  ===============================================

HOST is a DNS name, an IPv4 address or an IPv6 address in brackets (``[::1]``). An NBD
export name is percent-decoded (``%2F`` is ``/``), as in the NBD URI specification. The empty
spec means "no disk": the PE's dispatch (``xenpool.pe.disks``) handles it without a plugin.

The PE's order (``xenpool.pe.disks``), for every start (a fresh create or a failover)::

    provider, disk = storage_for(plugins, spec)   # ValueError: bad spec / no plugin
    await provider.check(disk)                    # DiskUnreachable: do not start
    xml = provider.domain_xml(disk, "vda")        # ${disk_xml} of the domain template
    ...                                           # the VM runs, then stops
    await provider.release(disk)

``xenpool.pe.disks.disk_xml_function`` wraps the first three steps into the
``disk spec -> Deferred[XML]`` callable ``PoolElementCore`` takes.

Reachability. ``check`` is a probe, not a lock: it tells an operator early that a disk is
unreachable from this host, it does not keep two hosts from writing one disk (fencing does).

* NBD: a real fixed-newstyle handshake over TCP. ``NbdHandshake`` is the sans-IO state
  machine (bytes in, bytes out, no sockets, no clock); ``NbdCheckProtocol`` feeds it from a
  Twisted connection. The client asks ``NBD_OPT_INFO`` for the export, so a wrong export
  name fails with ``NoSuchExport`` while the connection stays in the option phase, then
  leaves politely with ``NBD_OPT_ABORT``. The whole probe (connect and handshake) has one
  deadline on the injected reactor's clock.
* iSCSI: the portal accepts a TCP connection, nothing more. A full iSCSI login (target
  name, CHAP, LUN inventory) is out of scope: a wrong IQN or LUN shows up only when the
  hypervisor attaches the disk.
* AoE: ``/dev/etherd/eSHELF.SLOT`` exists and is a block device (the ``aoe`` driver made
  it, so the shelf answered a discover). ``root`` moves ``/`` for tests.
* path: the file or block device exists and is readable.

Release. None of these attach anything on the host before the start (libvirt/QEMU open the
network disks themselves; AoE devices and files are just there), so ``release`` has nothing
to undo and fires None at once. A plugin that logs in to a target or maps a device would undo
that here.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import stat
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from xenpool.interfaces import Disk, DiskSpecError, IStorage
from xenpool.plugins import global_reactor

NBD_DEFAULT_PORT = 10809
ISCSI_DEFAULT_PORT = 3260
#: The NBD protocol's limit on export names (and on strings in general), in bytes.
NBD_MAX_NAME_BYTES = 4096
#: Default deadline of a reachability check (connect and handshake together), seconds.
DEFAULT_TIMEOUT_S = 5.0
#: AoE addresses: shelf 0xffff and slot 0xff are broadcast, not devices.
AOE_MAX_SHELF = 65534
AOE_MAX_SLOT = 254
#: LUNs libiscsi/QEMU address (SAM flat space).
ISCSI_MAX_LUN = 16383
ETHERD = "/dev/etherd"


class DiskUnreachable(Exception):
    """A disk that is not reachable from this host now; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoSuchExport(DiskUnreachable):
    """The NBD server answered, but does not serve the export."""


# -- spec parsing helpers ------------------------------------------------------------------

_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)",
    re.S,
)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
# Characters XML 1.0 cannot carry at all (escaping does not help), and other controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _bad(label: str, spec: str, problem: str, form: str) -> DiskSpecError:
    return DiskSpecError(f"bad {label} disk spec {spec!r}: {problem}; expected {form}")


def _host(text: str) -> str:
    """A host from a URL authority (brackets already removed for IPv6); raises ValueError."""
    if text == "":
        raise ValueError("host missing")
    if ":" in text:  # only an IPv6 address contains colons
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv6 address") from None
    if re.fullmatch(r"[0-9.]+", text):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv4 address") from None
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{text!r} is not a valid host name")
    return name.lower()


def _authority(authority: str, default_port: int) -> tuple[str, int]:
    """(host, port) from ``HOST[:PORT]`` / ``[V6]:PORT``; raises ValueError naming the problem."""
    if "@" in authority:
        raise ValueError("user names and passwords in the spec are not supported")
    if authority.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", authority)
        if m is None:
            raise ValueError(f"bad bracketed host {authority!r}")
        raw_host, raw_port = m.group(1), m.group(2)
        if ":" not in raw_host:
            raise ValueError(f"only IPv6 addresses go in brackets, got {raw_host!r}")
    elif authority.count(":") > 1:
        raise ValueError(f"an IPv6 address must be in brackets, got {authority!r}")
    elif ":" in authority:
        raw_host, raw_port = authority.split(":")
    else:
        raw_host, raw_port = authority, None
    host = _host(raw_host)
    if raw_port is None:
        return host, default_port
    if not _PORT.fullmatch(raw_port) or not 1 <= int(raw_port) <= 65535:
        raise ValueError(f"port must be 1-65535, got {raw_port!r}")
    return host, int(raw_port)


def _url(spec: str, scheme: str) -> tuple[str, str]:
    """(authority, path) of ``scheme://authority/path``; raises ValueError."""
    m = _URL.fullmatch(spec)
    if m is None or m.group("scheme").lower() != scheme:
        raise ValueError(f"not a {scheme}:// URL")
    if m.group("rest"):
        raise ValueError("query strings and fragments are not supported")
    return m.group("authority"), m.group("path")


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _no_controls(value: str, what: str) -> None:
    if _CONTROL.search(value):
        raise ValueError(f"{what} contains control characters")


# -- libvirt XML -----------------------------------------------------------------------------

_TARGET = re.compile(r"(xvd|vd|sd|hd)[a-z]{1,3}")
_BUS = {"xvd": "xen", "vd": "virtio", "sd": "scsi", "hd": "ide"}


def _disk_element(
    disk_type: str, target: str, driver_type: str = "raw"
) -> tuple[ET.Element, str]:
    m = _TARGET.fullmatch(target)
    if m is None:
        raise ValueError(
            f"bad disk target {target!r}: expected vdX (virtio), xvdX (Xen), sdX (SCSI) or hdX (IDE)"
        )
    element = ET.Element("disk", {"type": disk_type, "device": "disk"})
    ET.SubElement(element, "driver", {"name": "qemu", "type": driver_type})
    return element, _BUS[m.group(1)]


def _finish(element: ET.Element, target: str, bus: str) -> str:
    ET.SubElement(element, "target", {"dev": target, "bus": bus})
    return ET.tostring(element, encoding="unicode")


def _network_xml(protocol: str, name: str, host: str, port: int, target: str) -> str:
    element, bus = _disk_element("network", target)
    source = ET.SubElement(element, "source", {"protocol": protocol, "name": name})
    ET.SubElement(source, "host", {"name": host, "port": str(port)})
    return _finish(element, target, bus)


def _local_xml(path: str, target: str, driver_type: str = "raw") -> str:
    if path.startswith("/dev/"):
        element, bus = _disk_element("block", target, driver_type)
        ET.SubElement(element, "source", {"dev": path})
    else:
        element, bus = _disk_element("file", target, driver_type)
        ET.SubElement(element, "source", {"file": path})
    return _finish(element, target, bus)


def _expect(disk: Disk, scheme: str) -> None:
    if disk.scheme != scheme:
        raise ValueError(
            f"a {disk.scheme!r} disk ({disk.spec!r}) given to the {scheme!r} storage plugin"
        )


# -- NBD: the sans-IO handshake ----------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # the oldstyle greeting
REPLY_MAGIC = 0x0003E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_OPT_ABORT = 2
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_INFO_EXPORT = 0
#: Longest option reply accepted (an INFO reply is a few bytes; error texts are short).
NBD_MAX_REPLY = 65536

_NBD_ERRORS = {
    NBD_REP_ERR_UNSUP: "the server does not support NBD_OPT_INFO (an NBD server from before 2017?)",
    NBD_REP_ERR_POLICY: "the server refuses this client by policy",
    NBD_REP_ERR_INVALID: "the server rejected the request as invalid",
    NBD_REP_ERR_PLATFORM: "the server does not support this on its platform",
    NBD_REP_ERR_TLS_REQD: "the server requires TLS, which xenpool's NBD disks do not use",
    NBD_REP_ERR_SHUTDOWN: "the server is shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    NBD_REP_ERR_TOO_BIG: "the request is too big for the server",
}


class NbdError(Exception):
    """The handshake failed; ``code`` is the server's NBD_REP_ERR_* reply, else None."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class NbdHandshake:
    """Client side of the NBD fixed-newstyle handshake, asking about one export (sans-IO).

    Feed it what the server sent with ``receive_data`` (any chunking), send what
    ``data_to_send`` returns, and call ``connection_closed`` if the server hangs up. Once
    ``done``, either ``error`` is an ``NbdError`` or the export exists (``export_size`` and
    ``transmission_flags`` are set if the server sent NBD_INFO_EXPORT, as it must). Close the
    connection after sending the last bytes (NBD_OPT_ABORT, queued when the answer came).

    The exchange::

        S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags
        C: u32 client flags (FIXED_NEWSTYLE, plus NO_ZEROES if offered)
        C: "IHAVEOPT" u32 NBD_OPT_INFO u32 len; u32 name len, name, u16 0 (no info requests)
        S: replies (u64 magic, u32 option, u32 type, u32 len, data) until NBD_REP_ACK or an error
        C: "IHAVEOPT" u32 NBD_OPT_ABORT u32 0
    """

    def __init__(self, export: str) -> None:
        name = export.encode("utf-8")
        if len(name) > NBD_MAX_NAME_BYTES:
            raise ValueError(
                f"NBD export names are at most {NBD_MAX_NAME_BYTES} bytes, got {len(name)}"
            )
        self.export = export
        self._name = name
        self._buffer = bytearray()
        self._out = bytearray()
        self._state = "greeting"
        self._reply: tuple[int, int] | None = (
            None  # (type, length) of the reply being read
        )
        self.done = False
        self.error: NbdError | None = None
        self.export_size: int | None = None
        self.transmission_flags: int | None = None
        self.handshake_flags: int | None = None

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.done:
            return
        self._buffer += data
        while not self.done:
            need = self._need()
            if len(self._buffer) < need:
                return
            chunk = bytes(self._buffer[:need])
            del self._buffer[:need]
            self._step(chunk)

    def connection_closed(self) -> None:
        if not self.done:
            where = (
                "before the greeting"
                if self._state == "greeting"
                else "during the handshake"
            )
            self._fail(f"the server closed the connection {where}")

    # -- the machine

    def _need(self) -> int:
        if self._state == "greeting":
            return 16
        if self._state == "flags":
            return 2
        if self._state == "reply-header":
            return 20
        assert self._reply is not None
        return self._reply[1]

    def _step(self, chunk: bytes) -> None:
        if self._state == "greeting":
            magic, second = struct.unpack(">QQ", chunk)
            if magic != NBDMAGIC:
                return self._fail("not an NBD server (no NBDMAGIC greeting)")
            if second == CLISERV_MAGIC:
                return self._fail(
                    "the server speaks oldstyle NBD, which has no export names"
                )
            if second != IHAVEOPT:
                return self._fail(f"not an NBD newstyle greeting (0x{second:016x})")
            self._state = "flags"
        elif self._state == "flags":
            (flags,) = struct.unpack(">H", chunk)
            self.handshake_flags = flags
            if not flags & NBD_FLAG_FIXED_NEWSTYLE:
                return self._fail("the server does not speak fixed newstyle NBD")
            client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | (
                NBD_FLAG_C_NO_ZEROES if flags & NBD_FLAG_NO_ZEROES else 0
            )
            self._out += struct.pack(">I", client_flags)
            payload = (
                struct.pack(">I", len(self._name)) + self._name + struct.pack(">H", 0)
            )
            self._option(NBD_OPT_INFO, payload)
            self._state = "reply-header"
        elif self._state == "reply-header":
            magic, option, reply_type, length = struct.unpack(">QIII", chunk)
            if magic != REPLY_MAGIC:
                return self._fail(f"bad option reply magic 0x{magic:016x}")
            if option != NBD_OPT_INFO:
                return self._fail(
                    f"a reply to option {option}, expected one to NBD_OPT_INFO ({NBD_OPT_INFO})"
                )
            if length > NBD_MAX_REPLY:
                return self._fail(
                    f"an option reply of {length} bytes (at most {NBD_MAX_REPLY} accepted)"
                )
            self._reply = (reply_type, length)
            self._state = "reply-data"
            if length == 0:
                self._reply_done(b"")
        else:
            self._reply_done(chunk)

    def _reply_done(self, data: bytes) -> None:
        assert self._reply is not None
        reply_type, _length = self._reply
        self._reply = None
        self._state = "reply-header"
        if reply_type == NBD_REP_ACK:
            self._finish(None)
        elif reply_type == NBD_REP_INFO:
            if len(data) >= 2 and struct.unpack(">H", data[:2])[0] == NBD_INFO_EXPORT:
                if len(data) != 12:
                    return self._fail(
                        f"an NBD_INFO_EXPORT reply of {len(data)} bytes, expected 12"
                    )
                self.export_size, self.transmission_flags = struct.unpack(
                    ">QH", data[2:]
                )
            # other information types are only hints: ignored
        elif reply_type & NBD_REP_FLAG_ERROR:
            if reply_type == NBD_REP_ERR_UNKNOWN:
                reason = f"no such export {self.export!r}"
            else:
                reason = _NBD_ERRORS.get(
                    reply_type, f"the server answered with error 0x{reply_type:08x}"
                )
            message = _printable(data.decode("utf-8", "replace"))
            if message:
                reason += f" (server: {message})"
            self._finish(NbdError(reason, reply_type))
        # an unknown non-error reply type: the spec says to ignore it

    def _option(self, option: int, payload: bytes) -> None:
        self._out += struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload

    def _finish(self, err: NbdError | None) -> None:
        """The server answered: say goodbye in the option phase, then stop."""
        self._option(NBD_OPT_ABORT, b"")
        self.done = True
        self.error = err

    def _fail(self, reason: str) -> None:
        """The server broke the protocol (or went away): nothing more to send."""
        self.done = True
        self.error = NbdError(reason)


def _printable(text: str, limit: int = 200) -> str:
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- a TCP probe with a deadline (Twisted) --------------------------------------------------------


def _connect_reason(reason: Failure) -> str:
    err = reason.value
    if isinstance(err, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, (neterror.TimeoutError, neterror.TCPTimedOutError)):
        return "connect timed out"
    if isinstance(err, neterror.DNSLookupError):
        return "cannot resolve the host name"
    if isinstance(err, neterror.NoRouteError):
        return "no route to host"
    return " ".join(str(err).split()) or type(err).__name__


class TcpProbe(ClientFactory):
    """One TCP connection attempt with one deadline for everything, firing ``deferred`` once.

    ``make_protocol(probe)`` builds the protocol for the connection; it ends the probe with
    ``probe.succeed()`` or ``probe.fail(reason)``. Failures are ``DiskUnreachable`` whose
    reason starts with ``what`` (e.g. ``NBD server 10.0.0.1:10809``). Cancelling the Deferred
    drops the connection.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        what: str,
        host: str,
        port: int,
        timeout_s: float,
        make_protocol: Callable[[TcpProbe], Protocol],
    ) -> None:
        self.reactor = reactor
        self.what = what
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.make_protocol = make_protocol
        self.deferred: defer.Deferred = defer.Deferred(canceller=self._cancel)
        self.finished = False
        self.built: Protocol | None = None  # the connection's protocol, once made
        self._connector: Any = None
        self._timer: Any = None

    def start(self) -> defer.Deferred:
        self._timer = self.reactor.callLater(self.timeout_s, self._timed_out)
        self._connector = self.reactor.connectTCP(
            self.host, self.port, self, timeout=self.timeout_s
        )
        return self.deferred

    # -- ClientFactory

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self.make_protocol(self)
        protocol.factory = self
        self.built = protocol
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.fail(f"cannot connect: {_connect_reason(reason)}")

    # -- ending

    def succeed(self) -> None:
        if self._end():
            self.deferred.callback(None)

    def fail(self, reason: str, kind: type[DiskUnreachable] = DiskUnreachable) -> None:
        if self._end():
            self.deferred.errback(
                kind(f"{self.what} {_where(self.host, self.port)}: {reason}")
            )

    def _end(self) -> bool:
        if self.finished:
            return False
        self.finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return True

    def _timed_out(self) -> None:
        self._timer = None
        phase = "no answer" if self.built is not None else "no connection"
        self.fail(f"{phase} within {self.timeout_s:g} s")
        self._drop()

    def _cancel(self, _deferred: defer.Deferred) -> None:
        self._end()
        self._drop()  # the Deferred then fails with CancelledError

    def _drop(self) -> None:
        transport = getattr(self.built, "transport", None)
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()
        elif self._connector is not None:
            try:
                self._connector.stopConnecting()
            except neterror.NotConnectingError:
                pass


class NbdCheckProtocol(Protocol):
    """Runs an ``NbdHandshake`` over a connection and ends its ``TcpProbe`` with the answer.

    The answer is reported once the connection is closed, that is after the goodbye
    (NBD_OPT_ABORT) has been written out, so a caller that stops right away (a command-line
    check, a test) leaves no half-finished conversation behind.
    """

    transport: ITransport  # set before any callback (Protocol.makeConnection)

    def __init__(self, probe: TcpProbe, handshake: NbdHandshake) -> None:
        self.probe = probe
        self.handshake = handshake

    def dataReceived(self, data: bytes) -> None:
        if self.handshake.done:
            return
        self.handshake.receive_data(data)
        out = self.handshake.data_to_send()
        if out:
            self.transport.write(out)
        if self.handshake.done:
            self.transport.loseConnection()  # once the NBD_OPT_ABORT just written is out

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.handshake.done:
            self.handshake.connection_closed()
        self._report()

    def _report(self) -> None:
        err = self.handshake.error
        if err is None:
            self.probe.succeed()
        else:
            kind = NoSuchExport if err.code == NBD_REP_ERR_UNKNOWN else DiskUnreachable
            self.probe.fail(err.reason, kind)


class _AcceptProtocol(Protocol):
    """Connected is all we wanted to know."""

    transport: ITransport  # set before any callback (Protocol.makeConnection)

    def __init__(self, probe: TcpProbe) -> None:
        self.probe = probe

    def connectionMade(self) -> None:
        self.probe.succeed()
        self.transport.loseConnection()


def _check_timeout(timeout_s: float) -> float:
    timeout_s = float(timeout_s)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return timeout_s


# -- the providers -----------------------------------------------------------------------------


@implementer(IStorage)
class NbdStorage:
    """``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default): a network disk QEMU opens itself.

    ``check`` runs the NBD handshake (see the module docstring) against the server and fails
    with ``NoSuchExport`` for an export the server does not have, ``DiskUnreachable`` for
    anything else (refused, timed out, not NBD, TLS required). Options: ``reactor``
    (IReactorTCP and IReactorTime; default the global one), ``timeout_s`` (connect and
    handshake together). Host names are resolved by the reactor (IPv4 only); use an IPv6
    address literal for IPv6. TLS (``nbds://``) and Unix sockets (``nbd+unix://``) are
    not supported.
    """

    name = "nbd"
    schemes = ("nbd",)
    FORM = "nbd://HOST[:PORT]/EXPORT"

    def __init__(
        self, reactor: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._reactor = reactor
        self.timeout_s = _check_timeout(timeout_s)

    def parse(self, spec: str) -> Disk:
        try:
            authority, path = _url(spec, "nbd")
            host, port = _authority(authority, NBD_DEFAULT_PORT)
            if not path.startswith("/") or len(path) == 1:
                raise ValueError("export name missing")
            try:
                export = unquote(path[1:], errors="strict")
            except UnicodeDecodeError:
                raise ValueError(
                    "the export name is not UTF-8 once percent-decoded"
                ) from None
            _no_controls(export, "the export name")
            size = len(export.encode("utf-8"))
            if size > NBD_MAX_NAME_BYTES:
                raise ValueError(
                    f"the export name is {size} bytes, NBD allows at most {NBD_MAX_NAME_BYTES}"
                )
        except ValueError as err:
            raise _bad("NBD", spec, str(err), self.FORM) from None
        return Disk("nbd", spec, {"host": host, "port": str(port), "export": export})

    def check(self, disk: Disk) -> defer.Deferred:
        try:
            _expect(disk, "nbd")
            handshake = NbdHandshake(disk.parts["export"])
        except ValueError as err:
            return defer.fail(err)
        host, port = disk.parts["host"], int(disk.parts["port"])
        probe = TcpProbe(
            global_reactor() if self._reactor is None else self._reactor,
            "NBD server",
            host,
            port,
            self.timeout_s,
            lambda p: NbdCheckProtocol(p, handshake),
        )
        return probe.start()

    def domain_xml(self, disk: Disk, target: str) -> str:
        _expect(disk, "nbd")
        p = disk.parts
        return _network_xml("nbd", p["export"], p["host"], int(p["port"]), target)

    def release(self, disk: Disk) -> defer.Deferred:
        """Nothing to release: QEMU holds the NBD connection and drops it when the VM stops."""
        return defer.succeed(None)


_IQN = re.compile(
    r"iqn\.(?P<year>[0-9]{4})-(?P<month>[0-9]{2})"
    r"\.(?P<authority>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)"
    r"(?::(?P<unique>[a-z0-9.:-]+))?"
)


def check_iqn(iqn: str) -> str:
    """Validate an iSCSI qualified name (RFC 3720 3.2.6.3.1); returns it or raises ValueError.

    ``iqn.YYYY-MM.reversed.domain[:unique]``, lower case (iSCSI names are case-folded), at
    most 223 bytes; the unique part may use letters, digits, ``.``, ``-`` and ``:``.
    """
    if len(iqn.encode("utf-8")) > 223:
        raise ValueError(
            f"iSCSI names are at most 223 bytes, the IQN has {len(iqn.encode('utf-8'))}"
        )
    if iqn.lower() != iqn and _IQN.fullmatch(iqn.lower()):
        raise ValueError(f"the IQN {iqn!r} must be lower case")
    m = _IQN.fullmatch(iqn)
    if m is None:
        raise ValueError(
            f"{iqn!r} is not an IQN (iqn.YYYY-MM.reversed.domain[:unique])"
        )
    if not 1 <= int(m.group("month")) <= 12:
        raise ValueError(
            f"the IQN date {m.group('year')}-{m.group('month')} has no such month"
        )
    return iqn


@implementer(IStorage)
class IscsiStorage:
    """``iscsi://HOST[:PORT]/IQN/LUN`` (port 3260 by default): a network disk QEMU (libiscsi)
    logs in to itself.

    ``check`` only makes sure the portal accepts a TCP connection. A full iSCSI login
    (target name, CHAP, LUN inventory) is out of scope, so a wrong IQN or LUN is found when
    the hypervisor attaches the disk, not here. CHAP credentials in the spec are not
    supported. Options: ``reactor``, ``timeout_s``, as for ``nbd``.
    """

    name = "iscsi"
    schemes = ("iscsi",)
    FORM = "iscsi://HOST[:PORT]/iqn.YYYY-MM.reversed.domain[:unique]/LUN"

    def __init__(
        self, reactor: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._reactor = reactor
        self.timeout_s = _check_timeout(timeout_s)

    def parse(self, spec: str) -> Disk:
        try:
            authority, path = _url(spec, "iscsi")
            host, port = _authority(authority, ISCSI_DEFAULT_PORT)
            pieces = path.split("/")
            if len(pieces) != 3 or pieces[0] != "" or not pieces[1]:
                raise ValueError("the path must be /IQN/LUN")
            iqn = check_iqn(pieces[1])
            lun = pieces[2]
            if not re.fullmatch(r"[0-9]{1,5}", lun) or int(lun) > ISCSI_MAX_LUN:
                raise ValueError(
                    f"the LUN must be an integer 0-{ISCSI_MAX_LUN}, got {lun!r}"
                )
        except ValueError as err:
            raise _bad("iSCSI", spec, str(err), self.FORM) from None
        return Disk(
            "iscsi",
            spec,
            {"host": host, "port": str(port), "iqn": iqn, "lun": str(int(lun))},
        )

    def check(self, disk: Disk) -> defer.Deferred:
        """The portal accepts a TCP connection (no iSCSI login: see the class docstring)."""
        try:
            _expect(disk, "iscsi")
        except ValueError as err:
            return defer.fail(err)
        probe = TcpProbe(
            global_reactor() if self._reactor is None else self._reactor,
            "iSCSI portal",
            disk.parts["host"],
            int(disk.parts["port"]),
            self.timeout_s,
            _AcceptProtocol,
        )
        return probe.start()

    def domain_xml(self, disk: Disk, target: str) -> str:
        _expect(disk, "iscsi")
        p = disk.parts
        return _network_xml(
            "iscsi", f"{p['iqn']}/{p['lun']}", p["host"], int(p["port"]), target
        )

    def release(self, disk: Disk) -> defer.Deferred:
        """Nothing to release: QEMU's own iSCSI session ends with the VM."""
        return defer.succeed(None)


@implementer(IStorage)
class AoeStorage:
    """``aoe:eSHELF.SLOT`` (shelf 0-65534, slot 0-254): ATA over Ethernet through the Linux
    ``aoe`` driver, attached as the block device ``/dev/etherd/eSHELF.SLOT``.

    ``check`` looks for that device node (the driver creates it once the shelf answered
    discovery; run ``aoe-discover`` on the host). Option ``root`` (default ``/``) is where
    ``/dev`` is looked for, for tests; the XML always names the real ``/dev/etherd`` path.
    """

    name = "aoe"
    schemes = ("aoe",)
    FORM = "aoe:eSHELF.SLOT (shelf 0-65534, slot 0-254)"

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = os.fspath(root)

    def parse(self, spec: str) -> Disk:
        m = re.fullmatch(r"(?i:aoe):e([0-9]+)\.([0-9]+)", spec)
        if m is None:
            raise _bad("AoE", spec, "not aoe:eSHELF.SLOT", self.FORM)
        shelf, slot = int(m.group(1)), int(m.group(2))
        if shelf > AOE_MAX_SHELF:
            raise _bad("AoE", spec, f"shelf {shelf} out of range", self.FORM)
        if slot > AOE_MAX_SLOT:
            raise _bad("AoE", spec, f"slot {slot} out of range", self.FORM)
        device = f"{ETHERD}/e{shelf}.{slot}"
        return Disk(
            "aoe", spec, {"shelf": str(shelf), "slot": str(slot), "device": device}
        )

    def check(self, disk: Disk) -> defer.Deferred:
        try:
            _expect(disk, "aoe")
        except ValueError as err:
            return defer.fail(err)
        device = disk.parts["device"]
        local = os.path.join(self.root, device.lstrip("/"))
        try:
            st = os.stat(local)
        except FileNotFoundError:
            return defer.fail(
                DiskUnreachable(
                    f"AoE device {device} does not exist (shelf not discovered? aoe-discover)"
                )
            )
        except OSError as err:
            return defer.fail(DiskUnreachable(f"AoE device {device}: {err.strerror}"))
        if not stat.S_ISBLK(st.st_mode):
            return defer.fail(
                DiskUnreachable(f"AoE device {device} is not a block device")
            )
        return defer.succeed(None)

    def domain_xml(self, disk: Disk, target: str) -> str:
        _expect(disk, "aoe")
        return _local_xml(disk.parts["device"], target)

    def release(self, disk: Disk) -> defer.Deferred:
        """Nothing to release: the aoe driver keeps the device for every user of the host."""
        return defer.succeed(None)


#: File name endings of disk images that are not raw.
IMAGE_FORMATS = {
    ".qcow2": "qcow2",
    ".qcow": "qcow2",
    ".qed": "qed",
    ".vmdk": "vmdk",
    ".vdi": "vdi",
    ".vhdx": "vhdx",
}


@implementer(IStorage)
class PathStorage:
    """A plain absolute path or ``file:///ABS/PATH``: a disk image on this host (shared
    storage: NFS, a cluster file system, ...) or a block device.

    Paths under ``/dev/`` become ``<disk type='block'>``, anything else
    ``<disk type='file'>``; the image format follows the name (``.qcow2`` is qcow2, see
    ``IMAGE_FORMATS``), else raw. ``file:`` URLs are percent-decoded and may name no host
    but ``localhost``. ``check``: the file or block device exists and is readable.
    """

    name = "path"
    schemes = ("path", "file")
    FORM = "/ABS/PATH or file:///ABS/PATH"

    def parse(self, spec: str) -> Disk:
        try:
            if spec.startswith("/"):
                path = spec
            else:
                m = re.fullmatch(
                    r"(?i:file):(?://(?:localhost)?)?(/(?!/)[^?#]*)", spec, re.S
                )
                if m is None:
                    if re.match(r"(?i:file):", spec):
                        raise ValueError(
                            "a file: URL needs an absolute path, no host but localhost, no query"
                        )
                    raise ValueError("not an absolute path")
                path = unquote(m.group(1), errors="strict")
            _no_controls(path, "the path")
            path = posixpath.normpath(path)
            if path in ("/", "//"):
                raise ValueError("the root directory is not a disk")
        except (ValueError, UnicodeDecodeError) as err:
            raise _bad("path", spec, str(err), self.FORM) from None
        return Disk("path", spec, {"path": path})

    def check(self, disk: Disk) -> defer.Deferred:
        try:
            _expect(disk, "path")
        except ValueError as err:
            return defer.fail(err)
        path = disk.parts["path"]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return defer.fail(DiskUnreachable(f"disk {path} does not exist"))
        except OSError as err:
            return defer.fail(DiskUnreachable(f"disk {path}: {err.strerror}"))
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return defer.fail(
                DiskUnreachable(f"disk {path} is neither a file nor a block device")
            )
        if not os.access(path, os.R_OK):
            return defer.fail(DiskUnreachable(f"disk {path} is not readable"))
        return defer.succeed(None)

    def domain_xml(self, disk: Disk, target: str) -> str:
        _expect(disk, "path")
        path = disk.parts["path"]
        driver_type = IMAGE_FORMATS.get(posixpath.splitext(path)[1].lower(), "raw")
        return _local_xml(path, target, driver_type)

    def release(self, disk: Disk) -> defer.Deferred:
        """Nothing to release: the file or device stays where it is."""
        return defer.succeed(None)


#: The built-in providers, as ``plugins/builtin.py`` registers them.
PROVIDERS = (NbdStorage, IscsiStorage, AoeStorage, PathStorage)
