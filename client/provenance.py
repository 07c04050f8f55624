"""A video's record: what it was asked for, and what the server reported making it with.

The record goes into the MP4 (its `comment` tag, JSON; `ffprobe -show_format` shows it)
and into a JSON file beside it (`OUT.json` for `OUT.mp4`), both written atomically:

    {"format": "framepack-record/1",
     "image": {"path": "/abs/photo.png", "sha256": "..."},  # the start image's file
     "crf": 16,                                              # the client's MP4 quality
     "sent": {"prompt": "...", "parameters": {...}},         # the request as sent
     "final": {...}}                                         # the final event as reported

`repeat_request` turns a record back into a request: the final event's `parameters` (the
server's, every setting resolved, so the same video comes again from a server with other
defaults), or what was sent plus the reported seed from a server older than them.
`same_job` says whether a record is of the job a request asks for (the queue skips
finished jobs by it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from framepack_wire import IMAGE_INPUT, PROMPT_PARAMETER, FinalMeta, WireRequest

from .outputs import SavedFile, write_file_safely, write_video_safely
from .video import write_mp4

RECORD_FORMAT = "framepack-record/1"
MP4_TAG = "comment"
SEED_RANDOM = "random"


class RecordError(ValueError):
    """A record that cannot be read or used; the message is one line naming the file."""


@dataclass(frozen=True)
class ImageFile:
    """The start image's file: where it was and what it held."""

    path: Path
    sha256: str

    @classmethod
    def of(cls, path: Path | str) -> ImageFile:
        path = Path(path).absolute()
        return cls(path, file_sha256(path))

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_record(request: WireRequest, image: ImageFile | None, crf: int, final: FinalMeta) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "image": None if image is None else image.to_json(),
        "crf": crf,
        "sent": sent_part(request),
        "inputs": sorted(request.input_arrays()),  # the tensor inputs the job was made from
        "final": final.to_json(),
    }


def sent_part(request: WireRequest) -> dict[str, Any]:
    # Through JSON, so a record read back compares equal to one made from a request.
    return json.loads(json.dumps({"prompt": request.prompt, "parameters": dict(request.parameters)}))


def same_job(record: Mapping[str, Any], request: WireRequest, image: ImageFile, crf: int) -> bool:
    """Whether `record` is of this request from this image file (its content), at this crf."""
    recorded_image = record.get("image") or {}
    return (record.get("format") == RECORD_FORMAT and record.get("sent") == sent_part(request)
            and recorded_image.get("sha256") == image.sha256 and record.get("crf") == crf)


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
    """(prompt, parameters) that ask for the recorded video again (see the module docstring)."""
    final, sent = record["final"], record["sent"]
    reported = dict(final.get("parameters") or {})
    if reported:
        prompt = reported.pop(PROMPT_PARAMETER, sent.get("prompt", ""))
        return prompt, reported
    return sent.get("prompt", ""), {**sent.get("parameters", {}), "seed": final["seed"]}


def check_repeatable(record: Mapping[str, Any], source: Path | str) -> None:
    """RecordError when the job used inputs a record does not keep (a clip, an end image,
    keyframes): repeating it without them would make a different video."""
    kept = {IMAGE_INPUT}
    others = sorted(set(record.get("inputs") or ()) - kept)
    if others:
        raise RecordError(f"{source}: the job was made from {', '.join(others)} as well, which a record does not "
                          "keep; --from repeats jobs made from a start image or from text alone")


def recorded_image(record: Mapping[str, Any], source: Path | str) -> Path:
    """The recorded start image's path, checked to hold what it held; RecordError otherwise."""
    image = record.get("image")
    if not isinstance(image, dict) or not isinstance(image.get("path"), str):
        raise RecordError(f"{source}: the record names no start image; give --image")
    path = Path(image["path"])
    if not path.is_file():
        raise RecordError(f"{source}: the start image {path} is missing; give --image")
    if file_sha256(path) != image.get("sha256"):
        raise RecordError(f"{source}: the start image {path} changed since (its sha256 differs); give --image")
    return path


@dataclass(frozen=True)
class JobInputs:
    """What `framepack generate` sends: from the command line, or a record with the command
    line's values winning."""

    image: Path
    prompt: str
    parameters: dict[str, Any]
    crf: int | None  # None: the client's default
    drawn_seed: int | None  # the seed drawn for `--seed random`


def job_inputs(
    source: Path | None, image: Path | None, prompt: str | None, given: Mapping[str, Any], crf: int | None
) -> JobInputs:
    """The job's inputs: `given` settings (those on the command line), over the record of
    `source` (`--from`) when there is one. ValueError (one line) when the image or the
    prompt is missing, or the record's image is missing or changed (unless --image)."""
    parameters: dict[str, Any] = {}
    if source is not None:
        record = read_record(source)
        check_repeatable(record, source)
        recorded_prompt, parameters = repeat_request(record)
        prompt = recorded_prompt if prompt is None else prompt
        if image is None and record.get("image") is not None:  # none recorded: text-to-video
            image = recorded_image(record, source)
        crf = record["crf"] if crf is None else crf
    if prompt is None:
        raise ValueError("--prompt is required (or --from a video or record of an earlier job)")
    parameters.update(given)
    parameters, drawn = with_random_seed(parameters)
    return JobInputs(image, prompt, parameters, crf, drawn)


def draw_seed() -> int:
    """A fresh random seed (for `--seed random`), reported so the video can be made again."""
    return secrets.randbelow(2**32)


def with_random_seed(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """`parameters` with `seed` "random" replaced by a drawn seed, and that seed (None if none drawn)."""
    if str(parameters.get("seed", "")).strip().lower() != SEED_RANDOM:
        return dict(parameters), None
    seed = draw_seed()
    return {**parameters, "seed": seed}, seed
