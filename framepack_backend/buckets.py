"""Resolution buckets: which output size an input image gets, and the resize + centre crop.

FramePack was trained on a fixed set of sizes of about 640×640 pixels; the input image is
mapped to the bucket whose aspect ratio is nearest, then resized to cover it and
centre-cropped, so the first frame of the video is the input image itself.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .settings import SettingsError

BASE_RESOLUTION = 640

# (height, width), ordered from widest to tallest; every side is a multiple of 16.
BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960),
    (448, 864),
    (480, 832),
    (512, 768),
    (544, 704),
    (576, 672),
    (608, 640),
    (640, 608),
    (672, 576),
    (704, 544),
    (768, 512),
    (832, 480),
    (864, 448),
    (960, 416),
)


def buckets(resolution: int = BASE_RESOLUTION) -> tuple[tuple[int, int], ...]:
    """The bucket table (h, w) for a base resolution.

    Other base resolutions scale the 640 table: each side becomes
    round(side · resolution / 640 / 16) · 16, so sides stay multiples of 16 (the VAE
    downsamples by 8 and the transformer patchifies by 2) and the order is kept.
    """
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 16 or resolution % 16:
        raise SettingsError("resolution", resolution, "a positive multiple of 16")
    if resolution == BASE_RESOLUTION:
        return BUCKETS_640
    scale = resolution / BASE_RESOLUTION
    return tuple((_scaled_side(h, scale), _scaled_side(w, scale)) for h, w in BUCKETS_640)


def _scaled_side(side: int, scale: float) -> int:
    return max(16, round(side * scale / 16) * 16)


def bucket_for(height: int, width: int, resolution: int = BASE_RESOLUTION) -> tuple[int, int]:
    """The (h, w) bucket nearest the aspect ratio of a height×width image.

    The distance |h·bw − w·bh| compares aspect ratios without division; on a tie the
    later bucket of the table wins (the reference scans with `<=`).
    """
    _check_side("height", height)
    _check_side("width", width)
    best = None
    best_distance = None
    for bucket_h, bucket_w in buckets(resolution):
        distance = abs(height * bucket_w - width * bucket_h)
        if best_distance is None or distance <= best_distance:
            best, best_distance = (bucket_h, bucket_w), distance
    return best


def resize_and_center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale `image` (uint8 H×W×3) so it covers width×height (Lanczos), then cut the centre."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shown = f"array {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise SettingsError("image", shown, "a uint8 numpy array of shape H×W×3 (RGB)")
    _check_side("width", width)
    _check_side("height", height)
    source_h, source_w = image.shape[:2]
    scale = max(width / source_w, height / source_h)
    resized_w = max(width, round(source_w * scale))
    resized_h = max(height, round(source_h * scale))
    resized = Image.fromarray(image).resize((resized_w, resized_h), Image.LANCZOS)
    # Same offsets as the reference crop box ((resized - target) / 2, rounded half to even).
    left = round((resized_w - width) / 2)
    top = round((resized_h - height) / 2)
    # np.array copies, so the caller gets a writable array (np.asarray of a PIL image is read-only).
    return np.array(resized.crop((left, top, left + width, top + height)))


def _check_side(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise SettingsError(name, value, "a positive integer number of pixels")
