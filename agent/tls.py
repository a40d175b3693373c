"""Client-side TLS contexts for mutually authenticated MQTT.

Every context built here is a TLS client that verifies the server: TLS 1.2 or
newer, certificate required, host name checked against the broker's certificate.
It presents a client certificate and key so the broker can authenticate us.

Trust: the CA file is the only trust anchor (the system store is not loaded), so a
broker is accepted only with a certificate from the configured CA. The key and
certificate files are handed to OpenSSL as they are; `agent.identity` checks them
for the gateway itself.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.identity import Identity


def _mutual_tls_context(cert_path: Path, key_path: Path, ca_path: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca_path))
    context.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
    return context


def client_context(identity: Identity) -> ssl.SSLContext:
    """A TLS client context presenting the gateway's identity and trusting its CA bundle."""
    return _mutual_tls_context(identity.cert_path, identity.key_path, identity.ca_path)


def verifier_context(cert_path: Path, key_path: Path, ca_path: Path) -> ssl.SSLContext:
    """The same kind of context for other clients (e.g. the verifying subscriber)."""
    return _mutual_tls_context(cert_path, key_path, ca_path)
