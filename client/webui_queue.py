"""The web UI's queue: the page's current inputs and settings added as jobs, run one after another
on the page's server by the batch queue's job runner (client/queue.py: retries when the
server is busy, the MP4 with its record, atomically), listed with their status,
cancelled one by one, each result offered for download.

No Gradio here, so it is testable without a browser; client/webui.py shows it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .connection import Endpoint, as_endpoint
from .job_files import JobFiles
from .queue import Outcome, QueueJob, run_job

RunJob = Callable[..., Outcome]  # client.queue.run_job's signature
COLUMNS = ["job", "prompt", "status", "note"]
PROMPT_SHOWN = 60


@dataclass
class PageJob:
    number: int  # 1-based, in the order added
    outcome: Outcome
    stop: threading.Event = field(default_factory=threading.Event)


class PageQueue:
    """Jobs of one page, run in the order added by one worker thread (the server runs one
    job at a time anyway); thread-safe."""

    def __init__(self, server: str | Endpoint, output_dir: Path, run: RunJob = run_job):
        self._endpoint = as_endpoint(server)
        self._output_dir = Path(output_dir)
        self._run = run
        self._jobs: list[PageJob] = []
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None

    def add(self, files: JobFiles, prompt: str, settings: dict, crf: int) -> int:
        """Queue a job; its number. Its MP4 will be OUTPUT_DIR/queue/job_NNN.mp4."""
        with self._lock:
            number = len(self._jobs) + 1
            output = self._output_dir / "queue" / f"job_{number:03d}.mp4"
            job = QueueJob(number, files, prompt, dict(settings), output, crf)
            self._jobs.append(PageJob(number, Outcome(job)))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, daemon=True, name="page-queue")
                self._worker.start()
            self._work.notify()
        return number

    def cancel(self, number: int) -> str:
        """Cancel a waiting or running job; a sentence saying what happened."""
        with self._lock:
            if not 1 <= number <= len(self._jobs):
                return f"There is no job {number}."
            job = self._jobs[number - 1]
            status = job.outcome.status
            if status == "waiting":
                job.outcome.status, job.outcome.message = "cancelled", "before it started"
            if status in ("waiting", "running"):
                job.stop.set()
                return f"Job {number} cancelled."
        return f"Job {number} is {status}; nothing to cancel."

    def rows(self) -> list[list[object]]:
        """One row per job (COLUMNS), in the order added."""
        with self._lock:
            return [[job.number, _shortened(job.outcome.job.prompt), job.outcome.status, job.outcome.message]
                    for job in self._jobs]

    def results(self) -> list[str]:
        """The finished jobs' MP4s, in the order added."""
        with self._lock:
            return [str(job.outcome.job.output) for job in self._jobs if job.outcome.status == "done"]

    def _serve(self) -> None:
        while True:
            with self._lock:
                while (job := self._next()) is None:
                    self._work.wait()
                job.outcome.status = "running"
            try:
                self._run(self._endpoint, job.outcome.job, job.outcome, stop=job.stop)
            except Exception as e:  # a fault in the client itself: that job fails, the queue goes on
                job.outcome.status = "failed"
                job.outcome.message = f"internal error in the page's queue: {type(e).__name__}: {e}"

    def _next(self) -> PageJob | None:
        return next((job for job in self._jobs if job.outcome.status == "waiting"), None)


def page_job_files(image: str | None, clip: str | None, text_to_video: bool, end_image: str | None) -> JobFiles:
    """The files of the page's current job as its upload fields hold them, keyframes aside
    (client/webui.py: page_job adds them with their times); ValueError (the page's sentence)
    when they do not make a job. Text to video drops the start image."""
    if image is None and clip is None and not text_to_video:
        raise ValueError("Upload a start image (or a clip to extend, or tick text to video) first.")
    if image is not None and clip is not None:
        raise ValueError("Give a start image or a clip to extend, not both.")
    return JobFiles(image=Path(image) if image is not None and not text_to_video else None,
                    video=Path(clip) if clip is not None else None,
                    end_image=Path(end_image) if end_image else None)


def _shortened(text: str) -> str:
    return text if len(text) <= PROMPT_SHOWN else text[: PROMPT_SHOWN - 1] + "…"
