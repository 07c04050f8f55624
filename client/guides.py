"""The creative controls' images on the client: the end image and the keyframes.

`--keyframe SECONDS:PATH` is parsed here; keyframe images travel as one K×H×W×3 tensor, so
each is scaled to cover one common size (the start image's, or the first keyframe's for
text-to-video) and centre-cropped, as the server does to fit the video's bucket anyway.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .images import load_image


def keyframe_argument(text: str) -> tuple[float, Path]:
    """An argparse type: SECONDS:PATH, e.g. 2.5:middle.png (argparse names the option)."""
    seconds, separator, path = text.partition(":")
    try:
        value = float(seconds.strip().removesuffix("s"))
    except ValueError:
        value = math.nan
    if not separator or not path or not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected SECONDS:PATH, e.g. 2.5:middle.png")
    return value, Path(path)


def cover(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale `pixels` (uint8 H×W×3) to cover height×width (Lanczos) and centre-crop to it."""
    h, w = pixels.shape[:2]
    if (h, w) == (height, width):
        return pixels
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    resized = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def load_keyframes(
    keyframes: list[tuple[float, Path]], start: np.ndarray | None, *, label: str = "--keyframe"
) -> tuple[tuple[float, np.ndarray], ...]:
    """(seconds, pixels) of each --keyframe, all at the start image's size (ImageLoadError names a bad file)."""
    loaded = [(seconds, load_image(path, label=label).pixels) for seconds, path in keyframes]
    if not loaded:
        return ()
    height, width = (start if start is not None else loaded[0][1]).shape[:2]
    return tuple((seconds, cover(pixels, height, width)) for seconds, pixels in loaded)


def load_guides(
    end_path: str | Path | None, keyframe_paths: list | None, times: str, start: np.ndarray | None
) -> dict[str, object]:
    """The web UI's end image and keyframes (files, with their times as typed) as WireRequest
    arguments; ValueError (ImageLoadError for a file) with one line when they do not fit."""
    keyframes = timed_keyframes(keyframe_paths, times)
    end = load_image(end_path, label="end image").pixels if end_path else None
    return {"end_image": end, "keyframes": load_keyframes(keyframes, start)}


def timed_keyframes(keyframe_paths: list | None, times: str) -> list[tuple[float, Path]]:
    """(seconds, path) of the web UI's keyframe files with their times as typed, paired in
    order; ValueError (one line) when they do not pair up."""
    paths = [Path(getattr(path, "name", path)) for path in keyframe_paths or []]
    texts = [text for text in (times or "").split(",") if text.strip()]
    if len(texts) != len(paths):
        raise ValueError(f"keyframe times {times!r}: give one time in seconds per keyframe image ({len(paths)})")
    try:
        return [keyframe_argument(f"{text.strip()}:{path}") for text, path in zip(texts, paths)]
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"keyframe times {times!r}: {e}") from None
