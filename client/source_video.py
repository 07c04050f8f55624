"""A clip to extend, read with PyAV: its last frames to send, and all of it for the output.

    clip = read_clip_end("walk.mp4", frames=73)      # the last 73 frames at 30 fps
    clip.frames                                      # uint8 T×H×W×3, within the server's pixel limit
    for frame in source_frames("walk.mp4", 608, 640):  # every frame at 30 fps, as the output's size
        ...

FramePack makes 30 fps video, so the clip is read at 30 fps: ffmpeg's `fps` filter (through
PyAV) drops or repeats frames of another rate, as a player would show them. The server
reads at most a few seconds of a clip's end (its `describe` answer says how many frames its
sampling variant reads), so only those frames are sent, each downscaled (Lanczos) to the
server's per-frame pixel limit when larger. The output shows the source before the new
frames: `source_frames` reads the clip again and scales each frame to cover the output and
cuts its centre, the same cover and crop the server gives the frames it reads
(framepack_backend/buckets.py), so the seam matches.

A file that cannot be read, or has no video frames, raises `VideoLoadError`, a `ValueError`
with one line naming the path.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from PIL import Image

from framepack_wire import MAX_VIDEO_FRAME_PIXELS, MAX_VIDEO_FRAMES

from .images import fit_size

FPS = 30  # the rate FramePack's checkpoints make; the source is read at it


class VideoLoadError(ValueError):
    """A clip that cannot be read; the message is one line naming the path."""


@dataclass(frozen=True, eq=False)
class LoadedClip:
    """The end of a clip, ready to send, and what was done to it."""

    frames: np.ndarray  # uint8 T×H×W×3: the clip's last frames at 30 fps
    source: str  # the label and path, for messages
    frame_count: int  # frames of the whole clip at 30 fps
    rate: float  # the file's own frame rate
    original_size: tuple[int, int]  # (width, height) in the file
    downscaled: bool  # frames were scaled down to the server's pixel limit

    def last(self, frames: int) -> LoadedClip:
        """The same clip with only its last `frames` frames to send."""
        return dataclasses.replace(self, frames=self.frames[len(self.frames) - frames :])

    @property
    def message(self) -> str:
        """One line about what is sent, for the user."""
        notes = [f"{len(self.frames)} of its {self.frame_count} frames sent (its end, at {FPS} fps)"]
        if round(self.rate, 3) != FPS:
            notes.append(f"read at {FPS} fps from {self.rate:g} fps")
        if self.downscaled:
            width, height = self.frames.shape[2], self.frames.shape[1]
            notes.append(f"downscaled from {self.original_size[0]}×{self.original_size[1]} to {width}×{height}")
        return f"{self.source}: " + "; ".join(notes)


def context_frames(description_video: Mapping[str, object], sampling: str | None = None) -> int:
    """How many of a clip's last frames the server reads, from its describe answer's `video`:
    for `sampling` when given (not "auto"), else for the variant it loaded; the most it
    accepts when it does not say (an older server)."""
    reads = description_video.get("context_frames")
    variant = sampling if sampling not in (None, "auto") else description_video.get("sampling")
    if isinstance(reads, dict) and isinstance(reads.get(variant), int):
        return reads[variant]
    most = description_video.get("max_frames")
    return most if isinstance(most, int) else MAX_VIDEO_FRAMES


def read_clip_end(
    path: Path | str, frames: int, max_pixels: int = MAX_VIDEO_FRAME_PIXELS, *, label: str | None = None
) -> LoadedClip:
    """The last `frames` frames of the clip at `path`, at 30 fps, each at most `max_pixels`."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    source = f"{label} {path}" if label else str(path)
    kept: deque[np.ndarray] = deque(maxlen=frames)
    count = 0
    with _opened(path, source) as (container, stream):
        rate = float(stream.average_rate or FPS)
        width, height = stream.codec_context.width, stream.codec_context.height
        for frame in _at_30_fps(container, stream, source):
            kept.append(_within(frame.to_ndarray(format="rgb24"), max_pixels))
            count += 1
    if not kept:
        raise VideoLoadError(f"{source}: has no video frames")
    clip = np.stack(kept)
    return LoadedClip(clip, source, count, rate, (width, height), clip.shape[1] * clip.shape[2] < width * height)


def source_frames(path: Path | str, width: int, height: int, *, label: str | None = None) -> Iterator[np.ndarray]:
    """Every frame of the clip at 30 fps, scaled to cover width×height and centre-cropped."""
    source = f"{label} {path}" if label else str(path)
    with _opened(path, source) as (container, stream):
        for frame in _at_30_fps(container, stream, source):
            yield fit_to_output(frame.to_ndarray(format="rgb24"), width, height)


def fit_to_output(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale uint8 H×W×3 `frame` to cover width×height (Lanczos) and cut the centre: the
    server's cover and crop of the frames it reads (framepack_backend/buckets.py)."""
    source_h, source_w = frame.shape[:2]
    scale = max(width / source_w, height / source_h)
    resized_w, resized_h = max(width, round(source_w * scale)), max(height, round(source_h * scale))
    resized = Image.fromarray(frame).resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    left, top = round((resized_w - width) / 2), round((resized_h - height) / 2)
    return np.array(resized.crop((left, top, left + width, top + height)))


# --- internals -----------------------------------------------------------------------------


class _opened:
    """The file's container and first video stream; VideoLoadError naming the path."""

    def __init__(self, path: Path | str, source: str):
        self._path, self._source = Path(path), source

    def __enter__(self):
        import av  # here: a client that sends images never needs PyAV's decoders

        if self._path.is_dir():
            raise VideoLoadError(f"{self._source}: is a folder, not a video file")
        try:
            self._container = av.open(str(self._path))
        except FileNotFoundError:
            raise VideoLoadError(f"{self._source}: no such file") from None
        except PermissionError:
            raise VideoLoadError(f"{self._source}: permission denied") from None
        except Exception as e:  # noqa: BLE001 - any demuxer failure: unknown format, truncated or corrupt data
            raise VideoLoadError(f"{self._source}: not a readable video ({_reason(e)})") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoLoadError(f"{self._source}: has no video stream")
        return self._container, self._container.streams.video[0]

    def __exit__(self, *exc) -> None:
        self._container.close()


def _at_30_fps(container, stream, source: str) -> Iterator:
    """The stream's frames through ffmpeg's fps filter: 30 per second of the clip."""
    import av

    graph = av.filter.Graph()
    rate = graph.add("fps", f"fps={FPS}")
    buffer = graph.add_buffer(template=stream)
    buffer.link_to(rate)
    rate.link_to(graph.add("buffersink"))
    graph.configure()

    def drained():
        while True:
            try:
                yield graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return

    try:
        for frame in container.decode(stream):
            graph.push(frame)
            yield from drained()
        graph.push(None)
        yield from drained()
    except av.FFmpegError as e:
        raise VideoLoadError(f"{source}: not a readable video ({_reason(e)})") from None


def _within(pixels: np.ndarray, max_pixels: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    if width * height <= max_pixels:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize(fit_size(width, height, max_pixels), Image.Resampling.LANCZOS))


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
