"""Which addresses to advertise for an endpoint, and the transport parameter of a connection.

RFC 5354 transports carry real addresses: rsplib drops a transport whose addresses are
unspecified (0.0.0.0, ::) or loopback ("no usable transport addresses"). A socket bound to
every interface is therefore advertised with this host's own addresses, loopback only when
the host has nothing else.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from .protocol import params as P

_SIOCGIFADDR = 0x8915


def _fib_local(path: str = "/proc/net/fib_trie") -> list[str]:
    """Every local IPv4 address the kernel routes to this host (secondary ones too, which
    the per-interface ioctl does not see, e.g. a non-loopback address on ``lo``)."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return []
    return [
        lines[i - 1].split()[-1]
        for i, line in enumerate(lines)
        if i and "/32 host LOCAL" in line
    ]


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (Linux: one ioctl per interface, and the
    kernel's table of local addresses)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _index, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(
                    probe.fileno(),
                    _SIOCGIFADDR,
                    struct.pack("256s", name.encode()[:15]),
                )
            except OSError:  # no IPv4 address on this interface
                continue
            address = socket.inet_ntoa(answer[20:24])
            if address not in found:
                found.append(address)
    found += [a for a in dict.fromkeys(_fib_local()) if a not in found]
    return sorted(found, key=lambda a: ipaddress.ip_address(a).is_loopback)


def usable(address: str) -> bool:
    """An address a peer such as rsplib takes: neither unspecified nor loopback."""
    ip = ipaddress.ip_address(address)
    return not (ip.is_unspecified or ip.is_loopback)


def advertised(host: str, preferred: str = "", candidates=None) -> tuple[str, ...]:
    """The addresses to put in a transport parameter for a socket bound to ``host``: that
    address itself, or for one bound to every interface ``preferred`` if given, else the
    host's usable addresses (loopback only when it has none)."""
    if host and not ipaddress.ip_address(host).is_unspecified:
        return (host,)
    if preferred:
        return (preferred,)
    addresses = (candidates or local_addresses)()
    real = tuple(a for a in addresses if usable(a))
    return real or tuple(addresses[:1]) or ("127.0.0.1",)


def is_sctp(transport) -> bool:
    """Whether a Twisted transport (or listening port) runs over SCTP (xenpool.sctp)."""
    return bool(getattr(transport, "sctp", False))


def transport_parameter(
    transport,
    host: str,
    port: int,
    addresses: tuple[str, ...] | None = None,
    use: int = P.TransportUse.DATA_ONLY,
) -> P.Transport:
    """The SCTP or TCP Transport parameter for ``host``:``port`` on ``transport``'s protocol."""
    kind = P.SctpTransport if is_sctp(transport) else P.TcpTransport
    return kind(port, addresses or (host,), use)


def peer_transport(transport) -> P.Transport:
    """The transport parameter of the other end of a connection (a PE's ASAP transport,
    as its registrar sees it)."""
    peer = transport.getPeer()
    return transport_parameter(transport, peer.host, peer.port)
