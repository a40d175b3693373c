"""Certificate rotation: when, the wire format, renewal over the agent's session, power cuts.

Renewals run against a real mosquitto (with the registrar's ACL, an
enrollment listener and a CRL) and the real registrar service; power cuts are
SIGKILLs of a process that runs the rotation on real files, at every step;
the last tests run the real agent (`citygate run`) while a sensor emulator
feeds it, and check that every reading arrives, signed by the old key before
the switch and by the new one after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.backoff import Backoff
from agent.config import load_config
from agent.envelope import VerificationError
from agent.identity import Identity, load_identity
from agent.mqtt import Session, SessionSettings
from agent.rotation import (
    EnrollReply,
    EnrollRequest,
    ProtocolError,
    RenewalError,
    Rotation,
    adopt_staged,
    expiry_warning,
    failed_attempt,
    read_hold,
    recover_identity,
    renewal_due,
)
from agent.tls import client_context
from agent.verify import Verifier, trust_store
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import LabBroker
from provisioning.labca import load_ca
from provisioning.labconfig import LAB_TUNING, write_gateway_config
from provisioning.pki import write_certificate, write_private_key
from provisioning.tokens import write_crl
from tests.agentrig import AgentProcess
from tests.test_registrar import OnlineLab, make_online_lab, online_broker, running_registrar

pytestmark = pytest.mark.integration

STEPS = (
    "key-staged",
    "requested",
    "cert-staged",
    "trial-connected",
    "old-kept",
    "key-swapped",
    "cert-swapped",
)
SWAPPED = ("key-swapped", "cert-swapped")


# -- a gateway whose certificate is well into its life ---------------------------------------------


def _certificate(
    lab: OnlineLab, key: Ed25519PrivateKey, *, days: float, elapsed: float
) -> x509.Certificate:
    """A gateway certificate from the lab CA of which `elapsed` (a fraction) has passed."""
    ca = load_ca(lab.ca_dir)
    start = datetime.now(UTC) - timedelta(days=days * elapsed)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-a")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def _gateway(
    lab: OnlineLab,
    directory: Path,
    port: int,
    *,
    days: float = 3,
    elapsed: float = 0.7,
    sensors: dict[str, dict[str, object]] | None = None,
) -> Path:
    """gw-a's config and identity files in `directory`; its certificate `elapsed` through life."""
    identity = directory / "identity"
    identity.mkdir(parents=True)
    key = Ed25519PrivateKey.generate()
    write_private_key(identity / "gateway.key", key)
    write_certificate(identity / "gateway.crt", _certificate(lab, key, days=days, elapsed=elapsed))
    shutil.copy(lab.files.ca_cert, identity / "ca.crt")
    files = dataclasses.replace(
        lab.files,
        ca_cert=identity / "ca.crt",
        clients={"gw-a": (identity / "gateway.crt", identity / "gateway.key")},
    )
    tuning = {**LAB_TUNING, "rotation": {"reply_timeout_s": 5.0}}
    return write_gateway_config(
        directory / "gateway.toml",
        lab=files,
        gateway="gw-a",
        broker_port=port,
        state_dir=directory / "state",
        sensors=sensors or {},
        tuning=tuning,
    )


def _identity(config: Path) -> Identity:
    paths = load_config(config).identity
    return load_identity(paths.key, paths.cert, paths.ca)


async def _connect(config: Path) -> None:
    """Log in to the broker with the installed credential: CONNACK or ConnectFailed."""
    settings_of = load_config(config)
    identity = _identity(config)
    settings = SessionSettings(
        host="localhost",
        port=settings_of.broker.port,
        client_id=identity.gateway_id,
        tls=client_context(identity),
        connect_timeout_s=3.0,
    )
    session = await Session.open(settings)
    await session.close()


def _rotation(
    identity: Identity,
    config: Path,
    sessions: Callable[[], Awaitable[Session]],
    **options: object,
) -> Rotation:
    state_dir = load_config(config).gateway.state_dir
    return Rotation(identity, prefix="citygate", sessions=sessions, state_dir=state_dir, **options)  # type: ignore[arg-type]


async def _session_of(identity: Identity, port: int) -> Session:
    return await Session.open(
        SessionSettings(
            host="localhost",
            port=port,
            client_id=identity.gateway_id,
            tls=client_context(identity),
            connect_timeout_s=3.0,
        )
    )


@pytest.fixture
def lab(tmp_path: Path) -> OnlineLab:
    return make_online_lab(tmp_path / "lab")


# -- when, and the warnings ------------------------------------------------------------------------


def test_renewal_is_due_once_the_configured_fraction_of_the_lifetime_has_passed(
    lab: OnlineLab,
) -> None:
    cert = _certificate(lab, Ed25519PrivateKey.generate(), days=90, elapsed=0.0)
    start = cert.not_valid_before_utc
    assert renewal_due(cert, 0.667) - start == timedelta(days=90) * 0.667
    assert renewal_due(cert, 0.5) - start == timedelta(days=45)


def test_expiry_is_warned_under_thirty_days_at_start_and_then_once_a_day(
    lab: OnlineLab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _gateway(lab, tmp_path, 1, days=30, elapsed=0.7)
    identity = _identity(config)  # nine days left, less a moment

    async def never() -> Session:
        raise AssertionError("no session needed")

    rotation = _rotation(identity, config, never)
    now = datetime.now(UTC).timestamp()
    with caplog.at_level(logging.WARNING, logger="agent.rotation"):
        assert rotation.warn_if_expiring(now) is not None
        assert rotation.warn_if_expiring(now + 3600) is None
        assert rotation.warn_if_expiring(now + 86400 + 60) is not None
    warnings = [r for r in caplog.records if "expires on" in r.getMessage()]
    assert len(warnings) == 2
    assert "(8 days left)" in warnings[0].getMessage()
    assert "(7 days left)" in warnings[1].getMessage()
    assert all(r.levelno == logging.WARNING for r in warnings)
    fresh = _certificate(lab, Ed25519PrivateKey.generate(), days=90, elapsed=0.1)
    assert expiry_warning(fresh, datetime.now(UTC)) is None
    assert "(29 days left)" in (expiry_warning(fresh, datetime.now(UTC) + timedelta(days=51)) or "")
    assert "expired on" in (expiry_warning(fresh, datetime.now(UTC) + timedelta(days=90)) or "")


def test_after_a_failed_renewal_the_next_waits_for_a_growing_delay(
    lab: OnlineLab, tmp_path: Path
) -> None:
    config = _gateway(lab, tmp_path, 1)
    state_dir = load_config(config).gateway.state_dir
    retry = Backoff(60.0, 3600.0)
    now = datetime.now(UTC).timestamp()
    first = failed_attempt(state_dir, retry=retry, now=now)
    second = failed_attempt(state_dir, retry=retry, now=now)
    assert now < first <= now + 60
    assert now < second <= now + 120
    assert read_hold(state_dir).attempts == 2

    async def never() -> Session:
        raise AssertionError("no session needed")

    rotation = _rotation(_identity(config), config, never, retry=retry)
    assert rotation.next_step(second - 10) == pytest.approx(10)
    assert rotation.next_step(second + 1) == 0  # due (70 % of the life gone) and not held


# -- the wire format -------------------------------------------------------------------------------


def test_enrollment_messages_round_trip_and_malformed_ones_are_rejected() -> None:
    request = EnrollRequest("gw-a", "ab" * 16, "-----BEGIN CERTIFICATE REQUEST-----", token="T-1")
    assert EnrollRequest.decode(request.encode()) == request
    renewal = EnrollRequest("gw-a", "cd" * 16, "csr", certificate_pem="cert", proof=b"\x01\x02")
    assert EnrollRequest.decode(renewal.encode()) == renewal
    reply = EnrollReply("ab" * 16, certificate_pem="-----BEGIN CERTIFICATE-----")
    assert EnrollReply.decode(reply.encode()) == reply
    refusal = EnrollReply("ab" * 16, error="token-used", message="used")
    assert EnrollReply.decode(refusal.encode()) == refusal
    bad = [
        b"{}",
        b'{"v": 1, "request_id": "short", "gateway": "gw-a", "csr": "x", "token": "t"}',
        b'{"v": 1, "request_id": "'
        + b"a" * 32
        + b'", "gateway": "gw/a", "csr": "x", "token": "t"}',
        b'{"v": 1, "request_id": "' + b"a" * 32 + b'", "gateway": "gw-a", "csr": "x"}',
        b"x" * 20000,
    ]
    for payload in bad:
        with pytest.raises(ProtocolError):
            EnrollRequest.decode(payload)


# -- the files after a power cut -------------------------------------------------------------------


def test_recovery_finishes_a_swap_cut_between_key_and_certificate(
    lab: OnlineLab, tmp_path: Path
) -> None:
    config = _gateway(lab, tmp_path, 1)
    paths = load_config(config).identity
    assert recover_identity(paths.key, paths.cert) is None  # a matching pair: nothing to do
    new_key = Ed25519PrivateKey.generate()
    new_cert = _certificate(lab, new_key, days=30, elapsed=0.0)
    shutil.copy(paths.key, paths.key.with_name("gateway.key.old"))
    write_private_key(paths.key, new_key)  # the key was swapped ...
    write_certificate(paths.cert.with_name("gateway.crt.new"), new_cert)  # ... the cert not yet
    assert "finished" in (recover_identity(paths.key, paths.cert) or "")
    assert _identity(config).certificate == new_cert


def test_recovery_puts_the_previous_key_back_when_the_new_certificate_is_gone(
    lab: OnlineLab, tmp_path: Path
) -> None:
    config = _gateway(lab, tmp_path, 1)
    paths = load_config(config).identity
    before = _identity(config)
    shutil.copy(paths.key, paths.key.with_name("gateway.key.old"))
    write_private_key(paths.key, Ed25519PrivateKey.generate())
    assert "undid" in (recover_identity(paths.key, paths.cert) or "")
    assert _identity(config).kid == before.kid


# -- renewal over the agent's session --------------------------------------------------------------


def test_renewal_over_the_gateways_session_swaps_only_after_a_trial_connection(
    lab: OnlineLab, tmp_path: Path
) -> None:
    with online_broker(lab, tmp_path / "broker") as broker:
        config = _gateway(lab, tmp_path / "gw", broker.port)
        paths = load_config(config).identity
        state_dir = load_config(config).gateway.state_dir
        before = _identity(config)
        state_dir.mkdir(parents=True)
        (state_dir / f"seq-{before.kid.hex()}").write_text("8192\n")

        async def scenario() -> Identity | None:
            async with running_registrar(lab.registrar(), lab, broker):
                session = await _session_of(before, broker.port)

                async def sessions() -> Session:
                    return session

                try:
                    staged = await _rotation(before, config, sessions).renew_once()
                finally:
                    await session.close()
                assert staged.key_path == paths.key.with_name("gateway.key.new")
                assert _identity(config).kid == before.kid  # nothing swapped yet
                return await adopt_staged(load_config(config))

        renewed = asyncio.run(scenario())
        assert renewed is not None
        assert renewed.kid != before.kid
        assert _identity(config).kid == renewed.kid
        assert paths.cert.with_name("gateway.crt.old").read_bytes() == (
            before.certificate.public_bytes(serialization.Encoding.PEM)
        )
        assert (
            load_identity(
                paths.key.with_name("gateway.key.old"),
                paths.cert.with_name("gateway.crt.old"),
                paths.ca,
            ).kid
            == before.kid
        )
        assert not paths.key.with_name("gateway.key.new").exists()
        assert (paths.key.stat().st_mode & 0o077) == 0
        assert (state_dir / f"seq-{renewed.kid.hex()}").read_text() == "8192\n"
        asyncio.run(_connect(config))


def test_a_refused_renewal_keeps_the_current_credential_and_waits_before_trying_again(
    lab: OnlineLab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lab.allow.write_text("gw-new\n")  # operations took gw-a off the allow-list
    with online_broker(lab, tmp_path / "broker") as broker:
        config = _gateway(lab, tmp_path / "gw", broker.port)
        before = _identity(config)
        state_dir = load_config(config).gateway.state_dir

        async def scenario() -> None:
            async with running_registrar(lab.registrar(), lab, broker):
                session = await _session_of(before, broker.port)

                async def sessions() -> Session:
                    return session

                rotation = _rotation(before, config, sessions, retry=Backoff(600.0, 600.0))
                task = asyncio.create_task(rotation.run())
                async with asyncio.timeout(10):
                    while read_hold(state_dir).attempts == 0:
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await session.close()
                assert not rotation.staged.is_set()

        with caplog.at_level(logging.ERROR, logger="agent.rotation"):
            asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.name == "agent.rotation"]
    assert len(errors) == 1  # one attempt, then it waits
    assert "not on the registrar's allow-list" in errors[0]
    assert _identity(config).kid == before.kid
    assert not load_config(config).identity.cert.with_name("gateway.crt.new").exists()


def test_a_renewal_that_timed_out_does_not_spoil_the_next_one_on_the_same_session(
    lab: OnlineLab, tmp_path: Path
) -> None:
    with online_broker(lab, tmp_path / "broker") as broker:
        config = _gateway(lab, tmp_path / "gw", broker.port)
        before = _identity(config)

        async def scenario() -> Identity:
            session = await _session_of(before, broker.port)

            async def sessions() -> Session:
                return session

            try:
                rotation = _rotation(before, config, sessions, reply_timeout_s=0.5)
                with pytest.raises(RenewalError, match="no answer from the registrar"):
                    await rotation.renew_once()  # nobody answers yet
                async with running_registrar(lab.registrar(), lab, broker):
                    again = _rotation(before, config, sessions, reply_timeout_s=5.0)
                    return await again.renew_once()
            finally:
                await session.close()

        staged = asyncio.run(scenario())
        assert staged.gateway_id == "gw-a"


# -- power cuts at every step ----------------------------------------------------------------------

_ROTATE = r"""
import asyncio, os, signal, sys, time
from pathlib import Path
from agent.config import load_config
from agent.identity import load_identity
from agent.mqtt import Session, SessionSettings
from agent.rotation import Rotation, adopt_staged, recover_identity
from agent.tls import client_context

config = load_config(Path(sys.argv[1]))
kill_at = sys.argv[2]

def checkpoint(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    paths, broker = config.identity, config.broker
    recover_identity(paths.key, paths.cert)  # what the agent does at start
    identity = load_identity(paths.key, paths.cert, paths.ca)
    settings = SessionSettings(host=broker.host, port=broker.port, client_id=identity.gateway_id,
                               tls=client_context(identity), connect_timeout_s=5.0)
    session = await Session.open(settings)
    async def sessions():
        return session
    rotation = Rotation(identity, prefix=broker.prefix, sessions=sessions,
                        state_dir=config.gateway.state_dir, checkpoint=checkpoint)
    if rotation.staged_identity() is None and rotation.next_step(time.time()) == 0:
        await rotation.renew_once()
    await session.close()
    if rotation.staged_identity() is not None:
        await adopt_staged(config, checkpoint=checkpoint)

asyncio.run(main())
"""


async def _rotate(config: Path, kill_at: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ROTATE, str(config), kill_at,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), out.decode()
    return proc.returncode


@pytest.mark.parametrize("step", STEPS)
def test_a_power_cut_at_any_step_of_the_rotation_leaves_a_working_credential(
    step: str, lab: OnlineLab, tmp_path: Path
) -> None:
    with online_broker(lab, tmp_path / "broker") as broker:
        config = _gateway(lab, tmp_path / "gw", broker.port)
        paths = load_config(config).identity
        before = _identity(config)

        async def scenario() -> None:
            async with running_registrar(lab.registrar(), lab, broker):
                assert await _rotate(config, step) == -signal.SIGKILL  # the cut came at `step`
                recover_identity(paths.key, paths.cert)  # the agent's first act at start
                assert (_identity(config).kid != before.kid) == (step in SWAPPED)
                await _connect(config)  # a working credential
                assert await _rotate(config, "never") == 0  # and the rotation completes
                assert _identity(config).kid != before.kid
                await _connect(config)

        asyncio.run(scenario())
        leftovers = [p.name for p in paths.key.parent.iterdir() if p.name.startswith(".")]
        assert leftovers == []


# -- the real agent --------------------------------------------------------------------------------


async def _until(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s} s waiting for {what}") from None


async def _record(
    lab: OnlineLab, broker: LabBroker, seen: list[tuple[str, bytes]], stop: asyncio.Event
) -> None:
    """Keep every telemetry message (topic, payload), as a cloud consumer would, until `stop`."""
    cert, key = lab.files.clients["verifier"]
    settings = broker.session_settings(
        cert, key, lab.files.ca_cert, client_id="verifier", persistent=True
    )
    session = await Session.open(settings)

    async def pump() -> None:
        async for message in session.messages():
            seen.append((message.topic, message.payload))  # noqa: PERF401 - read live

    try:
        await session.subscribe("citygate/+/telemetry")
        pumping = asyncio.create_task(pump())
        await stop.wait()
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
    finally:
        await session.close()


def test_the_agent_renews_its_certificate_while_telemetry_flows_and_loses_no_reading(
    lab: OnlineLab, tmp_path: Path
) -> None:
    """Every reading the agent took in arrives, verified: before the switch signed by the old
    key, after it by the new one, the sequence numbers going on. (Frames the sensor sends in
    the fraction of a second while the service restarts, its port closed, are not taken in.)"""
    seen: list[tuple[str, bytes]] = []

    async def scenario(broker: LabBroker) -> AgentProcess:
        stop = asyncio.Event()
        recorder = asyncio.create_task(_record(lab, broker, seen, stop))
        async with running_registrar(lab.registrar(days=90), lab, broker):
            with Pms5003Emulator(period_s=0.05, seed=11, wait_for_host=True) as sensor:
                config = _gateway(
                    lab, tmp_path / "gw", broker.port,
                    sensors={"air_1": {"driver": "pms5003", "port": sensor.port}},
                )  # fmt: skip
                agent = AgentProcess(config, tmp_path / "agent.log")
                await agent.start()
                await _until(lambda: "switched to the renewed" in agent.output(), 30, "the switch")
                switched_at = len(seen)
                await _until(lambda: len(seen) > switched_at + 3, 20, "telemetry after it")
                sensor.set_silent(True)
                await asyncio.sleep(0.5)
                produced = sensor.frames_sent * 3
                assert await agent.stop() == 0
                accepted = sum(map(int, re.findall(r"(\d+) reading\(s\) accepted", agent.output())))
                verifier = _verifier(config)
                await _until(lambda: _readings(verifier, seen) >= accepted, 10, "every reading")
        stop.set()
        await recorder
        assert produced - 3 * 10 <= accepted <= produced
        return agent

    with online_broker(lab, tmp_path / "broker") as broker:
        agent = asyncio.run(scenario(broker))
    config = tmp_path / "gw" / "gateway.toml"
    verifier = _verifier(config)
    messages = [verifier.check(topic, payload) for topic, payload in seen]
    old_kid = messages[0].kid
    assert len({m.kid for m in messages}) == 2  # signed by the old key, then by the new one
    assert max(m.seq for m in messages if m.kid == old_kid) < min(
        m.seq for m in messages if m.kid != old_kid
    )
    log = agent.output()
    assert log.count("reading(s) accepted this run") == 2  # one service before, one after
    assert "restarting with the renewed certificate" in log
    assert verifier.failed == 0


def _verifier(config: Path) -> Verifier:
    paths = load_config(config).identity
    certs = [paths.cert, paths.cert.with_name("gateway.crt.old")]
    return Verifier(trust_store(paths.ca, [c for c in certs if c.exists()]))


def _readings(verifier: Verifier, seen: list[tuple[str, bytes]]) -> int:
    """Distinct readings in the messages seen (duplicates by (gateway, seq) counted once)."""
    unique: dict[int, int] = {}
    for topic, payload in seen:
        try:
            message = verifier.check(topic, payload)
        except VerificationError:
            continue
        unique[message.seq] = len(message.records)
    return sum(unique.values())


def test_a_revoked_gateway_is_refused_at_connect_and_the_agent_backs_off(
    lab: OnlineLab, tmp_path: Path
) -> None:
    with online_broker(lab, tmp_path / "broker") as broker:
        config = _gateway(lab, tmp_path / "gw", broker.port, elapsed=0.1)
        write_crl(load_ca(lab.ca_dir), lab.crl, add=_identity(config).certificate.serial_number)
        broker.reload()
        agent = AgentProcess(config, tmp_path / "agent.log")

        async def scenario() -> None:
            await agent.start()
            await asyncio.sleep(4.0)
            assert agent.proc is not None
            assert agent.proc.returncode is None  # it waits; it does not crash
            assert await agent.stop() == 0

        asyncio.run(scenario())
    refusals = [
        line for line in agent.output().splitlines() if "is our certificate accepted" in line
    ]
    assert 3 <= len(refusals) <= 20  # backs off (0.1 s doubling to 1 s here), never a tight loop
    assert all("retrying in" in line for line in refusals)
    assert os.path.exists(tmp_path / "gw" / "state")
