"""Generation jobs of a server: one bounded queue in front of one worker per GPU group.

A GPU group is what runs one job: one GPU, or N GPUs for sequence parallel (the CPU on a
machine without one). The server has one model instance, the owner of this queue, and
it holds every group's pipeline; each group's worker thread takes the next waiting job
as soon as its previous one ends, so a job never waits behind a busy group while another
is idle (separate instances with a queue each would make it do so).

Triton calls the model's `execute` on the instance's one thread. Running a job there
would make every other request wait, unanswered, until it ends. Instead `execute`
validates, then hands the job to this queue and returns, so a `describe` request is
answered at once however busy the groups are; a worker streams the job's responses
through the request's response sender. A full queue refuses new jobs at once
(UNAVAILABLE) instead of letting them pile up. The queue's load (waiting jobs, busy
groups) goes to the server's metrics after every change (`QueueLoad`), the number an
autoscaler reads.

On shutdown Triton lets running requests go on and tells the model nothing (a running
job kept the server alive until it ended). So the queue also polls `shutdown_requested`
(the launcher's shutdown file): running jobs stop at their next step and answer
UNAVAILABLE, and new ones are refused.

A job that waits behind others is told so: a `queued` response with its position and
how long it has waited, at once and then every few seconds until it starts. A refused
job's retry hint comes from how long recent jobs ran.

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
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Protocol, Sequence

from framepack_backend.errors import GenerationCancelled
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SettingsError

from .faults import Fault
from .job_memory import free_memory, memory_report
from .protocol import Status, WireResponse, queued_response, to_wire

QUEUED_EVENT_INTERVAL_S = 5.0  # how often a waiting job hears its position again
RECENT_JOBS = 5  # finished jobs whose durations make the busy server's retry hint


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


@dataclass(frozen=True)
class QueueLoad:
    """How loaded the server is: jobs waiting for a group, groups running a job, groups in service."""

    waiting: int
    busy: int
    groups: int


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

    The engine polls `stop` before every model evaluation and every chunk of a VAE decode,
    so a cancelled, shut down or overdue job stops before its next one. A client gone by
    the time the final response is ready counts as a cancel too: nobody receives the video.
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
            if response.final and sink.is_cancelled():
                raise GenerationCancelled()
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
    """At most `capacity` waiting jobs, each run by the first of the GPU groups to be free.

    `groups` holds one pipeline per GPU group (anything with `generate(request, cancel)`);
    a single pipeline is one group. A pipeline may also have `out_of_service`: why it can
    no longer run jobs (its weights changed: Pipeline.out_of_service), else None. After a
    failed job that sets it, its group takes no more jobs and the others run the queue;
    once no group is left, the waiting jobs are refused, so are new ones, and
    `on_out_of_service(reason)` is called (the model instance then has itself restarted).
    """

    def __init__(
        self,
        groups,
        log: Log,
        capacity: int,
        shutdown_requested: Callable[[], bool] = _never,
        time_limit_s: float | None = None,
        observe: Callable[[Outcome, float], None] | None = None,
        queued_interval_s: float = QUEUED_EVENT_INTERVAL_S,
        publish_load: Callable[[QueueLoad], None] | None = None,
        on_out_of_service: Callable[[str], None] | None = None,
    ):
        """`observe(outcome, seconds)` is called after every job (server metrics) and every
        INVALID_ARGUMENT refusal (`refuse_invalid`); `publish_load(load)` whenever a job
        arrives, starts or ends (and once at the start)."""
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        self._groups: list = list(groups) if isinstance(groups, Sequence) else [groups]
        if not self._groups:
            raise ValueError("a job queue needs at least one GPU group")
        self.capacity = capacity
        self.time_limit_s = time_limit_s
        self._log = log
        self._jobs: queue.Queue = queue.Queue(maxsize=capacity)
        # The waiting jobs in order with the time each arrived, and when each busy group's
        # job started; one lock orders `queued` responses before a job's own.
        self._lock = threading.Lock()
        self._waiting: list[tuple[Job, float]] = []
        self._running_since: dict[int, float] = {}
        self._out_of_service: dict[int, str] = {}  # group -> why it takes no more jobs
        self._on_out_of_service = on_out_of_service
        self._recent_s: deque[float] = deque(maxlen=RECENT_JOBS)  # durations of finished jobs, for retry hints
        self._stopping = threading.Event()
        self._shutdown_requested = shutdown_requested
        self._observe = observe
        self._publish_load = publish_load
        self._queued_interval_s = queued_interval_s
        with self._lock:
            self._publish()
        self._workers = [
            threading.Thread(target=self._work, args=(group,), name=f"framepack-group-{group}", daemon=True)
            for group in range(len(self._groups))
        ]
        for worker in self._workers:
            worker.start()
        self._ticker = threading.Thread(target=self._tell_waiting, name="framepack-queue", daemon=True)
        self._ticker.start()

    @property
    def groups(self) -> int:
        return len(self._groups)

    def load(self) -> QueueLoad:
        with self._lock:
            return self._load()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full or shutting down (the caller says UNAVAILABLE).

        A job that has to wait is told its position at once (a `queued` response).
        """
        if self.shutting_down():
            return False
        with self._lock:
            if not self._in_service():
                return False
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                return False
            self._waiting.append((job, time.perf_counter()))
            position = self._position(len(self._waiting) - 1)
            # The metrics first: a client told it waits then finds the waiting job counted.
            self._publish()
            if position > 0:
                _quietly(job.sink.send, queued_response(position, 0.0))
        return True

    def refuse_invalid(self, sink: ResponseSink, error: SettingsError) -> None:
        """Refuse a request that failed its checks on arrival (INVALID_ARGUMENT), counted like an invalid job."""
        _quietly(sink.fail, Status.INVALID_ARGUMENT, str(error))
        self._count(Outcome.INVALID, 0.0)

    def refusal(self) -> str:
        """Why `submit` refused a job, with a retry hint: a queue slot frees when a running job ends.

        The hint is the recent jobs' mean duration less what the longest-running job has
        already run (the one likely to end first).
        """
        if self.shutting_down():
            return "the server is shutting down; retry later"
        with self._lock:
            if not self._in_service():
                return self._out_of_service_text()
            recent, running_since = list(self._recent_s), list(self._running_since.values())
        busy = f"the server is busy ({self.capacity} jobs already wait for this model instance)"
        if not recent:
            return f"{busy}; retry later"
        mean = sum(recent) / len(recent)
        # A free group is taking the next job up, which frees a slot at once.
        free_group = len(running_since) < self._in_service()
        ran = mean if free_group else time.perf_counter() - min(running_since)
        left = max(math.ceil(mean - ran), 1)
        jobs = "the last job" if len(recent) == 1 else f"the last {len(recent)} jobs"
        return f"{busy}; retry in about {left} s (an estimate from how long {jobs} ran)"

    def shutting_down(self) -> bool:
        return self._stopping.is_set() or self._shutdown_requested()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the running jobs at their next step, refuse the waiting ones, end the workers."""
        self._stopping.set()
        self._refuse_waiting("the model is shutting down")
        with self._lock:
            working = self._in_service()  # a group out of service has ended its worker
        for _ in range(working):
            self._jobs.put(_STOP)
        for worker in self._workers:
            worker.join(timeout_s)
        self._ticker.join(timeout_s)

    def _refuse_waiting(self, text: str) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                self._leave_waiting(job, group=None)
                _quietly(job.sink.fail, Status.UNAVAILABLE, text)

    def _in_service(self) -> int:
        return len(self._groups) - len(self._out_of_service)

    def _out_of_service_text(self) -> str:
        reasons = "; ".join(sorted(set(self._out_of_service.values())))
        return f"this model instance can no longer run jobs ({reasons}); retry later"

    def _take_out_of_service(self, group: int, reason: str) -> None:
        """`group` takes no more jobs; with none left, refuse the waiting ones and say so."""
        with self._lock:
            self._out_of_service[group] = reason
            left, text = self._in_service(), self._out_of_service_text()
            self._publish()
        if left:
            self._log.error(f"GPU group {group} is out of service: {reason}; {left} other group(s) run the jobs")
            return
        self._log.error(f"every GPU group is out of service ({reason}); waiting and new jobs are refused")
        self._refuse_waiting(text)
        if self._on_out_of_service is not None:
            self._on_out_of_service(reason)

    def _load(self) -> QueueLoad:
        return QueueLoad(waiting=len(self._waiting), busy=len(self._running_since), groups=self._in_service())

    def _publish(self) -> None:
        """Hand the load to the metrics; called with the lock held, so updates arrive in order."""
        if self._publish_load is not None:
            try:
                self._publish_load(self._load())
            except Exception as e:  # metrics must never stop the queue
                self._log.error(f"queue metrics not updated: {type(e).__name__}: {e}")

    def _position(self, index: int) -> int:
        """The `queued` position of the waiting job at `index`: 1 is next; 0 or less: a free group takes it now."""
        free = self._in_service() - len(self._running_since)
        return index + 1 - free

    def _leave_waiting(self, job: Job, group: int | None) -> None:
        """`job` leaves the waiting list, to run on `group` or (None) to be refused; no `queued` response follows."""
        with self._lock:
            self._waiting = [(waiting, since) for waiting, since in self._waiting if waiting is not job]
            if group is not None:
                self._running_since[group] = time.perf_counter()
            self._publish()

    def _tell_waiting(self) -> None:
        while not self._stopping.wait(self._queued_interval_s):
            with self._lock:
                now = time.perf_counter()
                for index, (job, since) in enumerate(self._waiting):
                    position = self._position(index)
                    # Position 0 or less: a worker is taking it up between two jobs.
                    if position > 0 and not job.sink.is_cancelled():
                        _quietly(job.sink.send, queued_response(position, now - since))

    def _count(self, outcome: Outcome, seconds: float) -> None:
        if self._observe is not None:
            try:
                self._observe(outcome, seconds)
            except Exception as e:  # metrics must never stop the worker
                self._log.error(f"job metrics not updated: {type(e).__name__}: {e}")

    def _work(self, group: int) -> None:
        pipeline = self._groups[group]
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            self._leave_waiting(job, group)
            if len(self._groups) > 1:
                self._log.info(f"request {job.request_id}: running on GPU group {group}")
            started = time.perf_counter()
            outcome = run_job(pipeline, job, self._log, self.shutting_down, self.time_limit_s)
            seconds = time.perf_counter() - started
            with self._lock:
                del self._running_since[group]
                if outcome is Outcome.DONE:
                    self._recent_s.append(seconds)
                self._publish()
            self._count(outcome, seconds)
            free_memory()
            with self._lock:
                # Count the live tensors only while no other group runs a job (job_memory.py
                # says why), holding the lock so that none starts meanwhile.
                memory = memory_report(count_tensors=not self._running_since)
            self._log.info(f"request {job.request_id}: {outcome.value}; {memory.log_text()}")
            reason = getattr(pipeline, "out_of_service", None) if outcome is Outcome.FAILED else None
            if reason:
                self._take_out_of_service(group, reason)
                return
