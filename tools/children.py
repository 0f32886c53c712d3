"""The one place dagc starts a server process, and how that process ends with dagc.

`start_group` starts a command (`dagc serve`'s ``tritonserver``) as the leader of a process group
of its own (the Python-backend stubs the server starts are in that group too), after starting a
watcher: a small process, in a session of its own, that holds the read end of a pipe whose one
write end stays in dagc. However dagc ends, ``kill -9`` included, the kernel closes that end; the
watcher then ends the group (SIGTERM, SIGKILL after `GRACE_S`) and removes the temporary
directory and the shared-memory regions the server was given. So a killed ``dagc serve`` leaves
no server nobody can see, and its ports are free at once.

Why not PR_SET_PDEATHSIG: it reaches only the direct child (the stubs are grandchildren, and the
server kills them only when it shuts down itself), and it fires when the *thread* that started the
child ends, which would stop a server that an API user started from a worker thread.

`end_group` is the orderly stop (SIGTERM, SIGKILL after a timeout), `release` then tells the
watcher the group is gone. This file runs as the watcher too (``python -I -S children.py``), so it
imports the standard library only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["GRACE_S", "start_group", "end_group", "group_alive", "release"]

# how long the watcher lets the group shut down on SIGTERM before SIGKILL: a killed front end's
# server answers no one, so in-flight requests are not waited for
GRACE_S = 3.0
_DONE = b"done\n"


def group_alive(group: int) -> bool:
    """Whether any process of process group ``group`` is alive (zombies included)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a recycled id that is someone else's: not ours any more
        return False
    return True


def _signal_and_wait(group: int, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + timeout
        while group_alive(group) and time.monotonic() < end:
            time.sleep(0.05)
        if not group_alive(group):
            return


def start_group(command: Sequence[str], *, env: dict[str, str], stdout, tmp: Path,
                shm_prefix: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Start ``command`` (stdin closed, stdout and stderr to the file ``stdout``) as the leader of
    its own process group, watched (module docstring); returns (the process, the watcher). ``tmp``
    and the regions ``/dev/shm/<shm_prefix>*`` are removed by the watcher if dagc dies first.
    Raises OSError when a process cannot be started (nothing is then left running)."""
    watcher = subprocess.Popen([sys.executable, "-I", "-S", __file__, str(GRACE_S), str(tmp), shm_prefix],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        # close_fds (the default) keeps the pipe's write end out of the server: only dagc holds it
        process = subprocess.Popen(list(command), env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        release(watcher)
        raise
    watcher.stdin.write(f"{process.pid}\n".encode())
    watcher.stdin.flush()
    return process, watcher


def end_group(process: subprocess.Popen, timeout: float) -> None:
    """Terminate the process group ``process`` leads (SIGTERM), wait, kill what is left after
    ``timeout`` (SIGKILL); returns once the whole group is gone."""
    group = process.pid  # start_group: the process leads its own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
        end = time.monotonic() + timeout  # the stubs the server started are in the group too
        while group_alive(group) and time.monotonic() < end:
            time.sleep(0.05)
        if not group_alive(group):
            break
    process.wait()


def release(watcher: subprocess.Popen, timeout: float = 10.0) -> None:
    """Tell ``watcher`` that its group was ended in order (`end_group`) and wait for it to exit."""
    try:
        watcher.stdin.write(_DONE)
        watcher.stdin.close()
    except (OSError, ValueError):  # it is gone already, or this was called before
        pass
    try:
        watcher.wait(timeout)
    except subprocess.TimeoutExpired:
        watcher.kill()
        watcher.wait()


def _watch(grace: float, tmp: Path, shm_prefix: str) -> None:
    """The watcher: read the group's id, then wait for the end of the pipe; unless dagc said the
    group was ended in order, end it and remove what it was given."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # only the pipe ends the watch
        signal.signal(sig, signal.SIG_IGN)
    pipe = sys.stdin.buffer
    first = pipe.readline()
    rest = pipe.read()  # until EOF: dagc closed the pipe, or died (the kernel closed it)
    if _DONE in (first, rest):
        return
    if first.strip().isdigit():
        _signal_and_wait(int(first), grace)
    shutil.rmtree(tmp, ignore_errors=True)
    for region in Path("/dev/shm").glob(f"{shm_prefix}*"):
        try:
            region.unlink()
        except OSError:
            pass


if __name__ == "__main__":
    _watch(float(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
