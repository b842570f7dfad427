"""What xenpool sends, byte for byte, as rsplib 3.4.4 needs it (issue 13's interop fixes).

Each test pins the exact bytes and, where Debian's librspmessaging (rsplib-registrar,
rsplib-tools) is installed, hands them to rsplib's own parser (``rserpoolPacket2Message``)
and asserts it accepts them: rsplib sets the message's Error field (a uint16 after its type)
to non-zero for anything it refuses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from xenpool import addresses
from xenpool.plugins import load_plugins
from xenpool.protocol import messages as M
from xenpool.protocol import params as P
from xenpool.registrar.core import Registrar
from xenpool.registrar.handlespace import RESOLUTION_ITEMS_LIMIT, Handlespace
from xenpool.registrar.peering import Peering

LEAST_USED = P.PoolPolicy.make(P.PolicyType.LEAST_USED, load=0)
PE_ADDRESS = "10.0.2.15"
REGISTRAR_ADDRESS = "10.0.2.16"


def _rsplib():
    name = ctypes.util.find_library("rspmessaging") or "librspmessaging.so.3"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.rserpoolPacket2Message.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_uint32,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.rserpoolPacket2Message.restype = ctypes.c_uint
    lib.rserpoolMessageDelete.argtypes = [ctypes.c_void_p]
    return lib


RSPLIB = _rsplib()


def rsplib_error(frame: bytes, ppid: int) -> int:
    """What rsplib 3.4.4's parser says of ``frame``: 0 when it accepts it, else its error
    code (0x10 invalid message, 0x11 invalid value, 0xf006 invalid registrator, ...)."""
    if RSPLIB is None:
        pytest.skip(
            "rsplib's parser (librspmessaging, Debian rsplib-tools) not installed"
        )
    buffer = ctypes.create_string_buffer(frame, len(frame))
    message = ctypes.c_void_p()
    assert (
        RSPLIB.rserpoolPacket2Message(
            buffer, None, 0, ppid, len(frame), len(frame), ctypes.byref(message)
        )
        == 0
    )
    try:
        return struct.unpack_from("=H", ctypes.string_at(message.value, 8), 4)[
            0
        ]  # Type (uint), then Error
    finally:
        RSPLIB.rserpoolMessageDelete(message)


def _policies() -> dict:
    plugins = load_plugins()
    providers = [plugins.create("policy", name) for name in plugins.names("policy")]
    return {provider.policy_type: provider for provider in providers}


POLICIES = _policies()


def element(identifier=0x11, home=0, asap=None, transport=None):
    transport = transport or P.SctpTransport(
        5001, (PE_ADDRESS,), P.TransportUse.DATA_PLUS_CONTROL
    )
    return P.PoolElement(identifier, home, 30000, transport, LEAST_USED, asap)


class Association:
    def __init__(self, asap_transport=None) -> None:
        self.sent = []
        self.asap_transport = asap_transport

    def send(self, message) -> None:
        self.sent.append(message)

    def send_encoded(self, data: bytes) -> None:
        self.sent.append(M.decode(data))

    def close(self) -> None:
        pass


def test_handle_update_carries_the_pe_s_asap_transport_that_rsplib_requires():
    handlespace = Handlespace(0x20, POLICIES)
    peering = Peering(handlespace, Clock())
    registrar = Registrar(handlespace, Clock(), observers=[peering])
    channel = Association()
    peering.handle(M.Presence(0x30, 0x20, 0xFFFF), channel)
    channel.sent.clear()
    association = Association(P.SctpTransport(40000, (PE_ADDRESS,)))
    registrar.handle(M.Registration(b"Xen", element()), association)
    (update,) = channel.sent
    assert update.pool_element.asap_transport == P.SctpTransport(40000, (PE_ADDRESS,))
    frame = M.encode(update)
    assert frame.hex() == (
        "04000054"
        "00000020"
        "00000030"
        "0000"
        "0000"  # HANDLE_UPDATE, sender, receiver, ADD_PE
        "00090007"
        "58656e00"  # pool handle "Xen"
        "000a003c"
        "00000011"
        "00000020"
        "00007530"  # PE 0x11, home 0x20, life 30 s
        "00040010"
        "13890001"
        "00010008"
        "0a00020f"  # user: SCTP 5001, data+control, 10.0.2.15
        "0008000c"
        "40000001"
        "00000000"  # LeastUsed, load 0
        "00040010"
        "9c400000"
        "00010008"
        "0a00020f"  # ASAP transport: SCTP 40000 from 10.0.2.15
    )
    assert rsplib_error(frame, M.ENRP_PPID) == 0
    # without it (what xenpool sent before) rsplib refuses: "invalid registrator"
    bare = M.encode(M.HandleUpdate(0x20, 0x30, 0, b"Xen", element(home=0x20)))
    assert rsplib_error(bare, M.ENRP_PPID) == 0xF006
    # an ASAP answer (HANDLE_RESOLUTION_RESPONSE) carries no ASAP transport (RFC 5352)
    registrar.handle(M.HandleResolution(b"Xen"), association)
    assert association.sent[-1].pool_elements[0].asap_transport is None


def test_handle_table_response_carries_asap_transports_and_a_learned_one_is_passed_on():
    handlespace = Handlespace(0x20, POLICIES)
    peering = Peering(handlespace, Clock())
    channel = Association()
    peering.handle(M.Presence(0x30, 0x20, 0xFFFF), channel)
    learned = element(7, home=0x30, asap=P.SctpTransport(40001, ("10.0.2.17",)))
    peering.handle(M.HandleUpdate(0x30, 0x20, 0, b"Xen", learned), channel)
    channel.sent.clear()
    peering.handle(M.HandleTableRequest(0x40, 0x20), channel)
    (response,) = [m for m in channel.sent if isinstance(m, M.HandleTableResponse)]
    assert response.entries == ((b"Xen", (learned,)),)
    frame = M.encode(response)
    assert frame[:12].hex() == "030000500000002000000040"
    assert frame.endswith(bytes.fromhex("000400109c410000000100080a000211"))
    assert rsplib_error(frame, M.ENRP_PPID) == 0


def test_registration_puts_pool_authentication_before_the_pool_element():
    mac = bytes(range(32))
    frame = M.encode(M.Registration(b"Xen", element(), mac))
    assert (
        frame.hex()
        == (
            "0100005c"
            "00090007"
            "58656e00"
            "80410024"
            + mac.hex()  # Pool Authentication, before the last standard parameter
            + "000a002c"
            "00000011"
            "00000000"
            "00007530"
            "00040010"
            "13890001"
            "00010008"
            "0a00020f"
            "0008000c"
            "40000001"
            "00000000"
        )
    )
    assert M.decode(frame) == M.Registration(b"Xen", element(), mac)
    assert rsplib_error(frame, M.ASAP_PPID) == 0
    # and without a pool secret it is not sent at all
    assert b"\x80\x41" not in M.encode(M.Registration(b"Xen", element()))


def test_handle_resolution_puts_request_ram_first_and_asks_for_at_most_128():
    frame = M.encode(M.HandleResolution(b"Xen", M.MAX_RESOLUTION_ITEMS, ram_mb=512))
    assert frame.hex() == "0500001c80430008000002000009000758656e00803f000800000080"
    assert M.decode(frame) == M.HandleResolution(b"Xen", 128, 512)
    assert rsplib_error(frame, M.ASAP_PPID) == 0
    # the same with Request RAM last, as xenpool sent it before: rsplib fails on it
    old = bytes.fromhex("0500001c0009000758656e00803f0008000000808043000800000200")
    assert rsplib_error(old, M.ASAP_PPID) == 0x10
    assert (
        rsplib_error(M.encode(M.HandleResolution(b"Xen", ram_mb=512)), M.ASAP_PPID) == 0
    )


def test_a_resolution_answer_carries_at_most_128_pool_elements():
    handlespace = Handlespace(0x20, POLICIES)
    policy = P.PoolPolicy.make(P.PolicyType.ROUND_ROBIN)
    for n in range(1, 201):
        pe = P.PoolElement(n, 0, 30000, P.TcpTransport(5000 + n, (PE_ADDRESS,)), policy)
        handlespace.register(b"Xen", pe, now=0, owner=None)
    assert RESOLUTION_ITEMS_LIMIT == 128
    answer = handlespace.resolution_answer(b"Xen", 0xFFFFFFFF)
    assert len(M.decode(answer).pool_elements) == 128
    assert rsplib_error(answer, M.ASAP_PPID) == 0
    # 129 is what rsplib refuses (MAX_MAX_HANDLE_RESOLUTION_ITEMS)
    elements = M.decode(answer).pool_elements
    more = M.encode(M.HandleResolutionResponse(b"Xen", elements + elements[:1], policy))
    assert rsplib_error(more, M.ASAP_PPID) != 0


class _Port:
    def __init__(self, host: str, port: int, sctp: bool) -> None:
        self.address, self.sctp = IPv4Address("TCP", host, port), sctp

    def getHost(self):
        return self.address


class _Listener:
    def __init__(self, port) -> None:
        self.port = port


def test_server_information_names_real_addresses_not_0_0_0_0(monkeypatch):
    from xenpool.registrar.service import RegistrarService

    monkeypatch.setattr(
        addresses,
        "local_addresses",
        lambda: ["127.0.0.1", REGISTRAR_ADDRESS, "10.0.3.16"],
    )
    service = RegistrarService.__new__(RegistrarService)
    service.announce_interface = ""
    (sctp, tcp) = service._transports(
        [
            _Listener(_Port("0.0.0.0", 9901, True)),
            _Listener(_Port("0.0.0.0", 9902, False)),
        ]
    )
    assert sctp == P.SctpTransport(9901, (REGISTRAR_ADDRESS, "10.0.3.16"))
    assert tcp == P.TcpTransport(9902, (REGISTRAR_ADDRESS,))
    frame = M.encode(M.Presence(0x20, 0, 0xFFFF, P.ServerInformation(0x20, sctp)))
    assert frame.hex() == (
        "01000034"
        "00000020"
        "00000000"
        "000f0006"
        "ffff0000"  # checksum
        "000b0020"
        "00000020"
        "00040018"
        "26ad0000"
        "00010008"
        "0a000210"
        "00010008"
        "0a000310"
    )
    assert rsplib_error(frame, M.ENRP_PPID) == 0
    # what xenpool sent before: 0.0.0.0, which rsplib drops ("no usable transport addresses")
    old = M.encode(
        M.Presence(
            0x20,
            0,
            0xFFFF,
            P.ServerInformation(0x20, P.SctpTransport(9901, ("0.0.0.0",))),
        )
    )
    assert rsplib_error(old, M.ENRP_PPID) != 0


def test_a_bound_address_is_advertised_as_it_is_and_loopback_only_without_another():
    assert addresses.advertised("10.1.2.3") == ("10.1.2.3",)
    assert addresses.advertised("0.0.0.0", "10.9.9.9") == ("10.9.9.9",)
    assert addresses.advertised("0.0.0.0", candidates=lambda: ["127.0.0.1"]) == (
        "127.0.0.1",
    )
    assert addresses.advertised(
        "", candidates=lambda: ["127.0.0.1", "192.168.1.4"]
    ) == ("192.168.1.4",)
    assert (
        "127.0.0.1" in addresses.local_addresses()
    )  # this machine's loopback is found


def test_xenpool_takes_rsplib_s_business_card_and_its_cause_0x0010():
    # rsplib's BUSINESS_CARD: pool handle, policy, pool elements (rsplib's own parser reads
    # the pool handle twice and refuses it; xenpool takes it)
    card = M.BusinessCard(b"Xen", (element(),), LEAST_USED)
    frame = M.encode(card)
    assert frame.hex().startswith("0d0000440009000758656e000008000c40000001")
    assert M.decode(frame) == card
    assert rsplib_error(frame, M.ASAP_PPID) != 0  # rsplib's bug, not ours
    # rsplib answers a message it cannot parse with cause 0x0010 (not in RFC 5354)
    error = bytes.fromhex("0e00000c000c000800100004")
    assert M.decode(error) == M.AsapError(P.OperationError((P.ErrorCause(0x10),)))
