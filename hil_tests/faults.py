"""Fault injectors that act around the agent: the broker, power, the disk and the clock.

- `BrokerControl`: stop, start, restart the lab mosquitto on the same port,
  optionally with a new server certificate from the same CA (the agent must
  accept it: it trusts the CA, not one certificate).
- `Power`: SIGKILL of the agent at a random moment (a power cut: nothing is
  flushed, nothing is said to the broker).
- `Disk`: the agent's spool directory on a filesystem that can be filled up and
  freed again. As root it is a small tmpfs of its own, filled with a filler
  file; otherwise the agent's RLIMIT_FSIZE is lowered (with prlimit) so that no
  file of it can grow, which is how a full disk looks to a process that only
  appends (its log file included).
- `FakeClock`: the agent under libfaketime, with its offset in a file that is
  read on every clock call, so a scenario can boot the agent in 1970 and jump
  its clock while it runs. Monotonic clocks stay real (timers keep working).

Network faults are `hil_tests.netproxy.NetProxy`; sensor faults are
`hil_tests.sensors.SensorFaults`.

Trust: every injector is trusted test equipment, run by test code only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import resource
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.keys import PrivateKey
from provisioning.broker import LabBroker
from provisioning.pki import (
    LabFiles,
    generate_key,
    issue_certificate,
    write_certificate,
    write_private_key,
)

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
_FILL_CHUNK = 1 << 16


class BrokerControl:
    """The rig's mosquitto, seen as something that fails."""

    def __init__(self, broker: LabBroker, lab: LabFiles) -> None:
        self.broker = broker
        self.lab = lab
        self.certificates_issued = 0  # server certificates made by restart(new_cert=True)

    @property
    def running(self) -> bool:
        return self.broker.running

    def stop(self) -> None:
        """The broker goes away (connections dropped; persistent sessions kept on disk)."""
        self.broker.stop()

    def start(self) -> None:
        """The broker comes back on the same port, with the sessions it had."""
        self.broker.start()

    def restart(self, *, new_cert: bool = False) -> None:
        """Stop and start; with `new_cert`, serve a new certificate (new key, same CA and names)."""
        self.broker.stop()
        if new_cert:
            self._renew_server_certificate()
        self.broker.start()

    def _renew_server_certificate(self) -> None:
        ca_cert = _load_certificate(self.lab.ca_cert)
        ca_key = serialization.load_pem_private_key(self.lab.ca_key.read_bytes(), password=None)
        old = _load_certificate(self.lab.server_cert)
        key = generate_key("p256")
        cert = issue_certificate(
            ca_cert,
            _signing_key(ca_key),
            "localhost",
            key.public_key(),
            days=30,
            client=False,
            server=True,
            dns_names=_dns_names(old),
            ip_addresses=_ip_addresses(old),
        )
        write_private_key(self.lab.server_key, key)
        write_certificate(self.lab.server_cert, cert)
        self.certificates_issued += 1


def _load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _signing_key(key: object) -> PrivateKey:
    if not isinstance(key, PrivateKey):
        raise TypeError(f"the lab CA key is a {type(key).__name__}, not Ed25519 or P-256")
    return key


def _alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _dns_names(cert: x509.Certificate) -> list[str]:
    names = _alt_names(cert)
    return names.get_values_for_type(x509.DNSName) if names is not None else []


def _ip_addresses(cert: x509.Certificate) -> list[str]:
    names = _alt_names(cert)
    return [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] if names else []


class Power:
    """Power cuts of the agent: SIGKILL, with no chance to flush or say goodbye."""

    def __init__(self, kill: Callable[[], Awaitable[None]]) -> None:
        self._kill = kill
        self.cuts = 0

    async def kill_at_random(self, rng: random.Random, within_s: float = 2.0) -> float:
        """Wait a random time up to `within_s`, then cut; returns the time waited."""
        delay = rng.uniform(0.0, within_s)
        await asyncio.sleep(delay)
        await self._kill()
        self.cuts += 1
        return delay


class Disk:
    """A spool directory on a filesystem that fills up on request. Use as a context manager.

    `mode` "tmpfs" (the default as root) mounts a tmpfs of `size_bytes` on
    `path`; "fsize" (the fallback) leaves `path` on the disk it is on and, while
    full, limits how large any file of the attached process may grow.
    """

    def __init__(self, path: Path, size_bytes: int, *, mode: str | None = None) -> None:
        if size_bytes < 1 << 20:
            raise ValueError("a spool needs at least 1 MiB (the agent's smallest budget)")
        self.path = path
        self.size_bytes = size_bytes
        self.mode = mode or ("tmpfs" if os.geteuid() == 0 else "fsize")
        if self.mode not in ("tmpfs", "fsize"):
            raise ValueError(f"mode must be tmpfs or fsize, got {self.mode!r}")
        self.full = False
        self._mounted = False
        self._pid: int | None = None
        self._filler = path / ".filler"

    def __enter__(self) -> Self:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.mode == "tmpfs":
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={self.size_bytes},mode=0700",
                    "tmpfs",
                    str(self.path),
                ],
                check=True,
                capture_output=True,
            )
            self._mounted = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._mounted:
            done = subprocess.run(["umount", str(self.path)], check=False, capture_output=True)
            if done.returncode != 0:  # still busy (an agent that was not stopped): detach it
                subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)
            self._mounted = False

    def attach(self, pid: int) -> None:
        """The process whose writes `fsize` mode limits (the agent; again after a restart)."""
        self._pid = pid
        if self.full and self.mode == "fsize":
            self._limit(self._largest_file())

    def fill(self) -> None:
        """No more space: writes that need new blocks fail (ENOSPC, or EFBIG in fsize mode)."""
        if self.mode == "tmpfs":
            with self._filler.open("ab") as out:
                block = b"\0" * _FILL_CHUNK
                with contextlib.suppress(OSError):
                    while True:
                        out.write(block)
                        out.flush()
                with contextlib.suppress(OSError):
                    out.close()
        elif self._pid is not None:
            self._limit(self._largest_file())
        self.full = True

    def free(self) -> None:
        """Space again: the filler goes, or the size limit is lifted."""
        if self.mode == "tmpfs":
            self._filler.unlink(missing_ok=True)
        elif self._pid is not None:
            self._limit(resource.RLIM_INFINITY)
        self.full = False

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def _largest_file(self) -> int:
        return max((p.stat().st_size for p in self.path.iterdir() if p.is_file()), default=0)

    def _limit(self, size: int) -> None:
        assert self._pid is not None
        try:
            _, hard = resource.prlimit(self._pid, resource.RLIMIT_FSIZE)
            soft = size if hard == resource.RLIM_INFINITY else min(size, hard)
            resource.prlimit(self._pid, resource.RLIMIT_FSIZE, (soft, hard))
        except ProcessLookupError:
            self._pid = None  # the agent is gone; attach() applies the limit to the next one
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise


class FakeClock:
    """libfaketime for the agent: `environment()` for its start, then move its clock at will."""

    def __init__(self, path: Path, library: Path = LIBFAKETIME) -> None:
        self.path = path
        self.library = library
        self.offset_s = 0

    @staticmethod
    def available(library: Path = LIBFAKETIME) -> bool:
        return library.exists()

    def environment(self) -> dict[str, str]:
        """What the agent's environment needs (the offset file is written now if missing)."""
        if not self.path.exists():
            self.set_offset(self.offset_s)
        return {
            "LD_PRELOAD": str(self.library),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def set_offset(self, seconds: int) -> None:
        """The agent's clock runs `seconds` ahead of (or, negative, behind) the real one."""
        self.offset_s = int(seconds)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{self.offset_s:+d}\n")
        os.replace(tmp, self.path)  # the agent never reads half a line

    def set_time(self, epoch_s: float) -> None:
        """The agent's clock reads `epoch_s` now (and runs on from there)."""
        self.set_offset(round(epoch_s - time.time()))

    def boot_in_1970(self, epoch_s: float = 86400.0) -> None:
        """As a gateway without a battery-backed clock boots: shortly after the epoch."""
        self.set_time(epoch_s)

    def real(self) -> None:
        """The clock is right again (NTP has synchronised): a jump to the real time."""
        self.set_offset(0)
