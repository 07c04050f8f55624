"""The launcher's child processes: they die with it, and it learns who holds a port.

`tritonserver` runs in a session of its own (our Ctrl-C reaches it only through
`TritonServer.stop`), so neither a closed terminal nor a killed launcher would reach it:
it would keep serving with parent 1 and hold the ports. `spawn` gives it a parent-death
signal (Linux `PR_SET_PDEATHSIG`, SIGKILL), which also fires when the launcher itself is
SIGKILLed. The kernel sends that signal when the *thread* that forked the child ends,
not the process; the supervisor restarts the server from its own thread, which ends on
`stop()`. So every child is forked by one daemon thread that lives as long as the
launcher process (`_Spawner`).

The backend stubs are tritonserver's children: their own watch thread sees their parent
gone within 0.3 s and exits (python_backend's pb_stub.cc). That exit runs C++
destructors under a job thread that may still be running (a VAE decode, a response
send): the way to a corrupted heap (`malloc(): unaligned tcache chunk detected`). So
when the launcher stops a server it kills the process group *before* reaping
tritonserver (`wait_unreaped`): while tritonserver is an unreaped zombie its stubs still
see a parent, and they die by SIGKILL, which runs no destructors.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


class _Spawner:
    """Forks child processes from one thread that lives as long as this process."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, command: list[str], **options: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="framepack-spawner", daemon=True)
                self._thread.start()
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put((result, command, options))
        return result.result()

    def _serve(self) -> None:
        while True:
            result, command, options = self._requests.get()
            try:
                result.set_result(subprocess.Popen(command, **options))
            except BaseException as e:
                result.set_exception(e)


_spawner = _Spawner()


def spawn(command: list[str], **options: Any) -> subprocess.Popen:
    """`subprocess.Popen(command, **options)`, the child killed (SIGKILL) when this process ends, however it ends."""
    prctl = _prctl()
    if prctl is None:
        return subprocess.Popen(command, **options)
    launcher = os.getpid()

    def die_with_launcher() -> None:  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher:  # the launcher ended before the line above
            os.kill(os.getpid(), signal.SIGKILL)

    return _spawner.popen(command, preexec_fn=die_with_launcher, **options)


def exited(process: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it (`Popen.poll` would)."""
    if process.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere
        return True
    return info is not None and info.si_pid == process.pid


def wait_unreaped(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the child exits, leaving it a zombie; False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not exited(process):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def kill_group(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ who holds a port


def listening_pid(port: int) -> int | None:
    """The process listening on TCP `port` (any address), from /proc; None if not found or not ours to see."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # "sl local_address rem_address st ... uid timeout inode"; st 0A is LISTEN
            columns = line.split()
            if len(columns) > 9 and columns[3] == "0A" and int(columns[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(columns[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) in wanted:
                    return int(entry.name)
        except OSError:  # ended while we looked, or not ours
            continue
    return None


def command_line(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []
