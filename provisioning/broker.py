"""A lab mosquitto broker with mutual TLS and the citygate ACL, on loopback.

For the demo, the tests, the benchmarks and HIL rigs — not a production broker
setup, though its config shows what production needs (DESIGN.md §4, §7):
client certificates required, the certificate's CN is the username and the
client id, no anonymous access, and an ACL under which a gateway may write
only below `<prefix>/<its id>/` and read only its own command topics. The
verifier identities named at construction may read everything under the prefix;
the registrar identities may read every gateway's enrollment requests and
answer them (docs/adr/0005); the operator identities may send any gateway
commands and update offers (agent.commands), and nothing else.

With `claim_ca`, a second listener (the enrollment listener) accepts only
certificates of that claim CA, and its own ACL lets a claim certificate do
nothing but publish its gateway's enrollment request and read the reply. With
`crl`, the main listener refuses revoked certificates; `reload` (SIGHUP) makes
mosquitto read the CRL again.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from agent.mqtt import SessionSettings
from agent.tls import verifier_context

MOSQUITTO_HINT = "mosquitto is not installed: run `sudo apt-get install mosquitto`"


class BrokerError(Exception):
    """The lab broker could not be started."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (it lives in /usr/sbin on Debian); BrokerError if absent."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerError(MOSQUITTO_HINT)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def acl_text(
    prefix: str,
    readers: Sequence[str],
    registrars: Sequence[str] = (),
    operators: Sequence[str] = (),
) -> str:
    lines = [f"user {name}\ntopic read {prefix}/#\n" for name in readers]
    lines.extend(
        f"user {name}\ntopic read {prefix}/+/enroll/request\ntopic write {prefix}/+/enroll/reply\n"
        for name in registrars
    )
    lines.extend(
        f"user {name}\ntopic write {prefix}/+/cmd/#\ntopic write {prefix}/+/ota/offer\n"
        for name in operators
    )
    lines.append(
        "# every other client: its own subtree only (%u = certificate CN)\n"
        f"pattern write {prefix}/%u/#\n"
        f"pattern read {prefix}/%u/cmd/#\n"
        f"pattern read {prefix}/%u/ota/offer\n"
        f"pattern read {prefix}/%u/enroll/reply\n"
    )
    return "\n".join(lines)


def claim_acl_text(prefix: str) -> str:
    """The enrollment listener: a claim certificate may only ask for its gateway's certificate."""
    return (
        "# claim certificates (CN = gateway id): nothing but enrollment\n"
        f"pattern write {prefix}/%u/enroll/request\n"
        f"pattern read {prefix}/%u/enroll/reply\n"
    )


class LabBroker:
    """mosquitto on 127.0.0.1:`port` with the given CA, server cert and ACL."""

    def __init__(
        self,
        workdir: Path,
        *,
        ca_cert: Path,
        server_cert: Path,
        server_key: Path,
        prefix: str = "citygate",
        readers: Sequence[str] = ("verifier",),
        registrars: Sequence[str] = (),
        operators: Sequence[str] = (),
        port: int | None = None,
        crl: Path | None = None,
        claim_ca: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._ca = ca_cert
        self._cert = server_cert
        self._key = server_key
        self._prefix = prefix
        self._readers = tuple(readers)
        self._registrars = tuple(registrars)
        self._operators = tuple(operators)
        self._crl = crl
        self._claim_ca = claim_ca
        self.claim_port = free_port() if claim_ca is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        acl = self.workdir / "mosquitto.acl"
        acl.write_text(acl_text(self._prefix, self._readers, self._registrars, self._operators))
        claim = self._claim_ca is not None
        conf = self.workdir / "mosquitto.conf"
        text = (
            f"per_listener_settings {'true' if claim else 'false'}\n"
            f"persistence true\n"
            f"persistence_location {self.workdir}/\n"
            # a lab's subscribers (verifiers, HIL observers) must see every message, however
            # far behind a burst leaves them: mosquitto drops QoS 1 beyond 1000 queued per
            # client (0, "no limit", makes mosquitto 2.0.11 drop a client it refuses a publish)
            f"max_queued_messages 1000000\n"
            f"user {getpass.getuser()}\n"
            f"log_dest file {self.log_path}\n"
            f"log_type error\nlog_type warning\nlog_type notice\n"
            + ("" if claim else f"allow_anonymous false\nacl_file {acl}\n")
            + f"listener {self.port} {self.host}\n"
            + (f"allow_anonymous false\nacl_file {acl}\n" if claim else "")
            + self._tls_lines(self._ca)
            + (f"crlfile {self._crl}\n" if self._crl is not None else "")
        )
        if self._claim_ca is not None:
            claim_acl = self.workdir / "mosquitto-claim.acl"
            claim_acl.write_text(claim_acl_text(self._prefix))
            text += (
                f"# the enrollment listener: claim certificates only\n"
                f"listener {self.claim_port} {self.host}\n"
                f"allow_anonymous false\nacl_file {claim_acl}\n" + self._tls_lines(self._claim_ca)
            )
        conf.write_text(text)
        return conf

    def _tls_lines(self, ca: Path) -> str:
        return (
            f"cafile {ca}\n"
            f"certfile {self._cert}\n"
            f"keyfile {self._key}\n"
            f"require_certificate true\n"
            f"use_identity_as_username true\n"
            f"use_username_as_clientid true\n"
        )

    def start(self, timeout_s: float = 10.0) -> None:
        conf = self.write_config()
        binary = find_mosquitto()
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log = self.log_path.read_text() if self.log_path.exists() else ""
                self._proc = None
                raise BrokerError(f"mosquitto exited at start: {err.strip()} {log.strip()}")
            with contextlib.suppress(OSError):
                socket.create_connection((self.host, self.port), 0.2).close()
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout_s} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto reads its ACL files, certificates and CRL again."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)

    def session_settings(
        self, cert: Path, key: Path, ca: Path, *, client_id: str, persistent: bool = False
    ) -> SessionSettings:
        """Settings for a client of this broker; `persistent` keeps its subscriptions
        and queued messages across reconnects (and broker restarts), as a cloud
        consumer that must miss nothing would."""
        return SessionSettings(
            host="localhost",
            port=self.port,
            client_id=client_id,
            tls=verifier_context(cert, key, ca),
            connect_timeout_s=2.0,
            clean_start=not persistent,
            session_expiry_s=3600 if persistent else 0,
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LabBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
