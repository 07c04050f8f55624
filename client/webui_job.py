"""One web-UI job: stream it from the server and turn its events into what the page shows.

Nothing here imports Gradio, so the job logic is testable without a browser: `run_job`
yields `JobUpdate`s, and `client/webui.py` puts them on the page.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from framepack_wire import WireRequest

from . import stream
from .connection import Endpoint, Unreachable, as_endpoint, connect_attempts
from .progress import JobClock, plan_text, queued_text
from .provenance import ImageFile, job_record, save_video
from .source_video import source_frames
from .video import CRF_DEFAULT, FrameAssembler, write_mp4


@dataclass(frozen=True)
class JobUpdate:
    """What changed on the page; a part left None stays as it is."""

    status: str
    preview: np.ndarray | None = None  # the latest step's preview image
    video: Path | None = None  # the video so far (rewritten after every section), at the end the whole one
    final: Path | None = None  # the finished MP4, offered for download
    record: dict | None = None  # the finished MP4's record (client/provenance.py): what it was made with


class StopSignals:
    """The Stop button's flag for the job each browser session is running."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags[session] = flag
        return flag

    def stop(self, session: str) -> bool:
        """Raise the session's flag; False when it runs no job."""
        with self._lock:
            flag = self._flags.get(session)
        if flag is not None:
            flag.set()
        return flag is not None

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]


def run_job(
    server: str | Endpoint,
    request: WireRequest,
    folder: Path,
    stop_requested: Callable[[], bool],
    crf: int = CRF_DEFAULT,
    inputs: Mapping[str, Any] | ImageFile | None = None,
    *,
    source: Path | None = None,
) -> Iterator[JobUpdate]:
    """Stream one job into `folder`, its MP4s encoded at `crf`; the last update says how it
    ended (never raises ServerError). The finished MP4 carries its record (`inputs`: the job's
    files, job_files.input_record, or the start image's file) and has it beside it as JSON. `source`: the clip the
    job extends, which the finished MP4 shows before the new frames.

    Connecting comes first, on its own: a server that does not answer is shown at once,
    with the retries left, instead of a job that seems to wait for its first step. Each
    section's MP4 of the video so far replaces the previous one, which is deleted once the
    page shows the new one; the finished MP4 replaces the last.
    """
    endpoint = as_endpoint(server)
    yield JobUpdate(f"Connecting to {endpoint.address}…")
    attempts = connect_attempts(endpoint)
    try:
        while True:
            try:
                failed = next(attempts)
            except StopIteration as ready:
                ready.value.close()
                break
            if stop_requested():
                yield JobUpdate("Cancelled before the job was sent; no video was written.")
                return
            yield JobUpdate(
                f"Cannot reach the server at {endpoint.address} ({failed.problem}); "
                f"retrying for up to {failed.left_s:.0f} s…"
            )
    except Unreachable as e:
        yield JobUpdate(f"Error: {stream.ServerError('UNAVAILABLE', str(e))}")
        return
    yield JobUpdate(f"Sent to {endpoint.address}; waiting for the first step…")
    assembler = FrameAssembler()
    final = None
    shown: Path | None = None  # the partial MP4 on the page
    job_clock = JobClock()
    plan = ""
    try:
        for event in stream.generate(server, request, cancel=stop_requested):
            job_clock.update(event)
            if isinstance(event, stream.Queued):
                yield JobUpdate(queued_text(event) + "…")
            elif isinstance(event, stream.Plan):
                plan = plan_text(event)
                yield JobUpdate(f"Planned {plan}; starting…")
            elif isinstance(event, stream.Phase):
                yield JobUpdate(_with_plan(job_clock.text(), plan))
            elif isinstance(event, stream.Progress):
                yield JobUpdate(_with_plan(progress_text(event, job_clock), plan), preview=event.preview)
            elif isinstance(event, stream.Section):
                assembler.add(event.start_frame, event.frames, event.total_frames)
                # A new name each time: the browser and Gradio's cache treat it as a new video.
                partial = write_mp4(
                    folder / f"partial_{event.section:02d}.mp4", assembler.received(), event.fps, crf
                )
                yield JobUpdate(section_text(event, len(assembler.received()), job_clock), video=partial)
                _discard(shown)
                shown = partial
            elif isinstance(event, stream.Final):
                final = event
        if final is None:
            if stop_requested():
                yield JobUpdate("Cancelled: the job was stopped on the server; no video was written.")
            else:
                yield JobUpdate("Error: the server ended the stream without a final response.")
            return
        video = assembler.video()
        if len(video) != final.frame_count:
            raise ValueError(f"received {len(video)} frames, the server reported {final.frame_count}")
    except stream.ServerError as e:
        yield JobUpdate(f"Error: {e}")
        return
    except ValueError as e:  # frames that do not fit together
        yield JobUpdate(f"Error: {e}")
        return
    record = job_record(request, inputs, crf, final)

    def before():
        return source_frames(source, final.width, final.height) if source is not None else ()

    saved = save_video(folder / f"framepack_seed{final.seed}.mp4", video, final.fps, crf, record, before=before)
    text = done_text(final) if saved.message is None else f"{done_text(final)}\n{saved.message}"
    yield JobUpdate(text, video=saved.path, final=saved.path, record=record)
    _discard(shown)


def _discard(partial: Path | None) -> None:
    """Delete a superseded partial MP4 (the frames are in the next one)."""
    if partial is not None:
        partial.unlink(missing_ok=True)


def progress_text(event: stream.Progress, job_clock: JobClock | None = None) -> str:
    """The status of a step: where the job is, the time elapsed on the server and the ETA
    (steps and decodes left, see progress.JobClock; `job_clock` has seen the event)."""
    if job_clock is None:
        job_clock = JobClock()
        job_clock.update(event)
    return job_clock.text()


def section_text(event: stream.Section, frames_so_far: int, job_clock: JobClock | None = None) -> str:
    text = (
        f"Section {event.section}/{event.sections} done · {frames_so_far} of {event.total_frames} frames "
        f"({frames_so_far / event.fps:.1f} s of video)"
    )
    eta = job_clock.eta_text() if job_clock is not None and event.section < event.sections else ""
    return f"{text} · {eta}" if eta else text


def done_text(final: stream.Final) -> str:
    return (
        f"Done: {final.frame_count} frames = {final.frame_count / final.fps:.2f} s, {final.width}×{final.height} "
        f"at {final.fps} fps, seed {final.seed}, {final.timings.get('total_s', 0.0):.1f} s on the server."
    )


def _with_plan(text: str, plan: str) -> str:
    return f"{text}\n{plan[:1].upper()}{plan[1:]}" if plan else text

