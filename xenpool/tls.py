"""TLS on every port: Twisted's ``ssl:`` server endpoints, with client certificates.

Twisted's own ``ssl:`` server string has no way to ask for client certificates. Here an
``ssl:`` server string may also take ``caCertsDir=DIR`` (as Twisted's ``ssl:`` client
string does): every ``*.pem`` in DIR is a CA, and a client must present a certificate
one of them signed, or the handshake fails::

    ssl:5001:privateKey=pe.key:certKey=pe.pem:caCertsDir=/etc/xenpool/ca

Without ``caCertsDir`` a string goes to Twisted unchanged. Clients use Twisted's ``ssl:``
and ``tls:`` client strings as they are (``tls:host=pr1:port=3863:trustRoots=DIR:
certificate=pu.pem:privateKey=pu.key`` verifies the server's name too). A PU or PE reaches
other PEs at the address the pool gives for them; ``pe_endpoint`` makes that a ``tls:``
client endpoint with the options of ``--pe-tls``.
"""

from __future__ import annotations

from twisted.internet import endpoints
from twisted.python.filepath import FilePath


def _parse(description: str) -> tuple[list, dict]:
    args, kwargs = endpoints._parse(description)
    return list(args), dict(kwargs)


def server_endpoint(reactor, description: str):
    """``endpoints.serverFromString``, plus ``caCertsDir=`` on ``ssl:`` strings."""
    if not description.lower().startswith("ssl:") or "caCertsDir=" not in description:
        return endpoints.serverFromString(reactor, description)
    from twisted.internet import ssl

    args, kwargs = _parse(description)
    args.pop(0)  # "ssl"
    ca_dir = kwargs.pop("caCertsDir")
    port = int(kwargs.pop("port", args.pop(0) if args else 0))
    key_path = kwargs.pop("privateKey", "server.pem")
    cert_path = kwargs.pop("certKey", None) or key_path
    interface = kwargs.pop("interface", "")
    backlog = int(kwargs.pop("backlog", 50))
    chain = kwargs.pop("extraCertChain", None)
    if kwargs or args:
        raise ValueError(
            f"unknown ssl: server options {sorted(kwargs) or args} in {description!r}"
        )
    certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate.loadPEM(FilePath(cert_path).getContent()),
        ssl.KeyPair.load(FilePath(key_path).getContent(), 1),
    )
    authorities = []
    for path in sorted(FilePath(ca_dir).globChildren("*.pem")):
        try:  # as Twisted's client caCertsDir: what is not a certificate is skipped
            authorities.append(ssl.Certificate.loadPEM(path.getContent()).original)
        except Exception:
            continue
    if not authorities:
        raise ValueError(f"caCertsDir={ca_dir}: no *.pem certificate in it")
    extra = []
    if chain:
        extra = [
            ssl.Certificate.loadPEM(part + b"-----END CERTIFICATE-----\n").original
            for part in FilePath(chain).getContent().split(b"-----END CERTIFICATE-----")
            if b"-----BEGIN CERTIFICATE-----" in part
        ]
    options = ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=extra or None,
        verify=True,
        caCerts=authorities,
        requireCertificate=True,
    )
    return endpoints.SSL4ServerEndpoint(
        reactor, port, options, backlog=backlog, interface=interface
    )


def check_server(description: str) -> None:
    """Raise (one line) when a server endpoint string cannot be built: an unknown kind,
    a certificate or key that cannot be read, a CA directory without certificates."""
    from twisted.internet.task import Clock

    try:
        server_endpoint(Clock(), description)
    except OSError as err:
        raise ValueError(f"{err.filename}: {err.strerror}") from None
    except Exception as err:
        raise ValueError(str(err) or type(err).__name__) from None


def service(description: str, factory, reactor=None):
    """``strports.service`` through ``server_endpoint``: the port is bound when the
    service starts, and a port that cannot be bound stops the daemon."""
    from twisted.application.internet import StreamServerEndpointService

    if reactor is None:
        from twisted.internet import reactor
    svc = StreamServerEndpointService(server_endpoint(reactor, description), factory)
    svc._raiseSynchronously = True
    return svc


def listen_port(description: str) -> int:
    """The port a server endpoint string listens on (``tcp:5001``, ``ssl:port=5001:...``)."""
    args, kwargs = _parse(description)
    port = kwargs.get("port", args[1] if len(args) > 1 else None)
    if port is None or not str(port).isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"no port 1..65535 in {description!r}")
    return int(port)


def local_unless_told(description: str) -> str:
    """A status endpoint listens on localhost unless its string names an interface:
    ``tcp:8080`` -> ``tcp:8080:interface=127.0.0.1`` (``::1`` for ``tcp6:``)."""
    kind = description.partition(":")[0].lower()
    if kind not in ("tcp", "tcp6", "ssl") or "interface=" in description:
        return description
    return description + (
        ":interface=\\:\\:1" if kind == "tcp6" else ":interface=127.0.0.1"
    )


def peer_name(transport) -> str | None:
    """The subject CN of a TLS connection's (verified) client certificate; None for a
    plain connection or a client without one."""
    from twisted.internet.interfaces import ISSLTransport

    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    certificate = transport.getPeerCertificate()
    if certificate is None:
        return None
    return certificate.get_subject().commonName  # type: ignore[attr-defined]  # an X509, typed object


class PeTls:
    """``--pe-tls``: how this PU or PE reaches PEs' session ports over TLS. The options of
    a ``tls:`` client string without host and port, e.g.
    ``trustRoots=/etc/xenpool/ca:certificate=pu.pem:privateKey=pu.key``: the PE's
    certificate must be signed by a CA in ``trustRoots`` and name the address the pool
    gives for it (an IP address SAN); ``certificate`` is this side's client certificate."""

    def __init__(self, options: str) -> None:
        _args, kwargs = _parse("tls:" + options)
        unknown = set(kwargs) - {"certificate", "privateKey", "trustRoots"}
        if unknown:
            raise ValueError(
                f"unknown option {sorted(unknown)[0]!r} (known: trustRoots, certificate, privateKey)"
            )
        for key, path in kwargs.items():
            if not FilePath(path).exists():
                raise ValueError(f"{key}={path}: no such file or directory")
        self.options = options
        self._trust = (
            endpoints._parseTrustRootPath(kwargs["trustRoots"])
            if "trustRoots" in kwargs
            else None
        )
        self._certificate = endpoints._privateCertFromPaths(
            kwargs.get("certificate"), kwargs.get("privateKey")
        )

    def endpoint(self, reactor, host: str, port: int, timeout: float):
        """A TLS client endpoint to a PE's session port at ``host`` (an address)."""
        from twisted.internet import ssl

        kind = (
            endpoints.TCP6ClientEndpoint
            if ":" in host
            else endpoints.TCP4ClientEndpoint
        )
        return endpoints.wrapClientTLS(
            ssl.optionsForClientTLS(
                host, trustRoot=self._trust, clientCertificate=self._certificate
            ),
            kind(reactor, host, port, timeout=timeout),
        )

    def __repr__(self) -> str:
        return f"PeTls({self.options!r})"
