"""`citygate provision`: the gateway key, its CSR, the lab CA and installing the certificate.

Run as a technician runs them: `citygate` as a subprocess, real key files and
modes, real CSRs signed by the device key, real certificates from a lab CA,
checked afterwards with the agent's own `load_identity`.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity import load_identity
from agent.keys import kid_for
from provisioning import identity_tools, pki
from provisioning.identity_tools import generate_device_key, hardware_serial
from provisioning.pki import LabFiles
from tests.agentrig import citygate

pytestmark = pytest.mark.integration


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_config(directory: Path, ca: Path) -> Path:
    """A gateway config whose identity files live in `directory/identity`."""
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[gateway]
state_dir = "{directory / "state"}"
[identity]
key = "identity/device.key"
cert = "identity/device.crt"
ca = "{ca}"
[broker]
host = "localhost"
"""
    )
    return path


@pytest.fixture
def lab_ca(tmp_path: Path) -> Path:
    """A lab CA made by `citygate provision ca init`."""
    directory = tmp_path / "lab-ca"
    result = citygate("provision", "ca", "init", str(directory))
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture
def config(tmp_path: Path, lab_ca: Path) -> Path:
    return _write_config(tmp_path, lab_ca / "ca.crt")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 0 (inherited by the subprocess): only the code's own modes protect."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _key(path: Path) -> object:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _keygen(config: Path, *extra: str) -> Path:
    result = citygate("provision", "keygen", "--config", str(config), *extra)
    assert result.returncode == 0, result.stderr
    return config.parent / "identity" / "device.key"


def _csr(config: Path, gateway_id: str, *extra: str) -> Path:
    out = config.parent / f"{gateway_id}.csr"
    result = citygate(
        "provision", "csr", "--config", str(config), "--gateway-id", gateway_id,
        "--out", str(out), *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def _sign(ca_dir: Path, csr: Path, days: int = 365) -> Path:
    out = csr.with_suffix(".crt")
    result = citygate(
        "provision", "ca", "sign", str(ca_dir), str(csr), "--days", str(days), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    return out


# -- help ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["provision"],
        ["provision", "keygen"],
        ["provision", "csr"],
        ["provision", "install-cert"],
        ["provision", "ca"],
        ["provision", "ca", "init"],
        ["provision", "ca", "sign"],
    ],
)
def test_every_provision_command_has_help(command: list[str]) -> None:
    result = citygate(*command, "--help")
    assert result.returncode == 0
    assert "usage: citygate provision" in result.stdout


@pytest.mark.parametrize(
    "command", [["provision"], ["provision", "ca"], ["provision", "ca", "sign"]]
)
def test_the_lab_ca_is_marked_as_a_lab_tool_in_its_help(command: list[str]) -> None:
    assert "LAB TOOL" in " ".join(citygate(*command, "--help").stdout.split())


# -- keygen ----------------------------------------------------------------------------


@pytest.mark.usefixtures("open_umask")
def test_keygen_writes_an_ed25519_key_only_its_owner_can_read_where_the_config_says(
    config: Path,
) -> None:
    result = citygate("provision", "keygen", "--config", str(config))
    assert result.returncode == 0, result.stderr
    path = config.parent / "identity" / "device.key"
    key = _key(path)
    assert isinstance(key, Ed25519PrivateKey)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert kid_for(key.public_key()).hex() in result.stdout
    assert [p.name for p in path.parent.iterdir()] == ["device.key"]  # no temporary files


def test_keygen_never_prints_the_private_key(config: Path) -> None:
    result = citygate("provision", "keygen", "--config", str(config))
    key = _key(config.parent / "identity" / "device.key")
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem_body = "".join((config.parent / "identity" / "device.key").read_text().splitlines()[1:-1])
    output = result.stdout + result.stderr
    assert "PRIVATE KEY" not in output
    assert pem_body not in output.replace("\n", "")
    assert raw.hex() not in output


def test_keygen_with_ec_writes_an_ecdsa_p256_key(config: Path) -> None:
    key = _key(_keygen(config, "--ec"))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_keygen_refuses_to_replace_an_existing_key_without_force(config: Path) -> None:
    path = _keygen(config)
    before = path.read_bytes()
    result = citygate("provision", "keygen", "--config", str(config))
    assert result.returncode == 1
    assert "already holds a key" in result.stderr
    assert "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before


def test_keygen_with_force_replaces_the_key_and_keeps_the_old_one(config: Path) -> None:
    path = _keygen(config)
    before = path.read_bytes()
    result = citygate("provision", "keygen", "--config", str(config), "--force")
    assert result.returncode == 0, result.stderr
    old = path.with_name("device.key.old")
    assert old.read_bytes() == before
    assert path.read_bytes() != before
    assert _mode(old) == 0o600
    assert _mode(path) == 0o600
    assert "device.key.old" in result.stdout


def test_keygen_into_a_directory_without_a_config_names_the_key_gateway_key(
    tmp_path: Path,
) -> None:
    result = citygate(
        "provision", "keygen", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path)
    )
    assert result.returncode == 1  # an explicit --config must exist
    assert "none.toml" in result.stderr
    if Path("/etc/citygate/gateway.toml").exists():
        pytest.skip("this machine has a gateway config; the default would be used")
    result = citygate("provision", "keygen", "--out", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    assert _mode(tmp_path / "keys" / "gateway.key") == 0o600


def test_keygen_refuses_an_owner_that_does_not_exist(config: Path) -> None:
    result = citygate("provision", "keygen", "--config", str(config), "--owner", "no-such-user-x")
    assert result.returncode == 1
    assert "no user 'no-such-user-x'" in result.stderr
    assert not (config.parent / "identity" / "device.key").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_keygen_as_root_gives_the_key_to_the_service_user(config: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    path = _keygen(config, "--owner", "nobody")
    assert path.stat().st_uid == nobody.pw_uid
    assert path.parent.stat().st_uid == nobody.pw_uid
    assert _mode(path) == 0o600


def test_a_crash_before_the_rename_leaves_the_old_key_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.key"
    generate_device_key(path)
    before = path.read_bytes()

    rename = os.replace

    def power_cut(source: Path, target: Path) -> None:
        if Path(target) == path:  # the moment the new key would take the name
            raise OSError("power cut")
        rename(source, target)

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        generate_device_key(path, force=True)
    assert path.read_bytes() == before
    assert path.with_name("gateway.key.old").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.key", "gateway.key.old"]


def test_a_full_disk_while_writing_the_key_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.key"

    def disk_full(*_: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        generate_device_key(path)
    assert list(tmp_path.iterdir()) == []


def test_a_csr_can_be_written_where_file_modes_cannot_be_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fat(*_: object) -> None:  # what a FAT-formatted USB stick answers
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", fat)
    pki.write_file_atomically(tmp_path / "gw-1.csr", b"request", 0o644)
    assert (tmp_path / "gw-1.csr").read_bytes() == b"request"
    with pytest.raises(PermissionError):  # but a key is never left with modes unset
        pki.write_file_atomically(tmp_path / "gateway.key", b"secret", 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw-1.csr"]


# -- csr -------------------------------------------------------------------------------


def test_csr_names_the_gateway_and_is_signed_by_the_device_key(config: Path) -> None:
    key = _key(_keygen(config))
    assert isinstance(key, Ed25519PrivateKey)
    csr = x509.load_pem_x509_csr(_csr(config, "gw-17").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-17"
    assert csr.public_key() == key.public_key()
    serials = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    board = hardware_serial()
    assert serials == ([board] if board else [])  # /etc/machine-id is never used


def test_csr_carries_the_serial_number_given_for_the_board(config: Path) -> None:
    _keygen(config, "--ec")
    csr = x509.load_pem_x509_csr(_csr(config, "gw-17", "--serial", "10000000abcdef01").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "2.5.4.5=10000000abcdef01,CN=gw-17"


def test_csr_is_written_next_to_the_key_or_to_standard_output(config: Path) -> None:
    _keygen(config)
    result = citygate("provision", "csr", "--config", str(config), "--gateway-id", "gw-1")
    assert result.returncode == 0, result.stderr
    assert (config.parent / "identity" / "gw-1.csr").exists()
    result = citygate(
        "provision", "csr", "--config", str(config), "--gateway-id", "gw-1", "--out", "-"
    )
    assert x509.load_pem_x509_csr(result.stdout.encode()).is_signature_valid


@pytest.mark.parametrize("gateway_id", ["gw/1", "gw 1", "gw+", "#", "x" * 65])
def test_csr_refuses_a_gateway_id_that_cannot_be_a_topic_level(
    config: Path, gateway_id: str
) -> None:
    _keygen(config)
    result = citygate("provision", "csr", "--config", str(config), "--gateway-id", gateway_id)
    assert result.returncode == 1
    assert "is not a valid gateway id" in result.stderr


def test_csr_refuses_a_key_others_can_read_and_names_chmod(config: Path) -> None:
    path = _keygen(config)
    path.chmod(0o644)
    result = citygate("provision", "csr", "--config", str(config), "--gateway-id", "gw-1")
    assert result.returncode == 1
    assert f"run chmod 600 {path}" in result.stderr


def test_hardware_serial_comes_from_the_device_tree_only(tmp_path: Path) -> None:
    proc, sysfs = tmp_path / "proc-serial", tmp_path / "sys-serial"
    assert hardware_serial((proc, sysfs)) is None
    sysfs.write_bytes(b"00000000c0ffee42\x00")
    assert hardware_serial((proc, sysfs)) == "00000000c0ffee42"
    proc.write_bytes(b"10000000abcdef01\x00junk")
    assert hardware_serial((proc, sysfs)) == "10000000abcdef01"
    proc.write_bytes(b"\xff\xfe<bad>\x00")
    assert hardware_serial((proc, sysfs)) == "00000000c0ffee42"  # unusable: the next source
    assert Path("/etc/machine-id") not in identity_tools.SERIAL_SOURCES


# -- the lab CA ------------------------------------------------------------------------


def test_ca_init_makes_a_private_ca_key_and_a_ca_certificate(lab_ca: Path) -> None:
    assert _mode(lab_ca / "ca.key") == 0o600
    cert = x509.load_pem_x509_certificate((lab_ca / "ca.crt").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_ca_init_never_overwrites_a_ca(lab_ca: Path) -> None:
    before = (lab_ca / "ca.key").read_bytes()
    result = citygate("provision", "ca", "init", str(lab_ca))
    assert result.returncode == 1
    assert "already holds a CA" in result.stderr
    assert (lab_ca / "ca.key").read_bytes() == before


def _hostile_csr(directory: Path, *, cn: str = "gw-5") -> tuple[Path, Ed25519PrivateKey]:
    """A CSR asking for more than a gateway may have: an organisation, CA rights, a SAN."""
    key = Ed25519PrivateKey.generate()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "10000000feedbeef"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
        ]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("broker.example")]), False)
        .sign(key, None)
    )
    path = directory / "request.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path, key


def test_ca_sign_copies_only_the_common_name_and_serial_number(
    lab_ca: Path, tmp_path: Path
) -> None:
    csr_path, key = _hostile_csr(tmp_path)
    result = citygate("provision", "ca", "sign", str(lab_ca), str(csr_path), "--days", "90")
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "gw-5.crt").read_bytes())
    assert cert.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "gw-5"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "10000000feedbeef"),
        ]
    )
    assert cert.public_key() == key.public_key()
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=89) < lifetime <= timedelta(days=90)
    ca = x509.load_pem_x509_certificate((lab_ca / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (lab_ca / "issued" / f"{cert.serial_number:x}.crt").read_bytes() == (
        tmp_path / "gw-5.crt"
    ).read_bytes()


def test_ca_sign_refuses_a_csr_whose_signature_does_not_verify(
    lab_ca: Path, tmp_path: Path
) -> None:
    csr_path, _ = _hostile_csr(tmp_path)
    der = bytearray(x509.load_pem_x509_csr(csr_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    ))  # fmt: skip
    der[-1] ^= 0x01  # the last byte belongs to the signature
    csr_path.write_bytes(bytes(der))
    result = citygate("provision", "ca", "sign", str(lab_ca), str(csr_path), "--days", "30")
    assert result.returncode == 1
    assert "invalid signature" in result.stderr
    assert not (tmp_path / "gw-5.crt").exists()


def test_ca_sign_refuses_a_common_name_that_is_not_a_gateway_id(
    lab_ca: Path, tmp_path: Path
) -> None:
    csr_path, _ = _hostile_csr(tmp_path, cn="gw/../../etc")
    result = citygate("provision", "ca", "sign", str(lab_ca), str(csr_path), "--days", "30")
    assert result.returncode == 1
    assert "not a valid gateway id" in result.stderr


def test_ca_sign_refuses_an_rsa_key(lab_ca: Path, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-rsa")]))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "rsa.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = citygate("provision", "ca", "sign", str(lab_ca), str(path), "--days", "30")
    assert result.returncode == 1
    assert "not Ed25519 or ECDSA P-256" in result.stderr


# -- install-cert ----------------------------------------------------------------------


def test_keygen_csr_sign_install_gives_an_identity_the_agent_accepts(
    config: Path, lab_ca: Path
) -> None:
    key_path = _keygen(config)
    cert = _sign(lab_ca, _csr(config, "gw-42", "--serial", "10000000abcdef01"))
    result = citygate("provision", "install-cert", "--config", str(config), str(cert))
    assert result.returncode == 0, result.stderr
    assert "gateway gw-42" in result.stdout
    installed = config.parent / "identity" / "device.crt"
    identity = load_identity(key_path, installed, lab_ca / "ca.crt")
    assert identity.gateway_id == "gw-42"
    assert _mode(installed) == 0o644
    assert not installed.with_name("device.crt.old").exists()  # nothing was replaced


def test_install_cert_refuses_a_certificate_for_another_key(
    config: Path, lab_ca: Path, tmp_path: Path
) -> None:
    _keygen(config)
    other, _ = _hostile_csr(tmp_path)
    cert = _sign(lab_ca, other)
    result = citygate("provision", "install-cert", "--config", str(config), str(cert))
    assert result.returncode == 1
    assert "is for another key" in result.stderr
    assert not (config.parent / "identity" / "device.crt").exists()


def test_install_cert_refuses_a_certificate_from_another_ca(config: Path, tmp_path: Path) -> None:
    _keygen(config)
    citygate("provision", "ca", "init", str(tmp_path / "rogue"))
    cert = _sign(tmp_path / "rogue", _csr(config, "gw-42"))
    result = citygate("provision", "install-cert", "--config", str(config), str(cert))
    assert result.returncode == 1
    assert "was not issued by any CA in" in result.stderr
    assert not (config.parent / "identity" / "device.crt").exists()


def test_install_cert_keeps_the_previous_certificate_as_old(config: Path, lab_ca: Path) -> None:
    _keygen(config)
    csr = _csr(config, "gw-42")
    first = _sign(lab_ca, csr)
    result = citygate("provision", "install-cert", "--config", str(config), str(first))
    assert result.returncode == 0, result.stderr
    first_bytes = first.read_bytes()
    second = _sign(lab_ca, csr, days=30)  # the same file name: signed again
    result = citygate("provision", "install-cert", "--config", str(config), str(second))
    assert result.returncode == 0, result.stderr
    installed = config.parent / "identity" / "device.crt"
    assert installed.with_name("device.crt.old").read_bytes() == first_bytes
    assert installed.read_bytes() == second.read_bytes()


def test_install_cert_appends_the_chain_and_refuses_one_that_does_not_link(
    config: Path, lab_ca: Path, lab: LabFiles
) -> None:
    _keygen(config)
    cert = _sign(lab_ca, _csr(config, "gw-42"))
    result = citygate(
        "provision", "install-cert", "--config", str(config), str(cert),
        "--chain", str(lab.ca_cert),
    )  # fmt: skip
    assert result.returncode == 1
    assert "was not issued by" in result.stderr
    result = citygate(
        "provision", "install-cert", "--config", str(config), str(cert),
        "--chain", str(lab_ca / "ca.crt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    installed = x509.load_pem_x509_certificates(
        (config.parent / "identity" / "device.crt").read_bytes()
    )
    assert [c.subject.rfc4514_string() for c in installed] == ["CN=gw-42", "CN=citygate lab CA"]


def test_install_cert_on_a_first_enrollment_installs_the_ca_bundle_that_came_with_it(
    tmp_path: Path, lab_ca: Path
) -> None:
    config = _write_config(tmp_path, Path("identity/ca.crt"))  # no CA on the gateway yet
    key_path = _keygen(config)
    cert = _sign(lab_ca, _csr(config, "gw-42"))
    result = citygate("provision", "install-cert", "--config", str(config), str(cert))
    assert result.returncode == 1
    assert "CA file" in result.stderr
    assert "does not exist" in result.stderr
    result = citygate(
        "provision", "install-cert", "--config", str(config), str(cert),
        "--ca", str(lab_ca / "ca.crt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    installed_ca = tmp_path / "identity" / "ca.crt"
    assert installed_ca.read_bytes() == (lab_ca / "ca.crt").read_bytes()
    identity = load_identity(key_path, tmp_path / "identity" / "device.crt", installed_ca)
    assert identity.gateway_id == "gw-42"


def test_install_cert_never_replaces_an_installed_ca_bundle(
    config: Path, lab_ca: Path, tmp_path: Path
) -> None:
    _keygen(config)
    citygate("provision", "ca", "init", str(tmp_path / "rogue"))
    cert = _sign(tmp_path / "rogue", _csr(config, "gw-42"))
    before = (lab_ca / "ca.crt").read_bytes()
    result = citygate(
        "provision", "install-cert", "--config", str(config), str(cert),
        "--ca", str(tmp_path / "rogue" / "ca.crt"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "another CA bundle is installed" in result.stderr
    assert (lab_ca / "ca.crt").read_bytes() == before
    assert not (config.parent / "identity" / "device.crt").exists()


def test_install_cert_refuses_a_file_that_is_not_a_certificate(
    config: Path, tmp_path: Path
) -> None:
    _keygen(config)
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    result = citygate("provision", "install-cert", "--config", str(config), str(junk))
    assert result.returncode == 1
    assert "holds no PEM certificate" in result.stderr
