"""`framepack queue JOBS_FILE`: many jobs over one or several servers, resumable.

The jobs file has one JSON object per line (blank lines and lines starting with # are
skipped); relative paths are relative to the file's folder:

    {"image": "cat.png", "prompt": "the cat yawns", "settings": {"seconds": 3, "seed": 7}, "output": "cat.mp4"}
    {"video": "walk.mp4", "prompt": "he turns", "extension_only": true, "output": "turn.mp4"}
    {"image": "a.png", "end_image": "b.png", "keyframes": ["2.4:mid.png"], "prompt": "...", "output": "ab.mp4"}
    {"prompt": "a cat on a sofa", "settings": {"latent_init": "noise"}, "output": "t2v.mp4"}

`prompt` and `output` are required; the inputs are `framepack generate`'s options by their
field names (`image` or `video`, neither for text-to-video; `end_image`; `keyframes`, a list
in --keyframe's SECONDS:PATH syntax; `context_frames` and `extension_only` with a video),
checked as the command line checks them (client/job_files.py). `settings` are request
parameters by name (checked by the server: a bad value fails that job, with the server's
one-line reason); `crf` is the MP4's quality. A line that cannot be read stops everything
before any job is sent, with the line number and the field.

Jobs are spread over the servers (`--server A,B`), `--per-server N` in flight on each. A
job refused as UNAVAILABLE (the server is busy or restarting) is sent again after the
server's retry hint, or an exponential backoff when it gave none, up to `--retries`
times. One job failing does not stop the others; the summary lists every job and the
exit status is 1 when any failed.

Resuming: a job whose output exists and records this very job (client/provenance.py:
same request, the same content in every input file, same crf) is skipped, so running the
same file again after a crash or a failure makes only what is missing; a job whose clip or
image changed is made again. Outputs are written atomically: an MP4 is complete with its
record, or absent.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from framepack_wire import Status, WireRequest

from . import stream
from .connection import Endpoint
from .guides import keyframe_argument
from .job_files import FIELD_NAMES, JobFiles, clip_frames_read, context_frame_count, input_record, load_inputs
from .outputs import OutputPathError, check_output_paths
from .provenance import SEED_RANDOM, job_record, read_record_if_any, same_job, save_video
from .source_video import source_frames
from .video import CRF_DEFAULT, FrameAssembler, parse_crf

FILE_FIELDS = ("image", "video", "end_image")
JOB_FIELDS = ("prompt", "output", *FILE_FIELDS, "keyframes", "context_frames", "extension_only", "settings", "crf")
REQUIRED_FIELDS = ("prompt", "output")
# The busy server's refusal ends "retry in about N s (an estimate ...)" (framepack_server/jobs.py).
RETRY_HINT = re.compile(r"retry in about (\d+(?:\.\d+)?) s")
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
DEFAULT_RETRIES = 5


class JobsFileError(ValueError):
    """A jobs file that cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class QueueJob:
    line: int  # in the jobs file, 1-based
    files: JobFiles
    prompt: str
    settings: dict[str, str | int | float | bool]
    output: Path
    crf: int


def read_jobs(path: Path | str) -> list[QueueJob]:
    """Every job of a jobs file; JobsFileError at the first bad line or a repeated output."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JobsFileError(f"{path}: cannot be read ({e})") from None
    jobs: list[QueueJob] = []
    outputs: dict[Path, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        job = parse_job(text, number, path.parent, where=f"{path}:{number}")
        if job.output in outputs:
            raise JobsFileError(f"{path}:{number}: field 'output': {job.output} is also the output of line "
                                f"{outputs[job.output]}")
        outputs[job.output] = number
        jobs.append(job)
    if not jobs:
        raise JobsFileError(f"{path}: no jobs (one JSON object per line)")
    return jobs


def parse_job(text: str, line: int, folder: Path, where: str = "") -> QueueJob:
    """One line of a jobs file; JobsFileError naming `where` (file:line) and the field."""
    where = where or f"line {line}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise JobsFileError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise JobsFileError(f"{where}: expected a JSON object, got {type(value).__name__}")

    def bad(name: str, allowed: str) -> JobsFileError:
        shown = json.dumps(value.get(name))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return JobsFileError(f"{where}: field {name!r}: {shown} is not allowed: expected {allowed}")

    for name in value:
        if name not in JOB_FIELDS:
            raise JobsFileError(f"{where}: field {name!r} is not a job field: expected {', '.join(JOB_FIELDS)}")
    for name in REQUIRED_FIELDS:
        if name not in value:
            raise JobsFileError(f"{where}: field {name!r} is missing")
    for name in (*REQUIRED_FIELDS, *FILE_FIELDS):
        if name in value and (not isinstance(value[name], str) or not value[name].strip()):
            raise bad(name, "a non-empty string")
    settings = value.get("settings", {})
    if not isinstance(settings, dict):
        raise bad("settings", "an object of settings by name, e.g. {\"seconds\": 2}")
    for name, setting in settings.items():
        if not isinstance(setting, (str, int, float, bool)):
            raise bad("settings", f"a string, number or true/false for setting {name!r}")
        if name == "prompt":
            raise bad("settings", "the prompt in the field 'prompt', not among the settings")
        if name == "seed" and str(setting).strip().lower() == SEED_RANDOM:
            raise bad("settings", "a number for 'seed': with a random one a re-run could not tell the job is done")
    try:
        crf = parse_crf(value["crf"]) if "crf" in value else CRF_DEFAULT
    except ValueError:
        raise bad("crf", "an int in [0, 51]") from None
    files = job_files(value, folder, where, bad)
    return QueueJob(line, files, value["prompt"], dict(settings), folder / value["output"], crf)


def job_files(value: dict, folder: Path, where: str, bad: Callable[[str, str], JobsFileError]) -> JobFiles:
    """A line's input files, checked by `framepack generate`'s own parsers and rules."""
    keyframes = value.get("keyframes", [])
    if not isinstance(keyframes, list) or not all(isinstance(k, str) for k in keyframes):
        raise bad("keyframes", 'a list of "SECONDS:PATH", e.g. ["2.5:middle.png"]')
    try:
        timed = tuple((seconds, folder / path) for seconds, path in map(keyframe_argument, keyframes))
    except argparse.ArgumentTypeError as e:
        raise JobsFileError(f"{where}: field 'keyframes': {e}") from None
    context = value.get("context_frames")
    if context is not None:
        if isinstance(context, bool) or not isinstance(context, (int, str)):
            raise bad("context_frames", "a whole number of frames")
        try:
            context = context_frame_count(str(context))
        except argparse.ArgumentTypeError as e:
            raise JobsFileError(f"{where}: field 'context_frames': {e}") from None
    extension_only = value.get("extension_only", False)
    if not isinstance(extension_only, bool):
        raise bad("extension_only", "true or false")
    path = {name: folder / value[name] if name in value else None for name in FILE_FIELDS}
    files = JobFiles(path["image"], path["video"], path["end_image"], timed, context, extension_only)
    conflict = files.conflict(FIELD_NAMES)
    if conflict is not None:
        raise JobsFileError(f"{where}: {conflict}")
    return files


@dataclass
class Outcome:
    job: QueueJob
    status: str = "waiting"  # waiting, running, done, skipped, failed, cancelled
    server: str = ""
    seconds: float = 0.0
    attempts: int = 0
    message: str = ""


def retry_delay(error: stream.ServerError, attempt: int) -> float:
    """How long to wait before sending a job again: the server's hint, else a backoff that
    doubles per attempt (1-based); never less than the backoff, so a retry storm cannot form."""
    backoff = min(FIRST_BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)
    hint = RETRY_HINT.search(error.message)
    return max(float(hint.group(1)), backoff) if hint else backoff


def run_job(
    endpoint: Endpoint,
    job: QueueJob,
    outcome: Outcome,
    *,
    retries: int = DEFAULT_RETRIES,
    stop: threading.Event | None = None,
) -> Outcome:
    """Run (or skip) one job on one server, retrying UNAVAILABLE; fills in `outcome`."""
    stop = stop or threading.Event()
    started = time.monotonic()
    outcome.server = endpoint.address
    try:
        # Created here, not by the check: the check removes folders it made, under another job's feet.
        job.output.parent.mkdir(parents=True, exist_ok=True)
        check_output_paths(job.output)
        inputs = input_record(job.files, FIELD_NAMES)
    except (OutputPathError, OSError, ValueError) as e:
        outcome.status, outcome.message = "failed", str(e)
        return outcome
    record = read_record_if_any(job.output)
    if record is not None and same_job(record, job.prompt, job.settings, inputs, job.crf):
        outcome.status, outcome.message = "skipped", f"done before (seed {record['final'].get('seed')})"
        return outcome
    outcome.status = "running"
    request = None
    while True:
        outcome.attempts += 1
        try:
            if request is None:
                request = load_inputs(job.files, job.prompt, job.settings, FIELD_NAMES,
                                      reads=lambda: clip_frames_read(endpoint, job.settings)).request
            final = _generate(endpoint, request, job, inputs, stop)
        except stream.ServerError as e:
            if e.status == Status.UNAVAILABLE.value and outcome.attempts <= retries and not stop.is_set():
                delay = retry_delay(e, outcome.attempts)
                outcome.message = f"retrying in {delay:.0f} s: {e}"
                if stop.wait(delay):
                    break
                continue
            outcome.status, outcome.message = "failed", str(e)
        except (OSError, ValueError) as e:  # an input that cannot be used; the video could not be written anywhere
            outcome.status, outcome.message = "failed", str(e)
        else:
            if final is None:
                outcome.status, outcome.message = "cancelled", "stopped before it finished"
            else:
                outcome.status, outcome.message = "done", f"seed {final.seed}, {final.frame_count} frames"
        break
    if stop.is_set() and outcome.status == "running":
        outcome.status, outcome.message = "cancelled", "stopped before it finished"
    outcome.seconds = time.monotonic() - started
    return outcome


def _generate(endpoint: Endpoint, request: WireRequest, job: QueueJob, inputs: dict,
              stop: threading.Event) -> stream.Final | None:
    assembler = FrameAssembler()
    final = None
    for event in stream.generate(endpoint, request, cancel=stop.is_set):
        if isinstance(event, stream.Section):
            assembler.add(event.start_frame, event.frames, event.total_frames)
        elif isinstance(event, stream.Final):
            final = event
    if final is None:
        if stop.is_set():
            return None
        raise stream.ServerError("UNKNOWN", "the server ended the stream without a final response")

    def before():  # an extension's MP4 shows the clip before the new frames, as the CLI's does
        if job.files.video is None or not job.files.combined:
            return ()
        return source_frames(job.files.video, final.width, final.height, label="field 'video'")

    record = job_record(request, inputs, job.crf, final)
    saved = save_video(job.output, assembler.video(), final.fps, job.crf, record, before=before)
    if saved.fell_back:
        raise OSError(saved.message)
    return final


def run_queue(
    jobs: Iterable[QueueJob],
    servers: list[Endpoint],
    per_server: int = 1,
    *,
    retries: int = DEFAULT_RETRIES,
    show_progress: bool = True,
    stop: threading.Event | None = None,
) -> list[Outcome]:
    """Every job, spread over `servers` with `per_server` in flight on each; the outcomes in
    the jobs' order. Ctrl-C (KeyboardInterrupt) cancels the running jobs and returns."""
    outcomes = [Outcome(job) for job in jobs]
    stop = stop or threading.Event()
    waiting: queue.Queue[Outcome] = queue.Queue()
    for outcome in outcomes:
        waiting.put(outcome)
    bar = tqdm(total=len(outcomes), unit="job", disable=not show_progress)
    lock = threading.Lock()

    def worker(endpoint: Endpoint) -> None:
        while not stop.is_set():
            try:
                outcome = waiting.get_nowait()
            except queue.Empty:
                return
            run_job(endpoint, outcome.job, outcome, retries=retries, stop=stop)
            with lock:
                bar.update(1)
                failed = sum(o.status == "failed" for o in outcomes)
                bar.set_postfix_str(f"{failed} failed" if failed else "", refresh=True)

    threads = [threading.Thread(target=worker, args=(endpoint,), daemon=True)
               for endpoint in servers for _ in range(per_server)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        bar.close()
    for outcome in outcomes:
        if outcome.status == "waiting" and stop.is_set():
            outcome.status, outcome.message = "cancelled", "not started"
    return outcomes


def summary_table(outcomes: list[Outcome]) -> str:
    rows = [("line", "status", "output", "server", "time", "note")]
    for o in outcomes:
        rows.append((str(o.job.line), o.status, str(o.job.output), o.server,
                     f"{o.seconds:.1f} s" if o.status == "done" else "", o.message))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed",
                                                                               "cancelled")}
    lines.append(", ".join(f"{count} {status}" for status, count in counts.items() if count or status == "failed"))
    return "\n".join(line.rstrip() for line in lines)


def server_list(text: str) -> list[str]:
    """The addresses of `--server A,B,...` (ValueError for an empty one)."""
    addresses = [part.strip() for part in text.split(",")]
    if not addresses or any(not address for address in addresses):
        raise ValueError(f"--server {text!r}: expected addresses HOST[:PORT] separated by commas")
    return addresses


def per_server_count(text: str) -> int:
    """An argparse type: jobs in flight per server, 1..64."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: expected an int in [1, 64]")
    return value


def finished_ok(outcomes: list[Outcome]) -> bool:
    return all(o.status in ("done", "skipped") for o in outcomes)


__all__ = ["JobsFileError", "QueueJob", "read_jobs", "parse_job", "Outcome", "run_job", "run_queue",
           "retry_delay", "summary_table", "server_list", "per_server_count", "finished_ok"]
