"""Processes that end with the run that started them, however it ends.

``fedortho simulate`` starts Ray, whose processes outlive a run killed with SIGKILL (its
dashboard and runtime-env agents even ignore SIGTERM). Before Ray starts, the run marks its
environment with a token that every process it starts inherits, and starts a guardian in a
session of its own. While the run lives, the guardian notes the processes descended from it
(a process that retitles itself, as Ray's agents do, may overwrite the environment that
``/proc`` shows); when the run's process is gone, for whatever reason, it kills every noted
process still running and every process that carries the token. Processes of a Ray cluster
the run only connects to were not started by it and carry no token.

A parent can also make a child die with it (``die_with_parent``): the sweep uses this for
its cells, so a sweep killed with SIGKILL takes its running cells with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid

TOKEN_ENV = "FEDORTHO_RUN_TOKEN"
POLL_SECONDS = 0.5
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def guard_this_process() -> None:
    """Mark this process's environment and start its guardian (call before Ray starts)."""
    if not sys.platform.startswith("linux"):
        return  # the guardian reads /proc
    token = uuid.uuid4().hex
    os.environ[TOKEN_ENV] = token
    subprocess.Popen([sys.executable, "-m", "fedortho.guardian", str(os.getpid()), token],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)  # Ctrl-C to the run's terminal does not reach it


def carrying(token: str) -> list[int]:
    """Pids of the processes whose environment carries ``token`` (this one excluded)."""
    marker = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def _stat(pid: str) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process from /proc/<pid>/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # the name may hold spaces and parentheses
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), fields[0].decode()


def descendants(root: int) -> dict[int, int]:
    """Pid -> start time of every living process descended from ``root``."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (info := _stat(entry.name)) is not None:
            table[int(entry.name)] = info
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid != os.getpid():
            found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def kill_leftovers(token: str, noted: dict[int, int]) -> int:
    """SIGKILL the noted processes still running (the same processes: same start time) and
    every process carrying ``token``, until none is left; returns how many were killed."""
    killed, quiet_scans = set(), 0
    while quiet_scans < 2:  # a process may start another while a scan runs
        pids = set(carrying(token))
        for pid, started in noted.items():
            info = _stat(str(pid))
            if info is not None and info[1] == started and info[2] != "Z":
                pids.add(pid)
        pids -= killed
        quiet_scans = 0 if pids else quiet_scans + 1
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(0.1)
    return len(killed)


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """For ``preexec_fn``: the child gets ``sig`` when its parent dies (Linux), even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def watch(pid: int, token: str) -> None:
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # killed only by SIGKILL, after the run it guards
    noted: dict[int, int] = {}
    while os.getppid() == parent and _alive(pid):
        noted.update(descendants(pid))
        time.sleep(POLL_SECONDS)
    kill_leftovers(token, noted)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
