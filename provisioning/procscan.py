"""What other processes on this gateway are doing, read from /proc (Linux only).

The doctor uses it to find the agent running with the same config, to tell
"the port is held by the running agent" (fine)
from "the port is held by a stray minicom" (a fault), and to see whether the
running agent is connected to the broker without opening a second session
that would take over the agent's (the broker uses the certificate's CN as the
client id). Without root, other users' processes show no file descriptors:
the answers are then "unknown" (None or an empty list), never a guess.

Trust: /proc as the kernel reports it; command lines are only displayed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_TCP_ESTABLISHED = "01"


@dataclass(frozen=True)
class Process:
    pid: int
    command: str  # the command line, space-joined, shortened for display

    def __str__(self) -> str:
        return f"{self.pid} ({self.command})"


def _pids() -> list[int]:
    return [int(entry.name) for entry in _PROC.iterdir() if entry.name.isdigit()]


def _argv(pid: int) -> list[str]:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _process(pid: int, argv: list[str]) -> Process:
    text = " ".join(argv) or f"pid {pid}"
    return Process(pid, text if len(text) <= 80 else text[:77] + "...")


def agent_config(argv: list[str]) -> str | None:
    """The --config of a `citygate run` command line (console script or `-m agent.cli`)."""
    for index, part in enumerate(argv[:-1]):
        if (os.path.basename(part) == "citygate" or part == "agent.cli") and argv[
            index + 1
        ] == "run":
            rest = argv[index + 2 :]
            for position, option in enumerate(rest):
                if option.startswith("--config="):
                    return option.removeprefix("--config=")
                if option == "--config" and position + 1 < len(rest):
                    return rest[position + 1]
    return None


def _same_file(pid: int, given: str, config: Path) -> bool:
    path = Path(given) if os.path.isabs(given) else _PROC / str(pid) / "cwd" / given
    try:
        return os.path.samefile(path, config)
    except OSError:
        return False


def running_agents(config: Path) -> list[Process]:
    """Every `citygate run` process on this machine that runs with the config file `config`."""
    own = os.getpid()
    found = []
    for pid in _pids():
        argv = _argv(pid)
        given = agent_config(argv)
        if pid != own and given is not None and _same_file(pid, given, config):
            found.append(_process(pid, argv))
    return found


def holders(path: Path) -> list[Process] | None:
    """Processes (not ourselves) with `path` open; None if some could not be inspected."""
    target = os.path.realpath(path)
    own = os.getpid()
    found: list[Process] = []
    hidden = False
    for pid in _pids():
        if pid == own:
            continue
        fd_dir = _PROC / str(pid) / "fd"
        try:
            fds = list(fd_dir.iterdir())
        except PermissionError:
            hidden = True
            continue
        except OSError:
            continue  # the process ended
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(fd) == target:
                    found.append(_process(pid, _argv(pid)))
                    break
    if hidden and not found:
        return None
    return found


def _socket_inodes(pid: int) -> set[str] | None:
    try:
        fds = list((_PROC / str(pid) / "fd").iterdir())
    except OSError:
        return None
    inodes = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def connected_to_port(pid: int, port: int) -> bool | None:
    """Whether `pid` has an established TCP connection to remote `port`; None if unknown."""
    inodes = _socket_inodes(pid)
    if inodes is None:
        return None
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / str(pid) / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if (
                state == _TCP_ESTABLISHED
                and inode in inodes
                and int(remote.rsplit(":", 1)[1], 16) == port
            ):
                return True
    return False
