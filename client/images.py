"""Start images as the server wants them: upright, 8-bit RGB, opaque, within its pixel limit.

    loaded = load_image("IMG_2041.jpg", max_pixels=MAX_IMAGE_PIXELS)
    loaded.pixels        # uint8 H×W×3 RGB
    loaded.message       # one line saying what was done to the photo, or "" when nothing was

What happens to a file, in this order:

1. EXIF (or XMP) orientation is applied (`ImageOps.exif_transpose`): a phone photo taken
   in portrait with orientation 6 comes out upright, not sideways.
2. Colour depth: 16-bit greyscale (Pillow's modes I;16, I;16L, I;16B, I;16N, and I, the
   mode older Pillows give 16-bit PNGs) is scaled to 8 bits by value (v >> 8), not clipped
   at 255. 16-bit RGB(A) PNGs are already reduced to 8 bits by Pillow's decoder (high
   byte). Mode I (32-bit integers) is taken as 16-bit data and clipped to 0..65535.
   Floating-point images (mode F) are taken as 0..1 when their largest value is at
   most 1, else as 0..255 when it is at most 255, else as 16-bit.
3. Transparency (an alpha channel, a palette or greyscale/RGB transparency key) is
   composited onto `background`, white unless given, instead of being dropped (which shows
   whatever colour the transparent pixels happen to hold, often black).
4. Colour model: CMYK is converted through its embedded ICC profile when it has one (else
   by Pillow's formula); palette, 1-bit, greyscale, YCbCr and the other modes Pillow can
   convert become RGB.
5. An image over `max_pixels` is downscaled (Lanczos, aspect ratio kept as closely as
   whole pixels allow) so that width × height ≤ max_pixels.

An image the client cannot fix (a side under the server's minimum, or an aspect ratio over
its maximum) is passed on as it is: the server refuses it with a message naming its limits.
A file that cannot be read raises `ImageLoadError`, a `ValueError` with one line naming
the path.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from framepack_wire import MAX_IMAGE_PIXELS

WHITE = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_EXIF_ORIENTATION = 0x0112
# Orientation values and what exif_transpose does for them, for the message.
_ORIENTATIONS = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped",
    5: "mirrored and rotated",
    6: "rotated 90° clockwise",
    7: "mirrored and rotated",
    8: "rotated 90° counter-clockwise",
}


class ImageLoadError(ValueError):
    """A start image that cannot be read; the message is one line naming the path."""


@dataclass(frozen=True)
class LoadedImage:
    """A start image ready to send, and what was done to the file to get it."""

    pixels: np.ndarray  # uint8 H×W×3 RGB
    source: str  # the path, or "image" for an array
    original_size: tuple[int, int]  # (width, height) as stored in the file, before any change
    original_mode: str  # Pillow's mode of the file ("RGB", "I;16", "RGBA", "CMYK", ...)
    exif_orientation: int = 1  # the file's EXIF orientation (1: stored upright)
    exif_transposed: bool = False  # turned/mirrored upright per exif_orientation
    alpha_composited: bool = False  # transparency composited onto `background`
    background: tuple[int, int, int] = WHITE
    bit_depth_reduced: int | None = None  # the source's bits per channel when scaled down to 8 (16, 32 for F)
    downscaled_from: tuple[int, int] | None = None  # (width, height) before downscaling
    downscaled_to: tuple[int, int] | None = None  # (width, height) after downscaling
    max_pixels: int | None = None
    notes: tuple[str, ...] = field(default=())  # one phrase per change, in the order they were made

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of `pixels`."""
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def changed(self) -> bool:
        return bool(self.notes)

    @property
    def message(self) -> str:
        """One line for the user about what was done, or "" when the image was sent as it was."""
        if not self.notes:
            return ""
        return f"{self.source}: " + "; ".join(self.notes)


def load_image(
    path: Path | str,
    max_pixels: int = MAX_IMAGE_PIXELS,
    *,
    background: tuple[int, int, int] = WHITE,
    label: str | None = None,
) -> LoadedImage:
    """Read `path` as upright 8-bit RGB of at most `max_pixels` pixels (see the module doc).

    `background` is the colour transparent areas are composited onto (white by default).
    `label` prefixes error messages and the message (e.g. "--image"); by default the path.
    Raises ImageLoadError (a ValueError) with one line when the file cannot be read.
    """
    path = Path(path)
    source = f"{label} {path}" if label else str(path)
    _check_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # Over Pillow's decompression-bomb warning size (~89 MP) but under its error
            # size: the image is downscaled below anyway, and the message says so.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                original_size = image.size
                original_mode = image.mode
                orientation = _orientation(image)
                frames = getattr(image, "n_frames", 1)
                _draft(image, max_pixels)
                image.load()
                image = _upright(image, orientation)
    except FileNotFoundError:
        raise ImageLoadError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{source}: is a folder, not an image file") from None
    except PermissionError:
        raise ImageLoadError(f"{source}: permission denied") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{source}: too large to decode safely ({e})") from None
    except MemoryError:
        raise ImageLoadError(f"{source}: not enough memory to decode the image") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure: unknown format, truncated or corrupt data
        raise ImageLoadError(f"{source}: not a readable image ({_reason(e)})") from None

    notes: list[str] = []
    transposed = orientation in _ORIENTATIONS
    if transposed:
        notes.append(f"turned upright ({_ORIENTATIONS[orientation]}) per its EXIF orientation {orientation}")
    if frames > 1:
        notes.append(f"first of its {frames} frames used")
    try:
        pixels, bits, composited = _to_rgb8(image, background)
    except ValueError as e:  # a mode Pillow cannot convert to RGB
        raise ImageLoadError(f"{source}: unsupported image mode {image.mode} ({_reason(e)})") from None
    return _finish(
        pixels, source, original_size, original_mode, max_pixels, background, notes,
        orientation=orientation, transposed=transposed, bits=bits, composited=composited,
    )


def prepare_array(
    array: np.ndarray,
    max_pixels: int = MAX_IMAGE_PIXELS,
    *,
    background: tuple[int, int, int] = WHITE,
    source: str = "image",
) -> LoadedImage:
    """The same treatment for an image already decoded to an array (no EXIF to apply).

    Accepts H×W (grey), H×W×1, H×W×3 (RGB) or H×W×4 (RGBA) arrays of uint8, uint16
    (scaled by value to 8 bits), bool, or floats (0..1). Raises ValueError for other shapes.
    """
    _check_limit(max_pixels)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"{source}: expected an H×W, H×W×3 or H×W×4 array, got shape {array.shape}")
    notes: list[str] = []
    bits = None
    if array.dtype == np.uint16:
        array, bits = (array >> 8).astype(np.uint8), 16
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array, bits = _float_to_uint8(array), 32
    elif array.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8, uint16, bool or float pixels, got {array.dtype}")
    original_size = (array.shape[1], array.shape[0])
    mode = "L" if array.ndim == 2 else ("RGB" if array.shape[-1] == 3 else "RGBA")
    pixels, _, composited = _to_rgb8(Image.fromarray(np.ascontiguousarray(array), mode), background)
    return _finish(
        pixels, source, original_size, mode, max_pixels, background, notes,
        orientation=1, transposed=False, bits=bits, composited=composited,
    )


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest (width, height) with the same aspect ratio, to whole pixels, of at most
    `max_pixels` pixels; the size itself when it already fits. Never a side under 1."""
    _check_limit(max_pixels)
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    # Rounding may overshoot by a row or column: shrink the side whose loss keeps the
    # aspect ratio closest, until it fits.
    while new_w * new_h > max_pixels:
        if new_w > 1 and (new_h == 1 or abs((new_w - 1) / new_h - width / height)
                          <= abs(new_w / (new_h - 1) - width / height)):
            new_w -= 1
        else:
            new_h -= 1
    return new_w, new_h


# --- internals -----------------------------------------------------------------------------


def _check_limit(max_pixels: int) -> None:
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive whole number, got {max_pixels!r}")


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - unreadable EXIF is no reason to refuse the pixels
        return 1


def _draft(image: Image.Image, max_pixels: int) -> None:
    """Let a JPEG decoder shrink a very large photo by 1/2, 1/4 or 1/8 while decoding, as
    Pillow's thumbnail() does, keeping at least twice the final size for the Lanczos pass."""
    if image.format != "JPEG" or image.width * image.height <= max_pixels:
        return
    width, height = fit_size(image.width, image.height, max_pixels)
    try:
        image.draft(image.mode, (width * 2, height * 2))
    except Exception:  # noqa: BLE001, S110 - an optimisation only: decode at full size
        pass


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    if orientation not in _ORIENTATIONS:
        return image
    upright = ImageOps.exif_transpose(image)
    return image if upright is None else upright


def _to_rgb8(image: Image.Image, background: tuple[int, int, int]) -> tuple[np.ndarray, int | None, bool]:
    """uint8 H×W×3 pixels, the bits per channel reduced from (or None), whether alpha was composited."""
    bits = None
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # Mode I (32-bit integers) is taken as 16-bit data, as Pillow gives 16-bit PNGs
        # and PGMs; values outside 0..65535 are clipped.
        values = np.asarray(image).astype(np.int64)
        grey, bits = (np.clip(values, 0, 65535) >> 8).astype(np.uint8), 16
        image = _with_transparency(Image.fromarray(grey, "L"), image, bits)
    elif mode == "F":
        image, bits = Image.fromarray(_float_to_uint8(np.asarray(image)), "L"), 32
    if mode == "CMYK" and image.info.get("icc_profile"):
        converted = _cmyk_with_profile(image)
        if converted is not None:
            image = converted
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        opaque = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        composited = Image.alpha_composite(opaque, rgba)
        uses_alpha = rgba.getextrema()[3][0] < 255
        return np.asarray(composited.convert("RGB"), dtype=np.uint8), bits, uses_alpha
    return np.asarray(image.convert("RGB"), dtype=np.uint8), bits, False


def _with_transparency(grey: Image.Image, source: Image.Image, bits: int | None) -> Image.Image:
    """Carry a 16-bit image's transparency key over to its 8-bit copy."""
    key = source.info.get("transparency")
    if isinstance(key, int):
        grey.info["transparency"] = key >> 8 if bits == 16 else key
    return grey


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = values.max() if values.size else 0.0
    scale = 255.0 if top <= 1.0 else (1.0 if top <= 255.0 else 255.0 / 65535.0)
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _cmyk_with_profile(image: Image.Image) -> Image.Image | None:
    try:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # noqa: BLE001 - no littlecms, or a profile it cannot use: Pillow's formula instead
        return None


def _finish(
    pixels: np.ndarray, source: str, original_size: tuple[int, int], original_mode: str, max_pixels: int,
    background: tuple[int, int, int], notes: list[str], *, orientation: int, transposed: bool,
    bits: int | None, composited: bool,
) -> LoadedImage:
    if bits is not None:
        notes.append(f"{bits}-bit {original_mode} scaled to 8 bits")
    if composited:
        notes.append(f"transparency composited onto {_colour(background)}")
    height, width = pixels.shape[:2]
    downscaled_from = downscaled_to = None
    if width * height > max_pixels:
        new_size = fit_size(width, height, max_pixels)
        resized = Image.fromarray(pixels, "RGB").resize(new_size, Image.Resampling.LANCZOS)
        pixels = np.asarray(resized, dtype=np.uint8)
        # The size in the file, upright, when a JPEG draft already shrank the decode.
        stored = original_size[::-1] if orientation in (5, 6, 7, 8) else original_size
        downscaled_from, downscaled_to = stored, new_size
        notes.append(
            f"downscaled from {stored[0]}×{stored[1]} ({stored[0] * stored[1]:,} pixels) to "
            f"{new_size[0]}×{new_size[1]} to fit the limit of {max_pixels:,} pixels"
        )
    return LoadedImage(
        pixels=np.ascontiguousarray(pixels), source=source, original_size=original_size,
        original_mode=original_mode, exif_orientation=orientation, exif_transposed=transposed,
        alpha_composited=composited, background=tuple(background), bit_depth_reduced=bits,
        downscaled_from=downscaled_from, downscaled_to=downscaled_to, max_pixels=max_pixels, notes=tuple(notes),
    )


def _colour(rgb: tuple[int, int, int]) -> str:
    names = {(255, 255, 255): "white", (0, 0, 0): "black"}
    return names.get(tuple(rgb), "RGB({}, {}, {})".format(*rgb))
