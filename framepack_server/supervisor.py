"""Keeping the server up: restart `tritonserver` when its backend stub or the server dies.

Triton's Python backend runs `model.py` in a separate stub process. When that process
dies (killed, out of memory, a crash in native code) Triton 2.51 does not restart it for
a decoupled model like ours (python_backend's `TRITONBACKEND_ModelInstanceExecute`:
"TODO: Implement restart on decoupled"). Measured with the embedded server: the model
still reports READY, every later request fails at once with "Stub process
'framepack_0_0' is not healthy.", and the request that was running never gets another
response, so its client would wait forever. Unloading and loading the model (explicit
model control) does bring a new stub, but the dead one's open request keeps the old
model version UNLOADING for good, with its healthy instances' memory on other GPUs.

So the launcher restarts the whole server instead: that closes every open stream (the
running job's client sees the connection drop at once, and clients retry connecting
with backoff), frees all memory, and brings the model back with fresh stubs.

The model instance asks for the same when it can no longer run jobs (every GPU group's
weights changed, framepack_server/jobs.py): `exit_for_restart` ends its own stub.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Protocol

from .triton_install import STUB_NAME

POLL_S = 0.5
# How long a stub that asks for a restart lives on: its last responses (the failed job's
# error, the waiting jobs' refusals) reach tritonserver before the stub ends.
RESTART_GRACE_S = 2.0
STUB_EXIT_CODE = 70  # EX_SOFTWARE


def exit_for_restart(reason: str, log: Callable[[str], None], grace_s: float = RESTART_GRACE_S,
                     exit: Callable[[int], None] = os._exit) -> threading.Timer:
    """In a backend stub: end the process after `grace_s`, which the launcher's Supervisor
    answers with a restart of the whole server (the weights loaded afresh). Under a bare
    tritonserver the model then fails every request, as it would have anyway."""
    log(f"this model instance can no longer run jobs ({reason}); its backend stub exits in {grace_s:g} s "
        "so that framepack-server restarts the server")
    timer = threading.Timer(grace_s, exit, args=(STUB_EXIT_CODE,))
    timer.daemon = True
    timer.start()
    return timer


class Supervised(Protocol):
    def running(self) -> bool: ...

    def backend_stub_pids(self) -> set[int]: ...

    def restart(self, reason: str) -> None:
        """Stop and start again; raises when the server does not come back."""


def backend_stub_pids(process_group: int) -> set[int]:
    """Live (not zombie) Python-backend stub processes in a process group, from /proc."""
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            command = Path(entry.path, "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:  # the process ended while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'.
        state, _, group = stat.rpartition(")")[2].split()[:3]
        if int(group) == process_group and state != "Z" and os.path.basename(command) == STUB_NAME.encode():
            pids.add(int(entry.name))
    return pids


class Supervisor:
    """A thread that watches one server and restarts it when a stub or the server dies."""

    def __init__(self, server: Supervised, log: Callable[[str], None], poll_s: float = POLL_S):
        self._server = server
        self._log = log
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="framepack-supervisor", daemon=True)
        self.restarts: list[str] = []  # why each restart happened
        self.gave_up: Exception | None = None  # set when a restart failed; the server stays down

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _watch(self) -> None:
        stubs = self._server.backend_stub_pids()
        while not self._stopping.wait(self._poll_s):
            reason = self._failure(stubs)
            if reason is None:
                continue
            self.restarts.append(reason)
            self._log(f"{reason}; restarting the server")
            try:
                # The new server is forked by processes.spawn's long-lived thread, not this
                # one: its parent-death signal must not fire when this thread ends.
                self._server.restart(reason)
            except Exception as e:
                if not self._stopping.is_set():
                    self.gave_up = e
                    self._log(f"the server did not come back: {e}")
                return
            stubs = self._server.backend_stub_pids()

    def _failure(self, stubs: set[int]) -> str | None:
        if not self._server.running():
            return "tritonserver exited"
        gone = stubs - self._server.backend_stub_pids()
        if gone:
            return f"backend stub process {', '.join(map(str, sorted(gone)))} died"
        return None
