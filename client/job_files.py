"""The files a job is made from: the start image or a clip to extend, the end image, the
keyframes with their times; read into a request, and named in a video's record.

    files = JobFiles(video=Path("walk.mp4"), end_image=Path("end.png"))
    files.conflict(CLI_NAMES)                 # None, or why these do not go together
    inputs = input_record(files, CLI_NAMES)   # each file's path and SHA-256, for the record
    loaded = load_inputs(files, "he turns", {"seconds": 3}, CLI_NAMES, reads=lambda: 19)
    loaded.request                            # the WireRequest to send

`framepack generate` (its options), `framepack queue` (a jobs file's fields) and `--from`
(a record, client/provenance.py) all describe a job's files this way, so the three check
and read them alike; `InputNames` is how each spells them in its messages.

A record names each file by its absolute path and the SHA-256 of its bytes: the content is
what made the video, so a changed file is a different job (the queue redoes it, `--from`
refuses it) and a moved one with the same bytes is not.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from framepack_wire import MAX_VIDEO_FRAMES, WireRequest

from . import stream
from .connection import Endpoint
from .guides import load_keyframes
from .images import load_image
from .source_video import LoadedClip, context_frames, read_clip_end


@dataclass(frozen=True)
class InputNames:
    """How one interface spells each input in its messages."""

    image: str
    video: str
    end_image: str
    keyframes: str
    context_frames: str
    extension_only: str


CLI_NAMES = InputNames("--image", "--video", "--end-image", "--keyframe", "--context-frames", "--extension-only")
FIELD_NAMES = InputNames(*(f"field {name!r}" for name in (
    "image", "video", "end_image", "keyframes", "context_frames", "extension_only")))


@dataclass(frozen=True)
class JobFiles:
    """A job's input files as given; no image and no video is text-to-video."""

    image: Path | None = None
    video: Path | None = None  # a clip to extend, instead of a start image
    end_image: Path | None = None
    keyframes: tuple[tuple[float, Path], ...] = ()  # (seconds, path)
    context_frames: int | None = None  # with `video`: send at most its last K frames (None: all the server reads)
    extension_only: bool = False  # with `video`: the MP4 holds the new frames alone, not the clip before them

    def conflict(self, names: InputNames) -> str | None:
        """Why these inputs do not go together (one line, in `names`), or None."""
        if self.image is not None and self.video is not None:
            return f"{names.video} is not allowed with {names.image}"
        if self.video is None and (self.context_frames is not None or self.extension_only):
            return f"{names.context_frames} and {names.extension_only} go with {names.video}"
        return None

    @property
    def combined(self) -> bool:
        """Whether the MP4 shows the clip before the new frames."""
        return self.video is not None and not self.extension_only


def context_frame_count(text: str) -> int:
    """An argparse type (the queue's too): a number of frames, 1..MAX_VIDEO_FRAMES."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of frames") from None
    if not 1 <= value <= MAX_VIDEO_FRAMES:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: expected frames in [1, {MAX_VIDEO_FRAMES}]")
    return value


@dataclass(frozen=True)
class InputFile:
    """An input's file: where it was and what it held."""

    path: Path
    sha256: str

    @classmethod
    def of(cls, path: Path | str) -> InputFile:
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


def input_record(files: JobFiles, names: InputNames = CLI_NAMES) -> dict[str, Any]:
    """The record's part for the files (client/provenance.py): each one's path and SHA-256, the
    keyframes' times, the clip's options. ValueError (one line, the input by its name) when a
    file cannot be read."""

    def hashed(path: Path, name: str) -> dict[str, str]:
        try:
            return InputFile.of(path).to_json()
        except OSError as e:
            raise ValueError(f"{name} {path}: cannot be read ({e.strerror or e})") from None

    video = None
    if files.video is not None:
        video = {**hashed(files.video, names.video), "context_frames": files.context_frames,
                 "extension_only": files.extension_only}
    return {
        "image": None if files.image is None else hashed(files.image, names.image),
        "video": video,
        "end_image": None if files.end_image is None else hashed(files.end_image, names.end_image),
        "keyframes": [{"time": seconds, **hashed(path, names.keyframes)} for seconds, path in files.keyframes],
    }


def same_files(recorded: Mapping[str, Any], inputs: Mapping[str, Any]) -> bool:
    """Whether a record's files (`recorded`, the whole record) held what `inputs` (input_record)
    hold now, with the same times and clip options; paths do not matter. A record from before
    clips, end images and keyframes were kept names the start image alone."""
    return _content(recorded) == _content(inputs)


def _content(part: Mapping[str, Any]) -> tuple:
    def sha(entry: object) -> str | None:
        return entry.get("sha256") if isinstance(entry, Mapping) else None

    video = part.get("video")
    video = video if isinstance(video, Mapping) else {}
    keyframes = part.get("keyframes")
    keyframes = keyframes if isinstance(keyframes, list) else []
    return (sha(part.get("image")), sha(video), video.get("context_frames"), bool(video.get("extension_only")),
            sha(part.get("end_image")), [(k.get("time"), sha(k)) for k in keyframes if isinstance(k, Mapping)])


def clip_frames_read(endpoint: Endpoint, parameters: Mapping[str, Any]) -> int:
    """How many of a clip's last frames the server reads with these settings (its describe
    answer); the client's ServerError when it cannot say."""
    sampling = parameters.get("sampling")
    return context_frames(stream.describe(endpoint).video, None if sampling is None else str(sampling))


@dataclass(frozen=True, eq=False)
class LoadedInputs:
    request: WireRequest
    clip: LoadedClip | None  # the clip's end as sent, when the job extends one
    messages: tuple[str, ...]  # what was done to the files (turned upright, downscaled, frames sent), for the user


def load_inputs(
    files: JobFiles, prompt: str, parameters: Mapping[str, Any], names: InputNames, reads: Callable[[], int]
) -> LoadedInputs:
    """The request for `files`, read as the server wants them (client/images.py,
    client/source_video.py, client/guides.py). `reads()`: how many of a clip's last frames
    the server reads (asked only for a clip; it may raise the client's ServerError).
    ValueError (one line naming the input) for a file that cannot be used."""
    start = load_image(files.image, label=names.image) if files.image is not None else None
    end = load_image(files.end_image, label=names.end_image) if files.end_image is not None else None
    keyframes = load_keyframes(list(files.keyframes), start.pixels if start is not None else None,
                               label=names.keyframes)
    clip = None
    if files.video is not None:
        clip = read_clip_end(files.video, files.context_frames or MAX_VIDEO_FRAMES, label=names.video)
        clip = clip.last(min(reads(), len(clip.frames)))  # only the frames this server's sampling variant reads
    messages = [image.message for image in (start, end) if image is not None and image.message]
    request = WireRequest(
        start.pixels if start is not None else None, prompt, dict(parameters),
        video=clip.frames if clip is not None else None,
        end_image=end.pixels if end is not None else None, keyframes=keyframes,
    )
    return LoadedInputs(request, clip, tuple(messages) + ((clip.message,) if clip is not None else ()))
