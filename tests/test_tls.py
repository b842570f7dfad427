"""xenpool.tls: ssl: server strings with caCertsDir=, status endpoints on localhost,
the PE session port's endpoint form, --pe-tls, and a PE's session over real TLS
(loopback sockets, certificates the test makes)."""

from __future__ import annotations

import pytest
from twisted.internet import endpoints
from twisted.internet.task import Clock

from xenpool import tls
from xenpool.pe.tap import Options as PeOptions
from xenpool.registrar.tap import leases_file

from .certs import Authority


def test_status_listens_on_localhost_unless_told():
    assert tls.local_unless_told("tcp:8080") == "tcp:8080:interface=127.0.0.1"
    assert tls.local_unless_told("tcp6:8080") == "tcp6:8080:interface=\\:\\:1"
    assert tls.local_unless_told("tcp:8080:interface=0.0.0.0") == (
        "tcp:8080:interface=0.0.0.0"
    )
    assert tls.local_unless_told("unix:/run/x.sock") == "unix:/run/x.sock"


def test_listen_port():
    assert tls.listen_port("tcp:5001") == 5001
    assert tls.listen_port("ssl:port=5002:privateKey=k") == 5002
    with pytest.raises(ValueError, match="no port"):
        tls.listen_port("unix:/run/pe.sock")


def test_ssl_with_ca_certs_requires_client_certificates(tmp_path):
    ca = Authority(tmp_path)
    cert, key = ca.issue("host1")
    endpoint = tls.server_endpoint(
        Clock(),
        f"ssl:5001:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCertsDir={ca.trust}",
    )
    assert isinstance(endpoint, endpoints.SSL4ServerEndpoint)
    context = endpoint._sslContextFactory.getContext()
    from OpenSSL import SSL

    assert context.get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    plain = tls.server_endpoint(Clock(), "tcp:5001")
    assert isinstance(plain, endpoints.TCP4ServerEndpoint)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "key.pem").write_bytes(key.read_bytes())  # not a certificate
    with pytest.raises(ValueError, match="no \\*.pem"):
        tls.server_endpoint(
            Clock(),
            f"ssl:5001:privateKey={key}:certKey={cert}:caCertsDir={tmp_path / 'empty'}",
        )


def test_pe_options(tmp_path):
    ca = Authority(tmp_path)
    cert, key = ca.issue("host1")
    options = PeOptions()
    options.parseOptions(
        [
            "--libvirt-uri=test:///default",
            f"--listen=ssl:5009:privateKey={key}:certKey={cert}:caCertsDir={ca.trust}",
            f"--pe-tls=trustRoots={ca.trust}:certificate={cert}:privateKey={key}",
        ]
    )
    assert options.user_port == 5009 and options.pe_tls is not None
    for bad, message in [
        ("--pe-tls=trust=/x", "--pe-tls: unknown option 'trust'"),
        (f"--pe-tls=trustRoots={tmp_path / 'none'}", "no such file"),
        ("--listen=unix:/run/pe.sock", "--listen: no port"),
    ]:
        with pytest.raises(Exception, match=message):
            PeOptions().parseOptions(["--libvirt-uri=test:///default", bad])


def test_the_lease_file_of_an_ssl_endpoint_is_named_by_its_port(tmp_path):
    name = leases_file(
        "/var/lib/xenpool",
        "ssl:3863:interface=10.0.0.1:privateKey=/etc/k.pem:certKey=/etc/c.pem:caCertsDir=/etc/ca",
    ).name
    assert name == "vm-leases-ssl_3863_interface_10.0.0.1.json"
    assert leases_file(".", "tcp:3863").name == "vm-leases-tcp_3863.json"


def test_a_bad_ssl_endpoint_is_one_line(tmp_path):
    from xenpool.registrar.tap import Options as RegistrarOptions

    with pytest.raises(Exception, match="--listen: .*missing.key: No such file"):
        PeOptions().parseOptions(
            [
                "--libvirt-uri=test:///default",
                f"--listen=ssl:5001:privateKey={tmp_path / 'missing.key'}:caCertsDir={tmp_path}",
            ]
        )
    with pytest.raises(Exception, match="--asap .*missing.key: No such file"):
        RegistrarOptions().parseOptions(
            [
                f"--asap=ssl:3863:privateKey={tmp_path / 'missing.key'}",
                f"--state-dir={tmp_path}",
            ]
        )
