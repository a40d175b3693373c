"""Device identity tooling: keys, certificates and the lab PKI used by tests and demos."""

from provisioning.pki import (
    LabFiles,
    PkiError,
    create_ca,
    generate_key,
    issue_certificate,
    make_lab_pki,
    write_certificate,
    write_private_key,
)

__all__ = [
    "LabFiles",
    "PkiError",
    "create_ca",
    "generate_key",
    "issue_certificate",
    "make_lab_pki",
    "write_certificate",
    "write_private_key",
]
