"""Frames to an H.264 MP4, written atomically, and the assembly of streamed sections.

The MP4's quality (`crf`) is the client's option: the client encodes the video, so the
CLI and the web UI read it here, not from the server. (The server still range-checks a
`crf` request parameter from older clients, then ignores it.)

An MP4 either appears complete at its path or not at all: it is written to a hidden
temporary file in the same folder and renamed over the target (`os.replace` is atomic
within a file system), and the temporary file is removed on any failure.
"""

from __future__ import annotations

import itertools
import os
import secrets
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

CRF_DEFAULT = 16
CRF_LOW, CRF_HIGH = 0, 51  # libx264's range: 0 lossless, 51 worst
# The option in the shape of the server's describe answer, so the web UI builds its field the same way.
CRF_SPEC = {
    "type": "int", "default": CRF_DEFAULT, "low": CRF_LOW, "high": CRF_HIGH, "choices": None,
    "doc": "H.264 constant rate factor of the MP4 (lower is better quality)",
}


def parse_crf(value: object) -> int:
    """A crf from the command line or the page (a string or a number); ValueError naming it."""
    try:
        crf = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        crf = value
    if isinstance(crf, float) and crf.is_integer():
        crf = int(crf)
    if not isinstance(crf, int) or isinstance(crf, bool) or not CRF_LOW <= crf <= CRF_HIGH:
        raise ValueError(f"crf={value!r} is not allowed: expected int in [{CRF_LOW}, {CRF_HIGH}]")
    return crf


class FrameAssembler:
    """The video being received: sections land at their start frame; later ones win."""

    def __init__(self) -> None:
        self._video: np.ndarray | None = None
        self._received: np.ndarray | None = None

    def add(self, start_frame: int, frames: np.ndarray, total_frames: int) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"section frames must be uint8 T×H×W×3, got {frames.dtype} {frames.shape}")
        if self._video is None:
            self._video = np.zeros((total_frames, *frames.shape[1:]), dtype=np.uint8)
            self._received = np.zeros(total_frames, dtype=bool)
        if total_frames != len(self._video) or frames.shape[1:] != self._video.shape[1:]:
            raise ValueError(
                f"section of {frames.shape[1:]} for a {total_frames}-frame video does not match "
                f"the {len(self._video)}-frame video of {self._video.shape[1:]} received so far"
            )
        end = start_frame + len(frames)
        if start_frame < 0 or end > total_frames:
            raise ValueError(f"section frames [{start_frame}, {end}) fall outside the video [0, {total_frames})")
        self._video[start_frame:end] = frames
        self._received[start_frame:end] = True

    def received(self) -> np.ndarray:
        """The frames received so far, first to last (a view; sections arrive contiguous)."""
        if self._video is None:
            raise ValueError("no frames were received")
        arrived = np.flatnonzero(self._received)
        return self._video[arrived[0] : arrived[-1] + 1]

    def video(self) -> np.ndarray:
        """All frames; raises if any frame never arrived."""
        if self._video is None:
            raise ValueError("no frames were received")
        missing = np.flatnonzero(~self._received)
        if len(missing):
            raise ValueError(f"{len(missing)} frames never arrived (first missing: {missing[0]})")
        return self._video


# x264's macroblock-tree rate control makes the bytes (and decoded pixels) differ from one
# encode of the same frames to the next with PyAV's bundled libx264, even single-threaded;
# without it five of five encodes are identical. At the same crf the file is larger and
# slightly better (benchmarks/mp4_determinism.py; results in benchmarks/results/).
DETERMINISTIC_X264_PARAMS = "mbtree=0"


def write_mp4(
    path: Path | str, frames: np.ndarray, fps: int, crf: int | None = None, *, deterministic: bool = True,
    metadata: Mapping[str, str] | None = None,
    before: Iterable[np.ndarray] = (),
) -> Path:
    """Encode uint8 T×H×W×3 RGB frames as H.264 (yuv420p) at `fps`; atomic.

    `before`: frames of the same size written first (the source clip of an extension),
    taken one at a time, so a long clip need not fit in memory.

    yuv420p needs even sides: an odd last row or column is cropped. `crf` None keeps the
    encoder's default quality. `deterministic` (default): the same frames give the same
    bytes (DETERMINISTIC_X264_PARAMS). `metadata`: container tags (e.g. `comment`, which
    ffprobe shows and client/provenance.py fills with the job's record).
    """
    path = Path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty uint8 T×H×W×3 array, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    if height == 0 or width == 0:
        raise ValueError(f"frames of {frames.shape[2]}×{frames.shape[1]} pixels are too small for H.264")
    import av  # here, not at the top: receiving and assembling frames works without PyAV

    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh hidden name beside the target; "x" mode creates it with the usual
    # permissions (umask), unlike mkstemp's owner-only ones.
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
    open(temporary, "xb").close()
    try:
        with av.open(temporary, mode="w", format="mp4") as container:
            container.metadata.update(metadata or {})
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            options = {"x264-params": DETERMINISTIC_X264_PARAMS} if deterministic else {}
            if crf is not None:
                options["crf"] = str(crf)
            stream.options = options
            for frame in itertools.chain(before, frames):
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24")
                container.mux(stream.encode(picture))
            container.mux(stream.encode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
