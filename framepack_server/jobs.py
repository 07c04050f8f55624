"""Generation jobs of one model instance: a bounded queue in front of one worker thread.

Triton calls the model's `execute` on one thread per instance. Running a job there
would make every other request wait, unanswered, until it ends. Instead `execute`
validates, then hands the job to this queue and returns; a worker thread runs the jobs
one after the other and streams their responses through the request's response sender.
A full queue refuses new jobs at once (UNAVAILABLE) instead of letting them pile up.

On shutdown Triton lets running requests go on and tells the model nothing (a running
job kept the server alive until it ended). So the queue also polls `shutdown_requested`
(the launcher's shutdown file): running jobs stop at their next step and answer
UNAVAILABLE, and new ones are refused.

A job that runs longer than the instance's time limit stops the same way and answers
DEADLINE_EXCEEDED, so one oversized request cannot hold the instance indefinitely.
After every job the worker gives back the memory the job used and logs what is left
(job_memory.py), so a leak shows as a growing number in the log.

Nothing here imports Triton: the response sender is anything with the `ResponseSink`
methods, so the job logic is testable without a server.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Protocol

from framepack_backend.errors import GenerationCancelled
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SettingsError

from .faults import Fault
from .job_memory import release_memory
from .protocol import Status, WireResponse, to_wire


class ResponseSink(Protocol):
    """Where one request's responses go (Triton's response sender, in the server)."""

    def is_cancelled(self) -> bool: ...

    def send(self, response: WireResponse) -> None: ...

    def fail(self, status: Status, text: str) -> None:
        """Send an error response (message `STATUS: text`); it is the request's last."""

    def close(self) -> None:
        """End the request without another response (after cancellation)."""


class Log(Protocol):
    def info(self, message: str) -> None: ...

    def error(self, message: str) -> None: ...


@dataclass(frozen=True)
class Job:
    request_id: str
    request: GenerationRequest  # parsed and checked when the request arrived
    sink: ResponseSink
    fault: Fault | None = None  # only with fault injection enabled (faults.py)


class Outcome(str, Enum):
    DONE = "done"
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # by the server's shutdown
    TIMED_OUT = "timed out"  # ran past the time limit
    INVALID = "invalid"
    FAILED = "failed"


def _never() -> bool:
    return False


def run_job(
    pipeline,
    job: Job,
    log: Log,
    shutting_down: Callable[[], bool] = _never,
    time_limit_s: float | None = None,
) -> Outcome:
    """Run one job to its end and stream every event; never raises.

    The engine polls `stop` before every model evaluation, so a cancelled, shut down or
    overdue job stops before its next one (a section's VAE decode runs to its end).
    """
    sink = job.sink
    steps_done = 0
    start = time.perf_counter()

    def overdue() -> bool:
        return time_limit_s is not None and time.perf_counter() - start > time_limit_s

    def stop() -> bool:
        return sink.is_cancelled() or shutting_down() or overdue()

    poll = job.fault.wrap(stop) if job.fault else stop
    try:
        if stop():
            raise GenerationCancelled()
        for event in pipeline.generate(job.request, cancel=poll):
            response = to_wire(event)
            steps_done += response.event["kind"] == "progress"
            sink.send(response)
        log.info(f"request {job.request_id}: done in {time.perf_counter() - start:.1f} s ({steps_done} steps)")
        return Outcome.DONE
    except GenerationCancelled:
        elapsed = time.perf_counter() - start
        if sink.is_cancelled():
            log.info(
                f"request {job.request_id}: cancelled by the client after {steps_done} steps ({elapsed:.1f} s); "
                "job stopped"
            )
            _quietly(sink.close)
            return Outcome.CANCELLED
        if not shutting_down():
            log.info(
                f"request {job.request_id}: stopped after {steps_done} steps ({elapsed:.1f} s): "
                f"past the time limit of {time_limit_s:g} s"
            )
            _quietly(
                sink.fail, Status.DEADLINE_EXCEEDED,
                f"the job ran past this server's limit of {time_limit_s:g} s per job (max_job_seconds) and was "
                f"stopped after {steps_done} steps; ask for a shorter video or fewer steps",
            )
            return Outcome.TIMED_OUT
        log.info(
            f"request {job.request_id}: stopped after {steps_done} steps ({elapsed:.1f} s): the server is shutting down"
        )
        _quietly(sink.fail, Status.UNAVAILABLE, "the server is shutting down; retry later")
        return Outcome.STOPPED
    except SettingsError as e:
        log.info(f"request {job.request_id}: rejected: {e}")
        _quietly(sink.fail, Status.INVALID_ARGUMENT, str(e))
        return Outcome.INVALID
    except Exception as e:  # a bug or resource failure ends this job, not the server
        log.error(f"request {job.request_id}: failed:\n{traceback.format_exc()}")
        _quietly(sink.fail, Status.INTERNAL, f"generation failed: {type(e).__name__}: {e}")
        return Outcome.FAILED


def _quietly(action, *args) -> None:
    """Answering a client that has gone away may fail; there is nobody left to tell."""
    try:
        action(*args)
    except Exception:
        pass


_STOP = object()


class JobQueue:
    """At most `capacity` waiting jobs, run one at a time on a worker thread."""

    def __init__(
        self,
        pipeline,
        log: Log,
        capacity: int,
        shutdown_requested: Callable[[], bool] = _never,
        time_limit_s: float | None = None,
        observe: Callable[[Outcome, float], None] | None = None,
    ):
        """`observe(outcome, seconds)` is called after every job (server metrics)."""
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.time_limit_s = time_limit_s
        self._pipeline = pipeline
        self._log = log
        self._jobs: queue.Queue = queue.Queue(maxsize=capacity)
        self._last_job_s: float | None = None  # how long the last finished job ran, for retry hints
        self._stopping = threading.Event()
        self._shutdown_requested = shutdown_requested
        self._observe = observe
        self._worker = threading.Thread(target=self._work, name="framepack-jobs", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full or shutting down (the caller says UNAVAILABLE)."""
        if self.shutting_down():
            return False
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def refusal(self) -> str:
        """Why `submit` refused a job, with a retry hint: a queue slot frees when the running job ends."""
        if self.shutting_down():
            return "the server is shutting down; retry later"
        wait = f"in about {math.ceil(self._last_job_s)} s" if self._last_job_s is not None else "later"
        return f"the server is busy ({self.capacity} jobs already wait for this model instance); retry {wait}"

    def shutting_down(self) -> bool:
        return self._stopping.is_set() or self._shutdown_requested()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the running job at its next step, refuse the waiting ones, end the worker."""
        self._stopping.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                _quietly(job.sink.fail, Status.UNAVAILABLE, "the model is shutting down")
        self._jobs.put(_STOP)
        self._worker.join(timeout_s)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            started = time.perf_counter()
            outcome = run_job(self._pipeline, job, self._log, self.shutting_down, self.time_limit_s)
            seconds = time.perf_counter() - started
            if outcome is Outcome.DONE:
                self._last_job_s = seconds
            if self._observe is not None:
                try:
                    self._observe(outcome, seconds)
                except Exception as e:  # metrics must never stop the worker
                    self._log.error(f"job metrics not updated: {type(e).__name__}: {e}")
            self._log.info(f"request {job.request_id}: {outcome.value}; {release_memory().log_text()}")
