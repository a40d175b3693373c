"""Real mutual-TLS handshakes with mosquitto: our contexts, both key types, TLS 1.2 and 1.3."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import load_identity
from agent.tls import client_context, verifier_context
from provisioning.broker import LabBroker
from provisioning.pki import (
    LabFiles,
    generate_key,
    issue_certificate,
    write_certificate,
    write_private_key,
)

pytestmark = pytest.mark.integration

# MQTT 3.1.1 CONNECT: protocol "MQTT" level 4, clean session, keep-alive 60 s, empty client id.
_CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 60, 0, 0])
_CONNACK_ACCEPTED = bytes([0x20, 2, 0, 0])


@pytest.fixture(scope="module")
def clients(
    lab: LabFiles, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """gw-a (Ed25519, from the shared lab) and gw-p256 (ECDSA P-256, issued here)."""
    directory = tmp_path_factory.mktemp("p256")
    ca_key = serialization.load_pem_private_key(lab.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(lab.ca_cert.read_bytes())
    key = generate_key("p256")
    cert = issue_certificate(ca_cert, ca_key, "gw-p256", key.public_key(), days=5)
    write_private_key(directory / "gw-p256.key", key)
    write_certificate(directory / "gw-p256.crt", cert)
    return {
        "gw-a": lab.clients["gw-a"],
        "gw-p256": (directory / "gw-p256.crt", directory / "gw-p256.key"),
    }


@pytest.fixture(scope="module")
def tls_broker(lab: LabFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabBroker]:
    with LabBroker(
        tmp_path_factory.mktemp("tls-broker"),
        ca_cert=lab.ca_cert,
        server_cert=lab.server_cert,
        server_key=lab.server_key,
    ) as running:
        yield running


def _connack(context: ssl.SSLContext, port: int, hostname: str) -> tuple[str | None, bytes]:
    """Handshake, send CONNECT, return (TLS version, whatever came back before EOF)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        version = tls.version()
        reply = b""
        try:
            tls.sendall(_CONNECT)
            while len(reply) < 4:
                chunk = tls.recv(4 - len(reply))
                if not chunk:
                    break
                reply += chunk
        except (ssl.SSLError, ConnectionError):
            pass
        return version, reply


@pytest.mark.parametrize("client", ["gw-a", "gw-p256"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_mosquitto_accepts_the_gateway_identity_over_mutual_tls(
    lab: LabFiles,
    clients: dict[str, tuple[Path, Path]],
    tls_broker: LabBroker,
    client: str,
    version: ssl.TLSVersion,
) -> None:
    cert, key = clients[client]
    context = client_context(load_identity(key, cert, lab.ca_cert))
    context.maximum_version = version
    negotiated, reply = _connack(context, tls_broker.port, "localhost")
    expected = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert negotiated == expected
    assert reply == _CONNACK_ACCEPTED, tls_broker.log_path.read_text()


def test_client_context_refuses_anything_older_than_tls12(lab: LabFiles) -> None:
    cert, key = lab.clients["gw-a"]
    context = client_context(load_identity(key, cert, lab.ca_cert))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_broker_certificate_for_another_host_name_fails_verification(
    lab: LabFiles, tls_broker: LabBroker
) -> None:
    cert, key = lab.clients["gw-a"]
    context = client_context(load_identity(key, cert, lab.ca_cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        _connack(context, tls_broker.port, "wrong.example")


def test_broker_refuses_a_client_certificate_from_another_ca(
    lab: LabFiles, other_lab: LabFiles, tls_broker: LabBroker
) -> None:
    cert, key = other_lab.clients["gw-a"]
    context = verifier_context(cert, key, lab.ca_cert)
    try:
        _, reply = _connack(context, tls_broker.port, "localhost")
    except (ssl.SSLError, ConnectionError):
        reply = b""
    assert reply != _CONNACK_ACCEPTED
