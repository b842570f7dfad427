"""The built-in storage plugins (plugins/storage.py) with real parts where they exist.

NBD is checked against a real nbdkit (Debian package ``nbdkit``; the tests that need it are
skipped only when it is not installed). nbdkit gets its listening socket by systemd-style
socket activation: the test binds and listens on 127.0.0.1:0 first, so the port is known,
cannot be taken by anyone else, and connections queue until nbdkit accepts them, with no
wait for readiness. ``wrong`` export names fail because nbdkit runs with the exportname filter
in strict mode, serving only ``web1``.

The NBD handshake is one sans-IO machine (``NbdHandshake``) with two drivers: a blocking
socket driver here (tests only), and the Twisted protocol of ``NbdStorage.check``. The
Twisted driver is tested on a MemoryReactorClock and a StringTransport fed the very bytes
nbdkit sent to the blocking driver, and once with a real reactor in a child process (no
pytest-twisted here). Timeouts run on the Clock, never on the wall.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from xenpool.interfaces import Disk, IStorage
from xenpool.pe.disks import NO_DISK, disk_xml_function, storage_for, supported_schemes
from xenpool.plugins import load_plugins
from xenpool_plugins import storage as S
from xenpool_plugins.storage import (
    AoeStorage,
    DiskSpecError,
    DiskUnreachable,
    IscsiStorage,
    NbdHandshake,
    NbdStorage,
    NoSuchExport,
    PathStorage,
)

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc" / "xenpool"
NBDKIT = shutil.which("nbdkit")
needs_nbdkit = pytest.mark.skipif(
    NBDKIT is None, reason="nbdkit is not installed (apt-get install nbdkit)"
)
EXPORT = "web1"


# -- helpers ---------------------------------------------------------------------------------


def result_of(d: defer.Deferred) -> object:
    """The result of a Deferred that has fired (a Failure if it failed)."""
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def failure_of(
    d: defer.Deferred, kind: type[BaseException] = DiskUnreachable
) -> BaseException:
    result = result_of(d)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert isinstance(result.value, kind), result.value
    return result.value


def greeting(flags: int = S.NBD_FLAG_FIXED_NEWSTYLE | S.NBD_FLAG_NO_ZEROES) -> bytes:
    return b"NBDMAGIC" + b"IHAVEOPT" + flags.to_bytes(2, "big")


def reply(
    reply_type: int,
    data: bytes = b"",
    option: int = S.NBD_OPT_INFO,
    magic: int = S.REPLY_MAGIC,
) -> bytes:
    return (
        magic.to_bytes(8, "big")
        + option.to_bytes(4, "big")
        + reply_type.to_bytes(4, "big")
        + len(data).to_bytes(4, "big")
        + data
    )


def info_export(size: int, flags: int) -> bytes:
    return reply(
        S.NBD_REP_INFO,
        S.NBD_INFO_EXPORT.to_bytes(2, "big")
        + size.to_bytes(8, "big")
        + flags.to_bytes(2, "big"),
    )


def option(opt: int, payload: bytes = b"") -> bytes:
    return (
        b"IHAVEOPT" + opt.to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload
    )


def info_request(name: bytes) -> bytes:
    return option(S.NBD_OPT_INFO, len(name).to_bytes(4, "big") + name + b"\x00\x00")


ABORT = option(S.NBD_OPT_ABORT)


def blocking_handshake(
    port: int, export: str, host: str = "127.0.0.1", timeout: float = 10.0
):
    """The NBD check as a blocking socket driver of the same sans-IO machine (tests only).

    Returns (handshake, bytes the server sent, bytes the client sent)."""
    handshake = NbdHandshake(export)
    received, sent = bytearray(), bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        while not handshake.done:
            data = sock.recv(65536)
            if not data:
                handshake.connection_closed()
                break
            received += data
            handshake.receive_data(data)
            out = handshake.data_to_send()
            if out:
                sock.sendall(out)
                sent += out
    return handshake, bytes(received), bytes(sent)


def closed_port() -> socket.socket:
    """A socket bound to a loopback port but not listening: connections to it are refused,
    and no one else can take the port while the socket is open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def listening_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


# -- nbdkit ---------------------------------------------------------------------------------


class Nbdkit:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def nbdkit(tmp_path_factory):
    """nbdkit serving a 1 MiB in-memory export ``web1`` (and nothing else) on 127.0.0.1."""
    if NBDKIT is None:
        pytest.skip("nbdkit is not installed (apt-get install nbdkit)")
    log = tmp_path_factory.mktemp("nbdkit") / "stderr"
    listener = listening_port()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # Socket activation: nbdkit serves the socket it finds as fd 3 when LISTEN_PID is its own
    # pid. A tiny Python wrapper moves the socket to fd 3 and execs nbdkit (same pid).
    wrapper = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])"
    )
    command = [
        sys.executable,
        "-c",
        wrapper,
        str(fd),
        NBDKIT,
        "--foreground",
        "--exit-with-parent",
        "--filter=exportname",
        "memory",
        "1M",
        f"exportname={EXPORT}",
        "exportname-strict=true",
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            command, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=err, stderr=err
        )
    listener.close()  # nbdkit holds the socket now; if it dies, connections are refused
    server = Nbdkit(port, proc, log)
    try:
        # Ready at once (the socket listens); this proves nbdkit answers, within a deadline.
        handshake, _, _ = blocking_handshake(port, EXPORT)
        assert handshake.error is None, f"{handshake.error}; nbdkit: {server.stderr()}"
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def captured(nbdkit):
    """What nbdkit and our client said to each other, for the right and a wrong export."""
    right = blocking_handshake(nbdkit.port, EXPORT)
    wrong = blocking_handshake(nbdkit.port, "nope")
    return {"right": right, "wrong": wrong}


# -- plugins ---------------------------------------------------------------------------------

PROVIDERS = {
    "nbd": NbdStorage,
    "iscsi": IscsiStorage,
    "aoe": AoeStorage,
    "path": PathStorage,
}


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_found_through_the_entry_point_and_verified(name):
    plugins = load_plugins()
    provider = plugins.get("storage", name)
    assert provider.plugin == "builtin"
    assert (
        provider.factory is PROVIDERS[name]
        or provider.factory.__name__ == PROVIDERS[name].__name__
    )
    obj = plugins.create("storage", name)
    assert verifyObject(IStorage, obj)
    assert obj.name == name
    assert verifyClass(IStorage, PROVIDERS[name])


def test_no_disk_provides_the_interface():
    assert verifyObject(IStorage, NO_DISK)


def test_create_passes_options():
    obj = load_plugins().create("storage", "nbd", timeout_s=2.5)
    assert obj.timeout_s == 2.5


@pytest.mark.parametrize(
    "spec, name, parts",
    [
        (
            "nbd://10.0.0.5/web1",
            "nbd",
            {"host": "10.0.0.5", "port": "10809", "export": "web1"},
        ),
        (
            "iscsi://san/iqn.2013-07.com.example:disk/0",
            "iscsi",
            {
                "host": "san",
                "port": "3260",
                "iqn": "iqn.2013-07.com.example:disk",
                "lun": "0",
            },
        ),
        ("aoe:e1.1", "aoe", {"shelf": "1", "slot": "1", "device": "/dev/etherd/e1.1"}),
        ("/srv/vm/web1.img", "path", {"path": "/srv/vm/web1.img"}),
        ("file:///srv/vm/web1.img", "path", {"path": "/srv/vm/web1.img"}),
        (
            "NBD://Host.Example/web1",
            "nbd",
            {"host": "host.example", "port": "10809", "export": "web1"},
        ),
    ],
)
def test_storage_for_picks_the_provider_by_scheme(spec, name, parts):
    provider, disk = storage_for(load_plugins(), spec)
    assert provider.name == name
    assert disk.spec == spec
    assert disk.parts == parts


def test_storage_for_empty_spec_is_no_disk():
    provider, disk = storage_for(load_plugins(), "")
    assert provider is NO_DISK
    assert disk == Disk("", "", {})
    assert provider.domain_xml(disk, "vda") == ""
    assert result_of(provider.check(disk)) is None
    assert result_of(provider.release(disk)) is None


@pytest.mark.parametrize(
    "spec",
    ["rbd://mon/pool/img", "nbds://h/e", "relative/path.img", "C:\\disk.img", "  /x"],
)
def test_storage_for_unknown_scheme_lists_the_supported_ones(spec):
    with pytest.raises(ValueError) as caught:
        storage_for(load_plugins(), spec)
    message = str(caught.value)
    assert "\n" not in message
    assert repr(spec) in message
    assert "supported schemes: aoe, file, iscsi, nbd, path" in message


def test_storage_for_options_reach_the_provider():
    provider, _ = storage_for(load_plugins(), "nbd://h/e", {"nbd": {"timeout_s": 1.5}})
    assert provider.timeout_s == 1.5


def test_storage_for_two_providers_for_one_scheme_is_an_error():
    from xenpool.hookspecs import hookimpl

    class Other(NbdStorage):
        name = "other-nbd"

    class Module:
        @staticmethod
        @hookimpl
        def xenpool_register_storage(register):
            register("other-nbd", Other)

    with pytest.raises(
        DiskSpecError, match="more than one storage plugin: nbd .*other-nbd"
    ):
        storage_for(load_plugins(modules=[Module]), "nbd://h/e")


def test_storage_for_passes_on_the_providers_parse_error():
    with pytest.raises(
        DiskSpecError, match="bad NBD disk spec 'nbd://h/'.*export name missing"
    ):
        storage_for(load_plugins(), "nbd://h/")


# -- parse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, parts",
    [
        (
            "nbd://storage1/web1",
            {"host": "storage1", "port": "10809", "export": "web1"},
        ),
        (
            "nbd://storage1:10810/web1",
            {"host": "storage1", "port": "10810", "export": "web1"},
        ),
        (
            "nbd://192.168.1.20:1/a",
            {"host": "192.168.1.20", "port": "1", "export": "a"},
        ),
        ("nbd://[::1]/web1", {"host": "::1", "port": "10809", "export": "web1"}),
        (
            "nbd://[2001:DB8::1]:65535/x",
            {"host": "2001:db8::1", "port": "65535", "export": "x"},
        ),
        (
            "nbd://san.example.org./vm/disk0",
            {"host": "san.example.org", "port": "10809", "export": "vm/disk0"},
        ),
        ("nbd://h/a%20b%2Fc", {"host": "h", "port": "10809", "export": "a b/c"}),
        ("nbd://h/%C3%A9t%C3%A9", {"host": "h", "port": "10809", "export": "été"}),
        ("nbd://h/it's<&>\"", {"host": "h", "port": "10809", "export": "it's<&>\""}),
        ("nbd://h/" + "x" * 4096, {"host": "h", "port": "10809", "export": "x" * 4096}),
    ],
)
def test_nbd_parse_good(spec, parts):
    disk = NbdStorage().parse(spec)
    assert disk == Disk("nbd", spec, parts)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("nbd://h/", "export name missing"),
        ("nbd://h", "export name missing"),
        ("nbd:///web1", "host missing"),
        ("nbd://h:0/e", "port must be 1-65535"),
        ("nbd://h:65536/e", "port must be 1-65535"),
        ("nbd://h:/e", "port must be 1-65535"),
        ("nbd://h:http/e", "port must be 1-65535"),
        ("nbd://::1/e", "IPv6 address must be in brackets"),
        ("nbd://[::g]/e", "not an IPv6 address"),
        ("nbd://[10.0.0.1]/e", "only IPv6 addresses go in brackets"),
        ("nbd://[::1/e", "bad bracketed host"),
        ("nbd://300.1.1.1/e", "not an IPv4 address"),
        ("nbd://-bad-/e", "not a valid host name"),
        ("nbd://bad_host/e", "not a valid host name"),
        ("nbd://user@h/e", "user names and passwords"),
        ("nbd://h/e?tls=on", "query strings"),
        ("nbd://h/e#x", "query strings"),
        ("nbd://h/" + "x" * 4097, "NBD allows at most 4096"),
        ("nbd://h/" + "é" * 2049, "NBD allows at most 4096"),
        ("nbd://h/%FF", "not UTF-8"),
        ("nbd://h/a%0Ab", "control characters"),
        ("nbd:h/e", "not a nbd:// URL"),
        ("iscsi://h/e", "not a nbd:// URL"),
    ],
)
def test_nbd_parse_bad(spec, problem):
    with pytest.raises(ValueError) as caught:
        NbdStorage().parse(spec)
    message = str(caught.value)
    assert problem in message
    assert message.startswith(f"bad NBD disk spec {spec!r}: ")
    assert "\n" not in message and "expected nbd://HOST[:PORT]/EXPORT" in message


@pytest.mark.parametrize(
    "spec, parts",
    [
        (
            "iscsi://san/iqn.2013-07.com.example:iscsi-nopool/2",
            {
                "host": "san",
                "port": "3260",
                "iqn": "iqn.2013-07.com.example:iscsi-nopool",
                "lun": "2",
            },
        ),
        (
            "iscsi://10.1.1.1:3261/iqn.2003-01.org.linux-iscsi.target:sn.4a2b/0",
            {
                "host": "10.1.1.1",
                "port": "3261",
                "iqn": "iqn.2003-01.org.linux-iscsi.target:sn.4a2b",
                "lun": "0",
            },
        ),
        (
            "iscsi://[fd00::5]/iqn.1992-01.com.example/16383",
            {
                "host": "fd00::5",
                "port": "3260",
                "iqn": "iqn.1992-01.com.example",
                "lun": "16383",
            },
        ),
        (
            "iscsi://san/iqn.2001-04.com.example:storage:diskarrays-sn-a8675309/007",
            {
                "host": "san",
                "port": "3260",
                "iqn": "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
                "lun": "7",
            },
        ),
    ],
)
def test_iscsi_parse_good(spec, parts):
    assert IscsiStorage().parse(spec) == Disk("iscsi", spec, parts)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("iscsi://san/iqn.2013-07.com.example:x", "the path must be /IQN/LUN"),
        ("iscsi://san/iqn.2013-07.com.example:x/", "the LUN must be an integer"),
        ("iscsi://san/iqn.2013-07.com.example:x/-1", "the LUN must be an integer"),
        ("iscsi://san/iqn.2013-07.com.example:x/one", "the LUN must be an integer"),
        (
            "iscsi://san/iqn.2013-07.com.example:x/16384",
            "the LUN must be an integer 0-16383",
        ),
        ("iscsi://san/iqn.2013-07.com.example:x/1/2", "the path must be /IQN/LUN"),
        ("iscsi://san//1", "the path must be /IQN/LUN"),
        ("iscsi://san/iqn.2013-13.com.example:x/1", "no such month"),
        ("iscsi://san/iqn.2013-00.com.example:x/1", "no such month"),
        ("iscsi://san/iqn.13-07.com.example:x/1", "is not an IQN"),
        ("iscsi://san/iqn.2013-07:x/1", "is not an IQN"),
        ("iscsi://san/iqn.2013-07.com.-example:x/1", "is not an IQN"),
        ("iscsi://san/iqn.2013-07.com.example:a_b/1", "is not an IQN"),
        ("iscsi://san/eui.02004567A425678D/1", "is not an IQN"),
        ("iscsi://san/iqn.2013-07.com.Example:x/1", "must be lower case"),
        (
            "iscsi://san/iqn.2013-07.com.example:" + "x" * 200 + "/1",
            "at most 223 bytes",
        ),
        ("iscsi://san:99999/iqn.2013-07.com.example:x/1", "port must be 1-65535"),
        (
            "iscsi://chap:secret@san/iqn.2013-07.com.example:x/1",
            "user names and passwords",
        ),
        ("iscsi:///iqn.2013-07.com.example:x/1", "host missing"),
    ],
)
def test_iscsi_parse_bad(spec, problem):
    with pytest.raises(ValueError) as caught:
        IscsiStorage().parse(spec)
    message = str(caught.value)
    assert problem in message
    assert message.startswith(f"bad iSCSI disk spec {spec!r}: ") and "\n" not in message


@pytest.mark.parametrize(
    "spec, shelf, slot",
    [
        ("aoe:e0.0", "0", "0"),
        ("aoe:e1.1", "1", "1"),
        ("aoe:e65534.254", "65534", "254"),
        ("AOE:e007.01", "7", "1"),
    ],
)
def test_aoe_parse_good(spec, shelf, slot):
    disk = AoeStorage().parse(spec)
    assert disk == Disk(
        "aoe",
        spec,
        {"shelf": shelf, "slot": slot, "device": f"/dev/etherd/e{shelf}.{slot}"},
    )


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("aoe:e65535.0", "shelf 65535 out of range"),
        ("aoe:e1.255", "slot 255 out of range"),
        ("aoe:1.1", "not aoe:eSHELF.SLOT"),
        ("aoe:e1", "not aoe:eSHELF.SLOT"),
        ("aoe:e1.1.1", "not aoe:eSHELF.SLOT"),
        ("aoe:e-1.1", "not aoe:eSHELF.SLOT"),
        ("aoe://e1.1", "not aoe:eSHELF.SLOT"),
        ("aoe:e1.1\n", "not aoe:eSHELF.SLOT"),
    ],
)
def test_aoe_parse_bad(spec, problem):
    with pytest.raises(ValueError) as caught:
        AoeStorage().parse(spec)
    message = str(caught.value)
    assert (
        problem in message
        and message.startswith(f"bad AoE disk spec {spec!r}: ")
        and "\n" not in message
    )


@pytest.mark.parametrize(
    "spec, path",
    [
        ("/srv/vm/web1.img", "/srv/vm/web1.img"),
        ("/srv/vm/../vm/./web1.img", "/srv/vm/web1.img"),
        ("/dev/vg0/web1", "/dev/vg0/web1"),
        ("file:///srv/vm/web%201.img", "/srv/vm/web 1.img"),
        ("file://localhost/srv/x", "/srv/x"),
        ("FILE:/srv/x", "/srv/x"),
    ],
)
def test_path_parse_good(spec, path):
    assert PathStorage().parse(spec) == Disk("path", spec, {"path": path})


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("relative/x.img", "not an absolute path"),
        ("file://otherhost/srv/x", "no host but localhost"),
        ("file:relative", "needs an absolute path"),
        ("file:///srv/x?y", "no query"),
        ("/", "root directory"),
        ("/srv/a\nb", "control characters"),
        ("file:///srv/a%00b", "control characters"),
    ],
)
def test_path_parse_bad(spec, problem):
    with pytest.raises(ValueError) as caught:
        PathStorage().parse(spec)
    message = str(caught.value)
    assert (
        problem in message
        and message.startswith(f"bad path disk spec {spec!r}: ")
        and "\n" not in message
    )


# -- domain_xml --------------------------------------------------------------------------------


def disk_element(provider, spec: str, target: str = "vda") -> ET.Element:
    xml = provider.domain_xml(provider.parse(spec), target)
    element = ET.fromstring(xml)
    assert element.tag == "disk"
    assert element.get("device") == "disk"
    assert [child.tag for child in element] == ["driver", "source", "target"]
    return element


def test_nbd_domain_xml():
    d = disk_element(NbdStorage(), "nbd://storage1:10810/web1")
    assert d.get("type") == "network"
    assert d.find("driver").attrib == {"name": "qemu", "type": "raw"}
    source = d.find("source")
    assert source.attrib == {"protocol": "nbd", "name": "web1"}
    assert [h.attrib for h in source] == [{"name": "storage1", "port": "10810"}]
    assert d.find("target").attrib == {"dev": "vda", "bus": "virtio"}


def test_nbd_domain_xml_escapes_attribute_values():
    nasty = 'it\'s "<&>" here'
    d = disk_element(NbdStorage(), "nbd://[::1]/" + nasty.replace(" ", "%20"))
    assert d.find("source").get("name") == nasty
    assert d.find("source/host").attrib == {"name": "::1", "port": "10809"}


def test_iscsi_domain_xml():
    d = disk_element(
        IscsiStorage(),
        "iscsi://san.example/iqn.2013-07.com.example:iscsi-nopool/2",
        "xvda",
    )
    assert d.get("type") == "network"
    assert d.find("source").attrib == {
        "protocol": "iscsi",
        "name": "iqn.2013-07.com.example:iscsi-nopool/2",
    }
    assert d.find("source/host").attrib == {"name": "san.example", "port": "3260"}
    assert d.find("target").attrib == {"dev": "xvda", "bus": "xen"}


def test_aoe_domain_xml():
    d = disk_element(AoeStorage(root="/somewhere/else"), "aoe:e3.7", "sdb")
    assert d.get("type") == "block"
    assert d.find("source").attrib == {
        "dev": "/dev/etherd/e3.7"
    }  # the real path, whatever root
    assert d.find("target").attrib == {"dev": "sdb", "bus": "scsi"}


@pytest.mark.parametrize(
    "spec, disk_type, source, driver_type",
    [
        ("/srv/vm/web1.img", "file", {"file": "/srv/vm/web1.img"}, "raw"),
        ("/srv/vm/web1.QCOW2", "file", {"file": "/srv/vm/web1.QCOW2"}, "qcow2"),
        ("file:///srv/vm/a%26b.img", "file", {"file": "/srv/vm/a&b.img"}, "raw"),
        ("/dev/vg0/web1", "block", {"dev": "/dev/vg0/web1"}, "raw"),
    ],
)
def test_path_domain_xml(spec, disk_type, source, driver_type):
    d = disk_element(PathStorage(), spec, "hdc")
    assert d.get("type") == disk_type
    assert d.find("source").attrib == source
    assert d.find("driver").attrib == {"name": "qemu", "type": driver_type}
    assert d.find("target").attrib == {"dev": "hdc", "bus": "ide"}


@pytest.mark.parametrize("target", ["", "vda1", "nvme0n1", "vd", "vda' bus='x", "VDA"])
def test_domain_xml_refuses_bad_targets(target):
    with pytest.raises(ValueError, match="bad disk target"):
        NbdStorage().domain_xml(NbdStorage().parse("nbd://h/e"), target)


def test_domain_xml_refuses_another_providers_disk():
    with pytest.raises(ValueError, match="given to the 'nbd' storage plugin"):
        NbdStorage().domain_xml(AoeStorage().parse("aoe:e1.1"), "vda")
    assert isinstance(
        failure_of(PathStorage().check(AoeStorage().parse("aoe:e1.1")), ValueError),
        ValueError,
    )


def test_libvirt_accepts_every_kind_of_disk():
    """The XML goes into the test driver's domain template and libvirt starts the domain."""
    libvirt = pytest.importorskip("libvirt")
    from xenpool.interfaces import DomainSpec
    from xenpool_plugins.hypervisor_libvirt import render_domain_xml

    template = (ETC / "domain-test.xml").read_text()
    conn = libvirt.open(f"test://{ETC / 'node-host1.xml'}")  # a fresh, private host
    try:
        specs = [
            "nbd://[::1]:10810/we'b\"1",
            "iscsi://san.example/iqn.2013-07.com.example:x/2",
            "aoe:e1.2",
            "/dev/vg0/web1",
            "file:///var/lib/a%20b.qcow2",
        ]
        for i, spec in enumerate(specs):
            provider, disk = storage_for(load_plugins(), spec)
            ours = ET.fromstring(provider.domain_xml(disk, "vda"))
            xml = render_domain_xml(
                template,
                DomainSpec(f"disk{i}", 64, 1, provider.domain_xml(disk, "vda")),
            )
            dom = conn.createXML(xml, 0)
            theirs = ET.fromstring(dom.XMLDesc()).find("devices/disk")
            assert theirs.get("type") == ours.get("type")
            assert theirs.find("source").attrib == ours.find("source").attrib
            assert [h.attrib for h in theirs.find("source")] == [
                h.attrib for h in ours.find("source")
            ]
            assert theirs.find("target").attrib == {"dev": "vda", "bus": "virtio"}
            dom.destroy()
        provider, disk = storage_for(load_plugins(), "")
        dom = conn.createXML(
            render_domain_xml(
                template, DomainSpec("nodisk", 64, 1, provider.domain_xml(disk, "vda"))
            ),
            0,
        )
        assert ET.fromstring(dom.XMLDesc()).find("devices/disk") is None
    finally:
        conn.close()


# -- release -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "provider, spec",
    [
        (NbdStorage(), "nbd://h/e"),
        (IscsiStorage(), "iscsi://h/iqn.2013-07.com.example:x/1"),
        (AoeStorage(), "aoe:e1.1"),
        (PathStorage(), "/srv/x"),
    ],
)
def test_release_has_nothing_to_do(provider, spec):
    assert result_of(provider.release(provider.parse(spec))) is None


# -- the NBD handshake machine (sans-IO) ------------------------------------------------------


def run_machine(
    export: str, server_bytes: bytes, chunk: int | None = None
) -> tuple[NbdHandshake, bytes]:
    handshake = NbdHandshake(export)
    sent = bytearray()
    pieces = (
        [server_bytes]
        if chunk is None
        else [server_bytes[i : i + chunk] for i in range(0, len(server_bytes), chunk)]
    )
    for piece in pieces:
        handshake.receive_data(piece)
        sent += handshake.data_to_send()
    return handshake, bytes(sent)


GOOD_SERVER = greeting() + info_export(1 << 20, 0x0D6D) + reply(S.NBD_REP_ACK)


@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
def test_machine_good_export_any_chunking(chunk):
    handshake, sent = run_machine("web1", GOOD_SERVER, chunk)
    assert handshake.done and handshake.error is None
    assert (handshake.export_size, handshake.transmission_flags) == (1 << 20, 0x0D6D)
    flags = (S.NBD_FLAG_C_FIXED_NEWSTYLE | S.NBD_FLAG_C_NO_ZEROES).to_bytes(4, "big")
    assert sent == flags + info_request(b"web1") + ABORT


def test_machine_sends_nothing_before_the_greeting_and_only_once():
    handshake = NbdHandshake("web1")
    handshake.receive_data(greeting()[:17])
    assert handshake.data_to_send() == b""
    handshake.receive_data(greeting()[17:])
    assert handshake.data_to_send().endswith(info_request(b"web1"))
    assert handshake.data_to_send() == b""
    assert not handshake.done


def test_machine_no_zeroes_only_when_offered():
    _, sent = run_machine(
        "e", greeting(S.NBD_FLAG_FIXED_NEWSTYLE) + reply(S.NBD_REP_ACK)
    )
    assert sent[:4] == S.NBD_FLAG_C_FIXED_NEWSTYLE.to_bytes(4, "big")


def test_machine_utf8_export_name_length_is_in_bytes():
    _, sent = run_machine("été", GOOD_SERVER)
    assert info_request("été".encode()) in sent


def test_machine_refuses_too_long_names():
    with pytest.raises(ValueError, match="at most 4096 bytes"):
        NbdHandshake("é" * 2049)


@pytest.mark.parametrize(
    "reply_type, text",
    [
        (S.NBD_REP_ERR_UNKNOWN, "no such export 'web1'"),
        (S.NBD_REP_ERR_POLICY, "refuses this client by policy"),
        (S.NBD_REP_ERR_TLS_REQD, "requires TLS"),
        (S.NBD_REP_ERR_UNSUP, "does not support NBD_OPT_INFO"),
        (S.NBD_REP_ERR_SHUTDOWN, "shutting down"),
        (S.NBD_REP_FLAG_ERROR | 99, "error 0x80000063"),
    ],
)
def test_machine_error_replies(reply_type, text):
    handshake, sent = run_machine("web1", greeting() + reply(reply_type))
    assert handshake.done
    assert handshake.error.code == reply_type
    assert text in handshake.error.reason
    assert sent.endswith(ABORT)  # still a polite goodbye


def test_machine_error_reply_carries_the_servers_message_on_one_line():
    handshake, _ = run_machine(
        "web1",
        greeting() + reply(S.NBD_REP_ERR_UNKNOWN, b"export\n'web1' not\x00 found"),
    )
    assert (
        handshake.error.reason
        == "no such export 'web1' (server: export 'web1' not found)"
    )


def test_machine_ignores_other_info_and_unknown_replies():
    other_info = reply(
        S.NBD_REP_INFO, (3).to_bytes(2, "big") + b"\x00" * 12
    )  # NBD_INFO_BLOCK_SIZE
    unknown = reply(42, b"whatever")
    handshake, _ = run_machine(
        "e", greeting() + other_info + unknown + reply(S.NBD_REP_ACK)
    )
    assert handshake.done and handshake.error is None and handshake.export_size is None


def test_machine_ignores_bytes_after_the_answer():
    handshake, _ = run_machine("e", GOOD_SERVER + b"garbage")
    assert handshake.error is None
    handshake.receive_data(b"more")
    assert handshake.data_to_send() == b""


@pytest.mark.parametrize(
    "server, text",
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD server"),
        (b"NBDMAGIC" + (0x00420281861253).to_bytes(8, "big") + b"\x00" * 8, "oldstyle"),
        (b"NBDMAGIC" + b"SOMETHIN" + b"\x00\x01", "not an NBD newstyle greeting"),
        (greeting(0), "does not speak fixed newstyle"),
        (greeting() + reply(S.NBD_REP_ACK, magic=0x1234), "bad option reply magic"),
        (
            greeting() + reply(S.NBD_REP_ACK, option=S.NBD_OPT_GO),
            "expected one to NBD_OPT_INFO",
        ),
        (
            greeting()
            + reply(S.NBD_REP_INFO)[:-4]
            + (S.NBD_MAX_REPLY + 1).to_bytes(4, "big"),
            "at most 65536 accepted",
        ),
        (
            greeting() + reply(S.NBD_REP_INFO, b"\x00\x00" + b"\x00" * 9),
            "NBD_INFO_EXPORT reply of 11 bytes",
        ),
    ],
)
def test_machine_protocol_violations(server, text):
    handshake, sent = run_machine("e", server)
    assert handshake.done and handshake.error.code is None
    assert text in handshake.error.reason
    assert not sent.endswith(ABORT)


@pytest.mark.parametrize(
    "server, where",
    [
        (b"", "before the greeting"),
        (b"NBDMAGIC", "before the greeting"),
        (greeting(), "during the handshake"),
    ],
)
def test_machine_closed_connection(server, where):
    handshake, _ = run_machine("e", server)
    assert not handshake.done
    handshake.connection_closed()
    assert handshake.done and where in handshake.error.reason


# -- the NBD check, Twisted driver, on a MemoryReactorClock ---------------------------------------


def start_check(
    export: str = EXPORT,
    timeout_s: float = 2.0,
    host: str = "127.0.0.1",
    port: int = 10809,
):
    reactor = MemoryReactorClock()
    storage = NbdStorage(reactor=reactor, timeout_s=timeout_s)
    disk = storage.parse(
        f"nbd://{'[' + host + ']' if ':' in host else host}:{port}/{export}"
    )
    d = storage.check(disk)
    assert not d.called
    [(h, p, factory, timeout, _bind)] = reactor.tcpClients
    assert (h, p, timeout) == (host, port, timeout_s)
    return reactor, factory, d


def connect(factory) -> tuple[object, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@needs_nbdkit
@pytest.mark.parametrize("chunk", [None, 1])
def test_twisted_driver_with_nbdkits_bytes_right_export(captured, chunk):
    handshake, server_bytes, client_bytes = captured["right"]
    assert (
        handshake.error is None and handshake.export_size == 1 << 20
    )  # nbdkit's "memory 1M"
    reactor, factory, d = start_check()
    protocol, transport = connect(factory)
    pieces = (
        [server_bytes]
        if chunk is None
        else [server_bytes[i : i + 1] for i in range(len(server_bytes))]
    )
    for piece in pieces:
        protocol.dataReceived(piece)
    assert (
        transport.value() == client_bytes
    )  # the same conversation as the blocking driver's
    assert transport.value().endswith(ABORT)
    assert transport.disconnecting  # closing after the abort
    assert (
        not d.called
    )  # the answer comes once the goodbye is out and the connection closed
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(d) is None
    assert reactor.getDelayedCalls() == []  # the deadline is cancelled


@needs_nbdkit
def test_twisted_driver_with_nbdkits_bytes_wrong_export(captured):
    handshake, server_bytes, client_bytes = captured["wrong"]
    assert handshake.error.code == S.NBD_REP_ERR_UNKNOWN
    reactor, factory, d = start_check("nope")
    protocol, transport = connect(factory)
    protocol.dataReceived(server_bytes)
    assert transport.value() == client_bytes and transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    err = failure_of(d, NoSuchExport)
    assert str(err) == "NBD server 127.0.0.1:10809: no such export 'nope'"
    assert reactor.getDelayedCalls() == []


def test_twisted_driver_connection_refused():
    reactor, factory, d = start_check()
    factory.clientConnectionFailed(
        reactor.connectors[0], Failure(ConnectionRefusedError())
    )
    err = failure_of(d)
    assert not isinstance(err, NoSuchExport)
    assert str(err) == "NBD server 127.0.0.1:10809: cannot connect: connection refused"
    assert reactor.getDelayedCalls() == []


def test_twisted_driver_times_out_connecting():
    reactor, factory, d = start_check(timeout_s=2.0)
    reactor.advance(1.999)
    assert not d.called
    reactor.advance(0.001)
    assert str(failure_of(d)) == "NBD server 127.0.0.1:10809: no connection within 2 s"
    assert reactor.connectors[0].stoppedConnecting
    # the connector's own failure report afterwards changes nothing
    factory.clientConnectionFailed(
        reactor.connectors[0], Failure(ConnectionRefusedError())
    )


def test_twisted_driver_times_out_when_the_server_says_nothing():
    reactor, factory, d = start_check(timeout_s=3.0, host="::1")
    protocol, transport = connect(factory)
    protocol.dataReceived(greeting())  # then silence
    reactor.advance(3.0)
    assert str(failure_of(d)) == "NBD server [::1]:10809: no answer within 3 s"
    assert transport.disconnecting  # dropped
    protocol.connectionLost(Failure(ConnectionRefusedError()))  # nothing more happens


def test_twisted_driver_server_hangs_up():
    reactor, factory, d = start_check()
    protocol, _ = connect(factory)
    protocol.dataReceived(greeting())
    protocol.connectionLost(Failure(ConnectionRefusedError()))
    assert (
        str(failure_of(d))
        == "NBD server 127.0.0.1:10809: the server closed the connection during the handshake"
    )
    assert reactor.getDelayedCalls() == []


def test_twisted_driver_cancel_drops_the_connection():
    reactor, factory, d = start_check()
    protocol, transport = connect(factory)
    d.cancel()
    failure_of(d, defer.CancelledError)
    assert transport.disconnecting
    assert reactor.getDelayedCalls() == []
    protocol.dataReceived(GOOD_SERVER)  # late answers are ignored
    protocol.connectionLost(Failure(ConnectionDone()))


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        NbdStorage(timeout_s=0)
    with pytest.raises(Exception, match="timeout_s must be > 0"):
        load_plugins().create("storage", "iscsi", timeout_s=-1)


# -- the NBD check against nbdkit (blocking driver) ---------------------------------------------


@needs_nbdkit
def test_nbdkit_right_export(nbdkit):
    handshake, _, sent = blocking_handshake(nbdkit.port, EXPORT)
    assert handshake.error is None
    assert handshake.export_size == 1 << 20
    assert handshake.handshake_flags & S.NBD_FLAG_FIXED_NEWSTYLE
    assert sent.endswith(ABORT)


@needs_nbdkit
def test_nbdkit_wrong_export(nbdkit):
    handshake, _, _ = blocking_handshake(nbdkit.port, "web2")
    assert handshake.error.code == S.NBD_REP_ERR_UNKNOWN
    assert handshake.error.reason == "no such export 'web2'"


@needs_nbdkit
def test_nbdkit_is_still_serving_after_the_checks(nbdkit, captured):
    assert nbdkit.proc.poll() is None, nbdkit.stderr()
    handshake, _, _ = blocking_handshake(nbdkit.port, EXPORT)
    assert handshake.error is None


# -- the checks with a real reactor (child process) -----------------------------------------------

REACTOR_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import defer, task
    from xenpool.plugins import load_plugins
    from xenpool.pe.disks import storage_for

    async def main(reactor, specs):
        plugins = load_plugins()
        results = {}
        for spec in specs:
            provider, disk = storage_for(plugins, spec, {"nbd": {"reactor": reactor, "timeout_s": 10},
                                                         "iscsi": {"reactor": reactor, "timeout_s": 10}})
            try:
                await provider.check(disk)
                results[spec] = None
            except Exception as err:
                results[spec] = [type(err).__name__, str(err)]
        print(json.dumps(results))

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, json.loads(sys.argv[1]))))
    """
)


def run_checks_in_reactor(specs: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", REACTOR_SCRIPT, json.dumps(specs)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_nbdkit
def test_checks_with_a_real_reactor(nbdkit):
    refused = closed_port()
    portal = listening_port()
    try:
        closed = refused.getsockname()[1]
        listening = portal.getsockname()[1]
        iqn = "iqn.2013-07.com.example:web1"
        specs = {
            "right": f"nbd://127.0.0.1:{nbdkit.port}/{EXPORT}",
            "wrong": f"nbd://127.0.0.1:{nbdkit.port}/nope",
            "nbd-closed": f"nbd://127.0.0.1:{closed}/{EXPORT}",
            "portal": f"iscsi://127.0.0.1:{listening}/{iqn}/0",
            "portal-closed": f"iscsi://127.0.0.1:{closed}/{iqn}/0",
        }
        results = run_checks_in_reactor(list(specs.values()))
    finally:
        refused.close()
        portal.close()
    assert results[specs["right"]] is None, nbdkit.stderr()
    assert results[specs["wrong"]] == [
        "NoSuchExport",
        f"NBD server 127.0.0.1:{nbdkit.port}: no such export 'nope'",
    ]
    assert results[specs["nbd-closed"]] == [
        "DiskUnreachable",
        f"NBD server 127.0.0.1:{closed}: cannot connect: connection refused",
    ]
    assert results[specs["portal"]] is None
    assert results[specs["portal-closed"]] == [
        "DiskUnreachable",
        f"iSCSI portal 127.0.0.1:{closed}: cannot connect: connection refused",
    ]


# -- iSCSI on a MemoryReactorClock ----------------------------------------------------------------


def test_iscsi_check_connects_and_hangs_up():
    reactor = MemoryReactorClock()
    storage = IscsiStorage(reactor=reactor, timeout_s=4)
    d = storage.check(
        storage.parse("iscsi://[fd00::5]:3261/iqn.2013-07.com.example:x/1")
    )
    [(host, port, factory, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("fd00::5", 3261, 4)
    _, transport = connect(factory)
    assert result_of(d) is None
    assert transport.value() == b"" and transport.disconnecting
    assert reactor.getDelayedCalls() == []


def test_iscsi_check_times_out():
    reactor = MemoryReactorClock()
    storage = IscsiStorage(reactor=reactor, timeout_s=4)
    d = storage.check(storage.parse("iscsi://san/iqn.2013-07.com.example:x/1"))
    reactor.advance(4)
    assert str(failure_of(d)) == "iSCSI portal san:3260: no connection within 4 s"


# -- AoE and path -------------------------------------------------------------------------------


@pytest.fixture
def etherd(tmp_path):
    root = tmp_path / "root"
    (root / "dev" / "etherd").mkdir(parents=True)
    return root


def test_aoe_block_device_is_reachable(etherd):
    try:
        os.mknod(etherd / "dev/etherd/e1.2", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except PermissionError:
        pytest.skip("creating a block device node needs root")
    storage = AoeStorage(root=etherd)
    assert result_of(storage.check(storage.parse("aoe:e1.2"))) is None


def test_aoe_missing_device(etherd):
    storage = AoeStorage(root=etherd)
    err = failure_of(storage.check(storage.parse("aoe:e1.3")))
    assert (
        str(err)
        == "AoE device /dev/etherd/e1.3 does not exist (shelf not discovered? aoe-discover)"
    )


def test_aoe_not_a_block_device(etherd):
    (etherd / "dev/etherd/e1.4").write_bytes(b"")
    storage = AoeStorage(root=etherd)
    err = failure_of(storage.check(storage.parse("aoe:e1.4")))
    assert str(err) == "AoE device /dev/etherd/e1.4 is not a block device"


def test_aoe_default_root_is_the_real_one():
    assert AoeStorage().root == "/"


def test_path_file_is_reachable(tmp_path):
    image = tmp_path / "web1.img"
    image.write_bytes(b"\0" * 512)
    storage = PathStorage()
    assert result_of(storage.check(storage.parse(str(image)))) is None
    assert result_of(storage.check(storage.parse(image.as_uri()))) is None


def test_path_block_device_is_reachable(tmp_path):
    node = tmp_path / "blk"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except PermissionError:
        pytest.skip("creating a block device node needs root")
    storage = PathStorage()
    assert result_of(storage.check(storage.parse(str(node)))) is None


def test_path_missing_file(tmp_path):
    storage = PathStorage()
    err = failure_of(storage.check(storage.parse(str(tmp_path / "gone.img"))))
    assert str(err) == f"disk {tmp_path / 'gone.img'} does not exist"


def test_path_directory_is_not_a_disk(tmp_path):
    storage = PathStorage()
    err = failure_of(storage.check(storage.parse(str(tmp_path))))
    assert "is neither a file nor a block device" in str(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_path_unreadable_file(tmp_path):
    image = tmp_path / "secret.img"
    image.write_bytes(b"")
    image.chmod(0)
    storage = PathStorage()
    assert "is not readable" in str(
        failure_of(storage.check(storage.parse(str(image))))
    )


# -- what the PE calls -----------------------------------------------------------------------------


def test_disk_xml_function_checks_then_gives_the_xml(tmp_path):
    image = tmp_path / "web1.img"
    image.write_bytes(b"")
    disk_xml = disk_xml_function(load_plugins(), target="xvda")
    xml = result_of(disk_xml(str(image)))
    element = ET.fromstring(xml)
    assert element.find("source").get("file") == str(image)
    assert element.find("target").attrib == {"dev": "xvda", "bus": "xen"}
    assert result_of(disk_xml("")) == ""
    assert "does not exist" in str(failure_of(disk_xml(str(tmp_path / "gone.img"))))
    assert "supported schemes" in str(failure_of(disk_xml("rbd://x/y"), ValueError))


def test_disk_xml_function_uses_the_injected_reactor():
    reactor = MemoryReactorClock()
    disk_xml = disk_xml_function(
        load_plugins(), options={"nbd": {"reactor": reactor, "timeout_s": 1}}
    )
    d = disk_xml("nbd://storage1/web1")
    [(host, port, factory, _timeout, _)] = reactor.tcpClients
    protocol, _ = connect(factory)
    protocol.dataReceived(GOOD_SERVER)
    protocol.connectionLost(Failure(ConnectionDone()))
    element = ET.fromstring(result_of(d))
    assert element.find("source").attrib == {"protocol": "nbd", "name": "web1"}
    assert element.find("source/host").attrib == {"name": "storage1", "port": "10809"}


# -- odds and ends -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, text",
    [
        (ConnectionRefusedError(), "connection refused"),
        (ConnectTimeoutError(), "connect timed out"),
        (DNSLookupError("storage1"), "cannot resolve the host name"),
        (NoRouteError(), "no route to host"),
        (OSError("weird\nthing"), "weird thing"),
    ],
)
def test_connect_failures_in_one_line(error, text):
    reactor, factory, d = start_check()
    factory.clientConnectionFailed(reactor.connectors[0], Failure(error))
    assert str(failure_of(d)) == f"NBD server 127.0.0.1:10809: cannot connect: {text}"


@pytest.mark.parametrize(
    "provider", [NbdStorage(), IscsiStorage(), AoeStorage(), PathStorage()]
)
def test_check_refuses_another_providers_disk(provider):
    other = Disk("other", "other:x", {})
    assert "storage plugin" in str(failure_of(provider.check(other), ValueError))


def test_check_reports_other_os_errors_in_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    aoe = AoeStorage(root=not_a_dir)
    assert (
        str(failure_of(aoe.check(aoe.parse("aoe:e1.1"))))
        == "AoE device /dev/etherd/e1.1: Not a directory"
    )
    path = PathStorage()
    assert (
        str(failure_of(path.check(path.parse(f"{not_a_dir}/x"))))
        == f"disk {not_a_dir}/x: Not a directory"
    )


def test_no_disk_takes_only_the_empty_spec():
    with pytest.raises(DiskSpecError, match="only the empty spec"):
        NO_DISK.parse("/x")


def test_storage_for_asks_a_factory_function_for_its_schemes():
    from xenpool.hookspecs import hookimpl

    class Rbd(PathStorage):
        name = "rbd"
        schemes = ("rbd",)

        def parse(self, spec):
            return Disk("rbd", spec, {})

    class Module:
        @staticmethod
        @hookimpl
        def xenpool_register_storage(register):
            register("rbd", lambda **options: Rbd())  # a function: no schemes attribute

    plugins = load_plugins(modules=[Module])
    provider, disk = storage_for(plugins, "rbd:pool/image")
    assert provider.name == "rbd" and disk.scheme == "rbd"
    assert "rbd" in supported_schemes(plugins)
