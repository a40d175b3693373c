"""The doctor's checks of the gateway's set-up: its config, its identity, its clock.

Each check returns `Check`s: a status (ok, warn, fail, or skip when an earlier
failure makes the check meaningless), one line saying what was found, and for
anything not ok a hint saying what to do. The judgements are pure functions of
values (`judge_*`), so they are tested without faking the clock; the
`check_*` functions gather the values.

Nothing here writes. The device checks (ports, disk, spool) are in doctor_device.

Trust: the config as `agent.config` checked it; the identity as
`agent.identity` checked it.
"""

from __future__ import annotations

import contextlib
import ctypes
import pwd
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509

from agent.config import Config, ConfigError, load_config
from agent.identity import Identity, IdentityError, load_identity
from provisioning.identity_tools import SERVICE_USER, describe_key

EXPIRY_WARNING_DAYS = 30
#: a clock before this year was never set (a Raspberry Pi has no RTC: it boots in 1970)
MIN_YEAR = 2025
MAX_YEAR = 2100
#: how far the clock may be behind the newest file we know of before we say so
FILE_TIME_SLACK = timedelta(days=1)
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    hint: str = ""  # what to do; empty when ok, or when the message already says it
    details: tuple[str, ...] = field(default=())

    def line(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


def _days(delta: timedelta) -> int:
    return int(delta.total_seconds() // 86400)


def _date(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


# -- config ----------------------------------------------------------------------------


def check_config(path: Path) -> tuple[Check, Config | None]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        first = exc.issues[0]
        if len(exc.issues) == 1 and first.key == "file":  # missing or unreadable
            message = f"{path}: {first.message}"
            check = Check("config", Status.FAIL, message, "pass the gateway's config with --config")
        else:
            check = Check(
                "config",
                Status.FAIL,
                f"{path} has {len(exc.issues)} problem(s)",
                "fix each one listed below (FILE:LINE: KEY: MESSAGE), then run the doctor again",
                tuple(str(issue) for issue in exc.issues),
            )
        return check, None
    return (
        Check("config", Status.OK, f"{path} is valid ({len(config.sensors)} sensor(s))"),
        config,
    )


# -- identity --------------------------------------------------------------------------


def _peek_certificate(path: Path) -> x509.Certificate | None:
    with contextlib.suppress(OSError, ValueError):
        return x509.load_pem_x509_certificate(path.read_bytes())
    return None


def judge_certificate(
    path: Path, not_before: datetime, not_after: datetime, now: datetime
) -> Check:
    """The certificate's dates at `now`: ok, warn under 30 days left, fail outside them."""
    renew = (
        "make a new CSR (citygate provision csr), have it signed, and install the "
        "certificate (citygate provision install-cert)"
    )
    if now < not_before:
        return Check(
            "certificate",
            Status.FAIL,
            f"certificate {path} is not valid before {_date(not_before)} and the clock says "
            f"{_date(now)}",
            "set the gateway clock (see the clock line)",
        )
    if now > not_after:
        return Check(
            "certificate",
            Status.FAIL,
            f"certificate {path} expired on {_date(not_after)} ({_days(now - not_after)} days ago)",
            f"{renew}; if the date above is wrong, set the gateway clock",
        )
    left = _days(not_after - now)
    if left < EXPIRY_WARNING_DAYS:
        return Check(
            "certificate",
            Status.WARN,
            f"certificate {path} expires in {left} days, on {_date(not_after)}",
            f"renew it soon: {renew}",
        )
    return Check(
        "certificate", Status.OK, f"certificate valid until {_date(not_after)} ({left} days left)"
    )


def _owner_check(key_path: Path) -> Check | None:
    """A warning when a service user exists and cannot read the key (it must own it)."""
    try:
        service = pwd.getpwnam(SERVICE_USER)
        info = key_path.stat()
    except (KeyError, OSError):
        return None
    if info.st_uid == service.pw_uid:
        return None
    owner = str(info.st_uid)
    with contextlib.suppress(KeyError):
        owner = pwd.getpwuid(info.st_uid).pw_name
    return Check(
        "identity",
        Status.WARN,
        f"key file {key_path} belongs to {owner}, so the service user {SERVICE_USER} cannot "
        "read it",
        f"run chown {SERVICE_USER}: {key_path}",
    )


def _mode(path: Path) -> str:
    try:
        return f"{stat.S_IMODE(path.stat().st_mode):04o}"
    except OSError:
        return "?"


def check_identity(config: Config, now: datetime) -> tuple[list[Check], Identity | None]:
    """The agent's own identity checks, with time judged apart (the certificate line)."""
    paths = config.identity
    cert = _peek_certificate(paths.cert)
    moment = now
    if cert is not None:  # judge the files here, the dates in the certificate line
        moment = min(max(now, cert.not_valid_before_utc), cert.not_valid_after_utc)
    try:
        identity = load_identity(paths.key, paths.cert, paths.ca, now=moment)
    except IdentityError as exc:
        checks = [Check("identity", Status.FAIL, str(exc))]
        if cert is not None:
            window = (cert.not_valid_before_utc, cert.not_valid_after_utc)
            checks.append(judge_certificate(paths.cert, *window, now))
        return checks, None
    issuer = identity.certificate.issuer.rfc4514_string()
    checks = [
        Check(
            "identity",
            Status.OK,
            f"gateway {identity.gateway_id}: {describe_key(identity.key)} key {paths.key} "
            f"(mode {_mode(paths.key)}) matches the certificate, issued by {issuer}",
        )
    ]
    if (owner := _owner_check(paths.key)) is not None:
        checks.append(owner)
    certificate = identity.certificate
    checks.append(
        judge_certificate(
            paths.cert, certificate.not_valid_before_utc, certificate.not_valid_after_utc, now
        )
    )
    return checks, identity


# -- clock -----------------------------------------------------------------------------


def clock_synchronised() -> bool | None:
    """What the kernel says (adjtimex, read only): synchronised by NTP or not; None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex, modes = 0: only read
        state = int(libc.adjtimex(timex))
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != _TIME_ERROR


def judge_clock(
    now: datetime,
    *,
    not_before: datetime | None,
    newest_file: tuple[Path, datetime] | None,
    synchronised: bool | None,
) -> Check:
    if not MIN_YEAR <= now.year < MAX_YEAR:
        return Check(
            "clock",
            Status.FAIL,
            f"the clock says {_date(now)}: it was never set",
            "connect the gateway to the network so NTP sets it, or set it by hand: "
            "sudo date -u -s 'YYYY-MM-DD HH:MM'",
        )
    if not_before is not None and now < not_before:
        return Check(
            "clock",
            Status.WARN,
            f"the clock ({_date(now)}) is before the certificate's start ({_date(not_before)})",
            "check the clock: if it is right, the CA's clock was ahead; wait or re-issue",
        )
    if newest_file is not None and now < newest_file[1] - FILE_TIME_SLACK:
        path, moment = newest_file
        return Check(
            "clock",
            Status.WARN,
            f"the clock ({_date(now)}) is {_days(moment - now)} days behind {path} "
            f"(modified {_date(moment)})",
            "the clock was probably reset: check NTP (timedatectl) or set it by hand",
        )
    if synchronised is False:
        return Check(
            "clock",
            Status.WARN,
            f"{_date(now)}, but the system says the clock is not synchronised",
            "check NTP (timedatectl status; systemd-timesyncd or chrony) and the network",
        )
    sync = "synchronised" if synchronised else "synchronisation unknown"
    return Check("clock", Status.OK, f"{_date(now)} ({sync})")


def _newest_file(paths: list[Path]) -> tuple[Path, datetime] | None:
    newest: tuple[Path, datetime] | None = None
    for path in paths:
        with contextlib.suppress(OSError):
            moment = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            if newest is None or moment > newest[1]:
                newest = (path, moment)
    return newest


def check_clock(config: Config | None, config_path: Path, identity: Identity | None) -> Check:
    now = datetime.now(UTC)
    files = [config_path, Path("/var/lib/systemd/timesync/clock")]
    not_before = None
    if config is not None:
        spool = config.spool.path
        files += [config.identity.key, config.identity.cert, config.identity.ca, spool]
        files.append(spool.with_name(spool.name + "-wal"))
    if identity is not None:
        not_before = identity.certificate.not_valid_before_utc
    return judge_clock(
        now,
        not_before=not_before,
        newest_file=_newest_file(files),
        synchronised=clock_synchronised(),
    )
