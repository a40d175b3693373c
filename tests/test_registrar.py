"""The registrar's decisions, its token file and its revocation list, with real files.

Requests are built as gateways build them (real keys, real CSRs, real
certificates from a lab CA) and decided by the real `Registrar`; tokens live in
a real token file; revocation goes through `citygate provision revoke` and a
real mosquitto that reads the CRL. The helpers at the top (an online lab: a
fleet CA with a registrar identity, a claim CA, an allow-list, a CRL, and a
broker with an enrollment listener) are shared with test_enroll and
test_rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.identity import load_identity
from agent.keys import PrivateKey, spki_der
from agent.mqtt import ConnectFailed, Session, SessionSettings
from agent.rotation import (
    EnrollReply,
    EnrollRequest,
    new_request_id,
    proof_message,
    request_topic,
    sign_proof,
)
from provisioning.broker import LabBroker
from provisioning.identity_tools import build_csr, csr_pem
from provisioning.labca import init_ca, load_ca
from provisioning.pki import LabFiles, make_lab_pki, write_file_atomically
from provisioning.registrar import AllowList, Refused, Registrar, serve
from provisioning.tokens import TokenStore, digest_of, issue_claim, read_crl, write_crl
from tests.agentrig import citygate

pytestmark = pytest.mark.integration


# -- the online lab (shared with test_enroll and test_rotation) ------------------------------


@dataclass(frozen=True)
class OnlineLab:
    files: LabFiles  # the fleet CA (also a lab CA directory) and client identities
    ca_dir: Path
    claim_ca: Path  # the claim CA's certificate
    claim_dir: Path
    tokens: Path
    allow: Path
    crl: Path

    def claim(self, gateway_id: str, directory: Path) -> tuple[Path, Path]:
        """The claim certificate and key of `gateway_id`, written into `directory`."""
        key_pem, cert_pem = issue_claim(load_ca(self.claim_dir), gateway_id, days=30)
        directory.mkdir(parents=True, exist_ok=True)
        write_file_atomically(directory / "claim.key", key_pem, 0o600)
        write_file_atomically(directory / "claim.crt", cert_pem, 0o644)
        return directory / "claim.crt", directory / "claim.key"

    def registrar(self, *, clock: object = time.time, days: int = 30) -> Registrar:
        assert callable(clock)
        return Registrar(
            load_ca(self.ca_dir),
            TokenStore(self.tokens),
            AllowList(self.allow),
            days=days,
            crl_path=self.crl,
            clock=clock,
        )


def make_online_lab(directory: Path, *, allow: tuple[str, ...] = ("gw-a", "gw-new")) -> OnlineLab:
    files = make_lab_pki(directory / "ca", clients=["gw-a", "gw-b", "registrar", "verifier"])
    claim_dir = directory / "claim-ca"
    init_ca(claim_dir, name="citygate lab claim CA", days=30)
    allow_file = directory / "allow.txt"
    allow_file.write_text("# gateways that may enroll\n" + "".join(f"{g}\n" for g in allow))
    crl = directory / "ca" / "crl.pem"
    write_crl(load_ca(directory / "ca"), crl)
    return OnlineLab(
        files, directory / "ca", claim_dir / "ca.crt", claim_dir, directory / "tokens.json",
        allow_file, crl,
    )  # fmt: skip


@contextlib.contextmanager
def online_broker(lab: OnlineLab, workdir: Path) -> Iterator[LabBroker]:
    """mosquitto with the CRL, the registrar's ACL lines and the enrollment listener."""
    with LabBroker(
        workdir,
        ca_cert=lab.files.ca_cert,
        server_cert=lab.files.server_cert,
        server_key=lab.files.server_key,
        registrars=("registrar",),
        crl=lab.crl,
        claim_ca=lab.claim_ca,
    ) as broker:
        yield broker


def client_settings(lab: OnlineLab, broker: LabBroker, name: str) -> SessionSettings:
    cert, key = lab.files.clients[name]
    return broker.session_settings(cert, key, lab.files.ca_cert, client_id=name)


@contextlib.asynccontextmanager
async def running_registrar(
    registrar: Registrar, lab: OnlineLab, broker: LabBroker
) -> AsyncIterator[None]:
    """The real registrar service (`serve`) in this event loop, until the block ends."""
    cert, key = lab.files.clients["registrar"]
    settings = broker.session_settings(cert, key, lab.files.ca_cert, client_id="registrar")
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(registrar, settings, stop, ready=ready))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        yield
    finally:
        stop.set()
        await task


# -- requests as gateways make them --------------------------------------------------------------


def enrollment(gateway_id: str, token: str, key: PrivateKey | None = None) -> EnrollRequest:
    key = key or Ed25519PrivateKey.generate()
    csr = csr_pem(build_csr(key, gateway_id, None)).decode()
    return EnrollRequest(gateway_id, new_request_id(), csr, token=token)


def renewal(
    gateway_id: str, current_key: PrivateKey, current_cert: x509.Certificate, new_key: PrivateKey
) -> EnrollRequest:
    csr = build_csr(new_key, gateway_id, None)
    request_id = new_request_id()
    proof = sign_proof(
        current_key,
        proof_message(gateway_id, request_id, csr.public_bytes(serialization.Encoding.DER)),
    )
    return EnrollRequest(
        gateway_id,
        request_id,
        csr_pem(csr).decode(),
        certificate_pem=current_cert.public_bytes(serialization.Encoding.PEM).decode(),
        proof=proof,
    )


def _gw_a(lab: OnlineLab) -> tuple[PrivateKey, x509.Certificate]:
    cert_path, key_path = lab.files.clients["gw-a"]
    identity = load_identity(key_path, cert_path, lab.files.ca_cert)
    return identity.key, identity.certificate


@pytest.fixture
def lab(tmp_path: Path) -> OnlineLab:
    return make_online_lab(tmp_path)


def _refusal(registrar: Registrar, gateway_id: str, request: EnrollRequest) -> str:
    with pytest.raises(Refused) as refused:
        registrar.decide(gateway_id, request)
    return refused.value.code


# -- tokens ---------------------------------------------------------------------------------------


def test_token_is_printed_once_and_only_its_hash_is_stored(lab: OnlineLab) -> None:
    made = citygate(
        "provision", "token", "new", "--tokens", str(lab.tokens), "--gateway-id", "gw-new",
        "--valid-hours", "2", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    stored = lab.tokens.read_text()
    assert token not in stored
    assert token.replace("-", "") not in stored
    assert digest_of(token) in stored
    assert lab.tokens.stat().st_mode & 0o077 == 0
    listed = citygate("provision", "token", "list", "--tokens", str(lab.tokens))
    assert "gw-new" in listed.stdout
    assert "valid until" in listed.stdout
    assert token not in listed.stdout


def test_enrollment_with_a_valid_token_issues_a_client_certificate_for_the_csr_key(
    lab: OnlineLab,
) -> None:
    token, _ = TokenStore(lab.tokens).issue("gw-new", valid_s=3600, now=time.time())
    key = Ed25519PrivateKey.generate()
    issued = lab.registrar(days=10).decide("gw-new", enrollment("gw-new", token, key))
    cert = issued.cert
    assert spki_der(key.public_key()) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert cert.subject.rfc4514_string() == "CN=gw-new"
    assert 9 <= (cert.not_valid_after_utc - datetime.now(UTC)).days <= 10
    record = TokenStore(lab.tokens).records()[0]
    assert record.used_at is not None
    assert record.serial == f"{cert.serial_number:x}"


def test_a_used_token_is_refused_for_another_key(lab: OnlineLab) -> None:
    token, _ = TokenStore(lab.tokens).issue("gw-new", valid_s=3600, now=time.time())
    registrar = lab.registrar()
    registrar.decide("gw-new", enrollment("gw-new", token))
    assert _refusal(registrar, "gw-new", enrollment("gw-new", token)) == "token-used"


def test_the_same_key_asking_again_gets_the_same_certificate_not_a_second_one(
    lab: OnlineLab,
) -> None:
    token, _ = TokenStore(lab.tokens).issue("gw-new", valid_s=3600, now=time.time())
    key = Ed25519PrivateKey.generate()
    registrar = lab.registrar()
    first = registrar.decide("gw-new", enrollment("gw-new", token, key))
    again = registrar.decide("gw-new", enrollment("gw-new", token, key))  # the reply was lost
    assert again.cert == first.cert
    assert len(list((lab.ca_dir / "issued").iterdir())) == 1


def test_an_expired_token_is_refused(lab: OnlineLab) -> None:
    token, _ = TokenStore(lab.tokens).issue("gw-new", valid_s=60, now=time.time())
    later = lab.registrar(clock=lambda: time.time() + 61)
    assert _refusal(later, "gw-new", enrollment("gw-new", token)) == "token-expired"


def test_a_token_for_another_gateway_is_refused_and_stays_usable_for_its_own(
    lab: OnlineLab,
) -> None:
    token, _ = TokenStore(lab.tokens).issue("gw-new", valid_s=3600, now=time.time())
    registrar = lab.registrar()
    assert _refusal(registrar, "gw-a", enrollment("gw-a", token)) == "token-other-gateway"
    registrar.decide("gw-new", enrollment("gw-new", token))


def test_an_unknown_token_is_refused(lab: OnlineLab) -> None:
    request = enrollment("gw-new", "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGG-HHHH")
    assert _refusal(lab.registrar(), "gw-new", request) == "token-unknown"


def test_a_gateway_off_the_allow_list_is_refused_even_with_a_valid_token(
    lab: OnlineLab,
) -> None:
    store = TokenStore(lab.tokens)
    token, _ = store.issue("gw-b", valid_s=3600, now=time.time())
    registrar = lab.registrar()
    assert _refusal(registrar, "gw-b", enrollment("gw-b", token)) == "not-allowed"
    assert store.records()[0].used_at is None  # refused before the token was touched
    lab.allow.write_text("gw-a\ngw-b\n")  # operations add it: no restart needed
    future = time.time() + 5
    os.utime(lab.allow, (future, future))
    registrar.decide("gw-b", enrollment("gw-b", token))


def test_a_request_must_come_on_the_topic_of_the_gateway_it_names(lab: OnlineLab) -> None:
    token, _ = TokenStore(lab.tokens).issue("gw-new", valid_s=3600, now=time.time())
    assert _refusal(lab.registrar(), "gw-a", enrollment("gw-new", token)) == "bad-request"


def test_a_csr_for_another_common_name_is_refused(lab: OnlineLab) -> None:
    token, _ = TokenStore(lab.tokens).issue("gw-new", valid_s=3600, now=time.time())
    forged = enrollment("gw-a", token)  # a CSR with CN=gw-a ...
    request = EnrollRequest("gw-new", forged.request_id, forged.csr_pem, token=token)
    assert _refusal(lab.registrar(), "gw-new", request) == "bad-csr"  # ... sent as gw-new


def test_only_one_of_many_simultaneous_redemptions_of_a_token_succeeds(lab: OnlineLab) -> None:
    store = TokenStore(lab.tokens)
    token, _ = store.issue("gw-new", valid_s=3600, now=time.time())
    results: list[str] = []

    def redeem(n: int) -> None:
        key_sha256 = hashlib.sha256(f"key-{n}".encode()).hexdigest()
        try:
            TokenStore(lab.tokens).redeem(
                token, gateway_id="gw-new", request_id=f"{n:016x}", key_sha256=key_sha256,
                now=time.time(),
            )  # fmt: skip
            results.append("ok")
        except Exception as exc:  # counted below
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=redeem, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["TokenRefused"] * 7 + ["ok"]


def test_malformed_requests_get_no_certificate_and_no_reply(lab: OnlineLab) -> None:
    registrar = lab.registrar()
    topic = request_topic("citygate", "gw-new")
    for payload in (b"", b"not json", b"[]", b'{"v": 9}', json.dumps({"v": 1}).encode()):
        assert registrar.handle(topic, payload) is None
    assert registrar.handle("citygate/gw-new/telemetry", b"{}") is None
    assert not (lab.ca_dir / "issued").exists()


def test_a_refusal_is_answered_on_the_gateways_reply_topic_with_a_reason(lab: OnlineLab) -> None:
    request = enrollment("gw-new", "AAAA-BBBB-CCCC-DDDD")
    answer = lab.registrar().handle(request_topic("citygate", "gw-new"), request.encode())
    assert answer is not None
    topic, reply = answer
    assert topic == "citygate/gw-new/enroll/reply"
    decoded = EnrollReply.decode(reply.encode())
    assert (decoded.ok, decoded.error, decoded.request_id) == (
        False,
        "token-unknown",
        request.request_id,
    )
    assert "not known" in decoded.message


# -- renewal ---------------------------------------------------------------------------------------


def test_renewal_with_a_proof_by_the_current_key_issues_a_certificate_for_the_new_key(
    lab: OnlineLab,
) -> None:
    key, cert = _gw_a(lab)
    new_key = Ed25519PrivateKey.generate()
    issued = lab.registrar().decide("gw-a", renewal("gw-a", key, cert, new_key))
    assert issued.kind == "renewal"
    assert issued.cert.subject == cert.subject
    assert issued.cert.serial_number != cert.serial_number


def test_renewal_without_the_current_key_is_refused(lab: OnlineLab) -> None:
    _, cert = _gw_a(lab)
    stranger = Ed25519PrivateKey.generate()  # e.g. a claim key, or an eavesdropper's
    request = renewal("gw-a", stranger, cert, Ed25519PrivateKey.generate())
    assert _refusal(lab.registrar(), "gw-a", request) == "bad-proof"


def test_renewal_for_the_same_key_is_refused(lab: OnlineLab) -> None:
    key, cert = _gw_a(lab)
    assert _refusal(lab.registrar(), "gw-a", renewal("gw-a", key, cert, key)) == "same-key"


def test_renewal_of_another_gateways_certificate_is_refused(lab: OnlineLab) -> None:
    cert_path, key_path = lab.files.clients["gw-b"]
    other = load_identity(key_path, cert_path, lab.files.ca_cert)
    request = renewal("gw-a", other.key, other.certificate, Ed25519PrivateKey.generate())
    assert _refusal(lab.registrar(), "gw-a", request) == "bad-certificate"


def test_renewal_of_an_expired_certificate_is_refused(lab: OnlineLab) -> None:
    key, cert = _gw_a(lab)
    later = lab.registrar(clock=lambda: time.time() + 40 * 86400)
    request = renewal("gw-a", key, cert, Ed25519PrivateKey.generate())
    assert _refusal(later, "gw-a", request) == "expired"


# -- revocation ------------------------------------------------------------------------------------


def test_a_revoked_certificate_is_not_renewed(lab: OnlineLab) -> None:
    cert_path, _ = lab.files.clients["gw-a"]
    revoked = citygate("provision", "revoke", "--ca", str(lab.ca_dir), str(cert_path))
    assert revoked.returncode == 0, revoked.stderr
    assert "kill -HUP" in revoked.stdout
    key, cert = _gw_a(lab)
    request = renewal("gw-a", key, cert, Ed25519PrivateKey.generate())
    assert _refusal(lab.registrar(), "gw-a", request) == "revoked"


def test_revocation_list_keeps_its_entries_when_signed_afresh(lab: OnlineLab) -> None:
    ca = load_ca(lab.ca_dir)
    write_crl(ca, lab.crl, add=0x1234)
    write_crl(ca, lab.crl)  # the registrar's daily refresh
    crl = read_crl(ca, lab.crl)
    assert crl is not None
    assert crl.get_revoked_certificate_by_serial_number(0x1234) is not None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - datetime.now(UTC) > timedelta(days=29)


def test_revoked_certificate_cannot_connect_once_the_broker_rereads_the_crl(
    lab: OnlineLab, tmp_path: Path
) -> None:
    cert_path, _ = lab.files.clients["gw-a"]

    async def connect(name: str, broker: LabBroker) -> None:
        session = await Session.open(client_settings(lab, broker, name))
        await session.close()

    async def scenario(broker: LabBroker) -> None:
        await connect("gw-a", broker)
        result = citygate("provision", "revoke", "--ca", str(lab.ca_dir), str(cert_path))
        assert result.returncode == 0, result.stderr
        broker.reload()
        await asyncio.sleep(0.3)
        with pytest.raises(ConnectFailed, match="no CONNACK"):
            await connect("gw-a", broker)
        await connect("gw-b", broker)  # the others are not affected

    with online_broker(lab, tmp_path / "broker") as broker:
        asyncio.run(scenario(broker))


def test_revoke_refuses_a_certificate_from_another_ca(lab: OnlineLab, tmp_path: Path) -> None:
    other = make_lab_pki(tmp_path / "other", clients=["gw-a"])
    result = citygate("provision", "revoke", "--ca", str(lab.ca_dir), str(other.clients["gw-a"][0]))
    assert result.returncode == 1
    assert "was not issued by the CA" in result.stderr
