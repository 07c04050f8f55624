"""A video's record: what it was asked for, and what the server reported making it with.

The record goes into the MP4 (its `comment` tag, JSON; `ffprobe -show_format` shows it)
and into a JSON file beside it (`OUT.json` for `OUT.mp4`), both written atomically:

    {"format": "framepack-record/1",
     "image": {"path": "/abs/photo.png", "sha256": "..."},  # the start image's file, or null
     "video": {"path": "/abs/walk.mp4", "sha256": "...",     # or null: the clip extended,
               "context_frames": null, "frames_sent": 19, "extension_only": false},  # its options
     "end_image": {"path": ..., "sha256": ...},              # or null
     "keyframes": [{"time": 2.4, "path": ..., "sha256": ...}],
     "crf": 16,                                              # the client's MP4 quality
     "sent": {"prompt": "...", "parameters": {...}},         # the request as sent
     "inputs": ["end_image", "video"],                       # the tensor inputs it was made from
     "final": {...}}                                         # the final event as reported

The files' part is client/job_files.py's; records written before clips, end images and
keyframes were kept name the start image alone and still read.

`repeat_request` turns a record back into a request: the final event's `parameters` (the
server's, every setting resolved, so the same video comes again from a server with other
defaults), or what was sent plus the reported seed from a server older than them.
`recorded_files` gives back the files, each checked to hold what it held. `same_job` says
whether a record is of the job a request asks for (the queue skips finished jobs by it).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from framepack_wire import (
    END_IMAGE_INPUT,
    IMAGE_INPUT,
    KEYFRAME_TIMES_PARAMETER,
    KEYFRAMES_INPUT,
    PROMPT_PARAMETER,
    VIDEO_INPUT,
    FinalMeta,
    WireRequest,
)

from .job_files import InputFile, JobFiles, file_sha256, same_files
from .outputs import SavedFile, write_file_safely, write_video_safely
from .video import write_mp4

RECORD_FORMAT = "framepack-record/1"
MP4_TAG = "comment"
SEED_RANDOM = "random"


class RecordError(ValueError):
    """A record that cannot be read or used; the message is one line naming the file."""


ImageFile = InputFile  # the start image's file (the web UI and older callers pass one)


def job_record(request: WireRequest, inputs: Mapping[str, Any] | InputFile | None, crf: int,
               final: FinalMeta) -> dict[str, Any]:
    """The record of a finished job. `inputs`: its files (job_files.input_record), or the start
    image's file alone (a caller that keeps no other)."""
    if not isinstance(inputs, Mapping):
        inputs = {"image": None if inputs is None else inputs.to_json()}
    files = json.loads(json.dumps(dict(inputs)))
    if files.get("video") is not None and request.video is not None:
        files["video"]["frames_sent"] = len(request.video)  # what --from sends again: the same frames
    return {
        "format": RECORD_FORMAT,
        **files,
        "crf": crf,
        "sent": sent_part(request.prompt, request.parameters),
        "inputs": sorted(request.input_arrays()),  # the tensor inputs the job was made from
        "final": final.to_json(),
    }


def sent_part(prompt: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    # Through JSON, so a record read back compares equal to one made from a request.
    return json.loads(json.dumps({"prompt": prompt, "parameters": dict(parameters)}))


def same_job(record: Mapping[str, Any], prompt: str, parameters: Mapping[str, Any], inputs: Mapping[str, Any],
             crf: int) -> bool:
    """Whether `record` is of this prompt and these settings, made from files holding what
    `inputs` (job_files.input_record) hold, at this crf."""
    return (record.get("format") == RECORD_FORMAT and record.get("sent") == sent_part(prompt, parameters)
            and same_files(record, inputs) and record.get("crf") == crf)


def record_path(video: Path | str) -> Path:
    """The JSON file beside a video: OUT.mp4 → OUT.json."""
    return Path(video).with_suffix(".json")


def save_video(path: Path | str, frames: np.ndarray, fps: int, crf: int, record: Mapping[str, Any],
               before: Callable[[], Iterable[np.ndarray]] = tuple) -> SavedFile:
    """The MP4 with the record in its `comment` tag, then the record beside it (both atomic;
    a fallback file, with a message, when `path` cannot be written: outputs.py). `before()`:
    frames written first (an extension's source clip), asked for again by each try."""
    text = json.dumps(record, sort_keys=True)

    def write(target: Path, f: np.ndarray, rate: int, q: int) -> Path:
        return write_mp4(target, f, rate, q, metadata={MP4_TAG: text}, before=before())

    saved = write_video_safely(path, frames, fps, crf, write)
    beside = write_file_safely(record_path(saved.path), lambda target: write_atomically(target, text + "\n"),
                               what="record")
    if beside.fell_back and not saved.fell_back:
        return SavedFile(saved.path, beside.message)
    return saved


def write_atomically(path: Path, text: str) -> None:
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_record(path: Path | str) -> dict[str, Any]:
    """The record of an MP4 (its tag) or of a JSON record file; RecordError naming the file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            text = path.read_text(encoding="utf-8")
        else:
            text = _mp4_tag(path)
        record = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: cannot read its record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise RecordError(f"{path}: not a FramePack record (expected format {RECORD_FORMAT!r})")
    for key, kind in (("sent", dict), ("final", dict), ("crf", int)):
        if not isinstance(record.get(key), kind):
            raise RecordError(f"{path}: its record lacks {key!r}")
    return record


def read_record_if_any(path: Path | str) -> dict[str, Any] | None:
    """read_record, or None when the file is missing or holds no record."""
    try:
        return read_record(path)
    except RecordError:
        return None


def _mp4_tag(path: Path) -> str:
    import av  # here, not at the top: reading a JSON record works without PyAV

    try:
        with av.open(str(path)) as container:
            text = container.metadata.get(MP4_TAG)
    except av.FFmpegError as e:
        raise OSError(f"not a readable MP4: {e}") from None
    if text is None:
        raise OSError(f"no {MP4_TAG!r} tag")
    return text


def repeat_request(record: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(prompt, parameters) that ask for the recorded video again (see the module docstring).
    The keyframes' times travel with the keyframes (recorded_files), not among the settings."""
    final, sent = record["final"], record["sent"]
    reported = dict(final.get("parameters") or {})
    if reported:
        prompt = reported.pop(PROMPT_PARAMETER, sent.get("prompt", ""))
        reported.pop(KEYFRAME_TIMES_PARAMETER, None)
        return prompt, reported
    return sent.get("prompt", ""), {**sent.get("parameters", {}), "seed": final["seed"]}


def recorded_files(record: Mapping[str, Any], source: Path | str, given: JobFiles = JobFiles()) -> JobFiles:
    """The recorded job's files with those `given` (on the command line) in their place: a
    start image or clip replaces the recorded start, an end image the end image, keyframes all
    the keyframes. Each recorded file used must still hold what it held: RecordError naming
    the input and its path otherwise, or when the record does not keep a file the job used."""
    used = set(record.get("inputs") or ())
    image, video = given.image, given.video
    context, extension_only = given.context_frames, given.extension_only
    if image is None and video is None:
        if record.get("image") is not None or IMAGE_INPUT in used:
            image = _recorded_file(record.get("image"), source, "start image", "--image")
        if record.get("video") is not None or VIDEO_INPUT in used:
            clip = record.get("video") or {}
            video = _recorded_file(clip, source, "clip", "--video")
            sent = clip.get("frames_sent", clip.get("context_frames"))
            context = context if context is not None else sent
            extension_only = extension_only or bool(clip.get("extension_only"))
    end_image = given.end_image
    if end_image is None and (record.get("end_image") is not None or END_IMAGE_INPUT in used):
        end_image = _recorded_file(record.get("end_image"), source, "end image", "--end-image")
    keyframes = given.keyframes
    if not keyframes and (record.get("keyframes") or KEYFRAMES_INPUT in used):
        entries = record.get("keyframes") or [None]
        keyframes = tuple(_recorded_keyframe(entry, source) for entry in entries)
    return JobFiles(image, video, end_image, keyframes, context, extension_only)


def _recorded_keyframe(entry: object, source: Path | str) -> tuple[float, Path]:
    if not isinstance(entry, dict) or not isinstance(entry.get("time"), (int, float)):
        return 0.0, _recorded_file(None, source, "keyframes", "--keyframe")  # an older record: none kept
    return float(entry["time"]), _recorded_file(entry, source, f"keyframe at {entry['time']:g} s", "--keyframe")


def _recorded_file(entry: object, source: Path | str, what: str, option: str) -> Path:
    """A recorded file's path, checked to hold what it held; RecordError naming it otherwise."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise RecordError(f"{source}: the record does not keep the {what} the job was made from; give {option}")
    path = Path(entry["path"])
    if not path.is_file():
        raise RecordError(f"{source}: the {what} {path} is missing; give {option}")
    if file_sha256(path) != entry.get("sha256"):
        raise RecordError(f"{source}: the {what} {path} changed since (its sha256 differs); give {option}")
    return path


def recorded_inputs(record: Mapping[str, Any]) -> list[str]:
    """The files a record names, for a person: "start image /a/photo.png", "keyframe at 1.5 s /a/mid.png"."""
    named = [(record.get(key), what) for key, what in (("image", "start image"), ("video", "clip"),
                                                        ("end_image", "end image"))]
    keyframes = record.get("keyframes")
    for entry in keyframes if isinstance(keyframes, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("time"), (int, float)):
            named.append((entry, f"keyframe at {entry['time']:g} s"))
    return [f"{what} {entry['path']}" for entry, what in named if isinstance(entry, dict) and "path" in entry]


@dataclass(frozen=True)
class JobInputs:
    """What `framepack generate` sends: from the command line, or a record with the command
    line's values winning."""

    files: JobFiles
    prompt: str
    parameters: dict[str, Any]
    crf: int | None  # None: the client's default
    drawn_seed: int | None  # the seed drawn for `--seed random`


def job_inputs(
    source: Path | None, files: JobFiles, prompt: str | None, given: Mapping[str, Any], crf: int | None
) -> JobInputs:
    """The job's inputs: `files` and `given` settings (those on the command line), over the
    record of `source` (`--from`) when there is one. ValueError (one line) when the prompt is
    missing, or a recorded file the job needs is missing or changed (unless given instead)."""
    parameters: dict[str, Any] = {}
    if source is not None:
        record = read_record(source)
        recorded_prompt, parameters = repeat_request(record)
        prompt = recorded_prompt if prompt is None else prompt
        files = recorded_files(record, source, files)
        crf = record["crf"] if crf is None else crf
    if prompt is None:
        raise ValueError("--prompt is required (or --from a video or record of an earlier job)")
    parameters.update(given)
    parameters, drawn = with_random_seed(parameters)
    return JobInputs(files, prompt, parameters, crf, drawn)


def draw_seed() -> int:
    """A fresh random seed (for `--seed random`), reported so the video can be made again."""
    return secrets.randbelow(2**32)


def with_random_seed(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """`parameters` with `seed` "random" replaced by a drawn seed, and that seed (None if none drawn)."""
    if str(parameters.get("seed", "")).strip().lower() != SEED_RANDOM:
        return dict(parameters), None
    seed = draw_seed()
    return {**parameters, "seed": seed}, seed
