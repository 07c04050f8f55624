"""Start images from files: EXIF orientation, 16-bit, transparency, colour modes, size limit, errors.

Every case is built with Pillow in a temporary folder; the assertions are on pixel values.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.images import (
    ImageLoadError,
    LoadedImage,
    fit_size,
    load_image,
    prepare_array,
)
from framepack_wire import MAX_IMAGE_PIXELS

RED = (255, 0, 0)


def exif_jpeg(path, orientation: int) -> None:
    """A 64×32 (W×H) grey JPEG as stored, with a 16×16 red marker in its stored top-left corner."""
    stored = np.full((32, 64, 3), 128, np.uint8)
    stored[:16, :16] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, quality=98, exif=exif.tobytes())


def corner_means(pixels: np.ndarray, size: int = 8) -> dict[str, np.ndarray]:
    return {
        "top-left": pixels[:size, :size].reshape(-1, 3).mean(0),
        "top-right": pixels[:size, -size:].reshape(-1, 3).mean(0),
        "bottom-left": pixels[-size:, :size].reshape(-1, 3).mean(0),
        "bottom-right": pixels[-size:, -size:].reshape(-1, 3).mean(0),
    }


def is_red(colour: np.ndarray) -> bool:
    return colour[0] > 220 and colour[1] < 40 and colour[2] < 40


def test_exif_orientation_6_is_turned_upright(tmp_path):
    path = tmp_path / "portrait.jpg"
    exif_jpeg(path, 6)
    loaded = load_image(path)
    # Orientation 6: the stored image is shown turned 90° clockwise, so its top-left
    # corner is shown top-right, and width and height swap.
    assert loaded.pixels.shape == (64, 32, 3) and loaded.pixels.dtype == np.uint8
    corners = corner_means(loaded.pixels)
    assert is_red(corners["top-right"])
    assert not any(is_red(corners[name]) for name in ("top-left", "bottom-left", "bottom-right"))
    assert loaded.exif_transposed and loaded.exif_orientation == 6
    assert loaded.original_size == (64, 32) and loaded.size == (32, 64)
    assert "turned upright (rotated 90° clockwise) per its EXIF orientation 6" in loaded.message


@pytest.mark.parametrize("orientation, corner, shape", [
    (1, "top-left", (32, 64, 3)),
    (3, "bottom-right", (32, 64, 3)),
    (8, "bottom-left", (64, 32, 3)),
])
def test_other_orientations(tmp_path, orientation, corner, shape):
    path = tmp_path / f"o{orientation}.jpg"
    exif_jpeg(path, orientation)
    loaded = load_image(path)
    assert loaded.pixels.shape == shape
    assert is_red(corner_means(loaded.pixels)[corner])
    assert loaded.exif_transposed == (orientation != 1)


def test_16_bit_grey_png_is_scaled_by_value_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((24, 40), 32768, np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # how Pillow opens it; convert("RGB") would give 255
    loaded = load_image(path)
    assert loaded.pixels.shape == (24, 40, 3)
    assert np.all(np.abs(loaded.pixels.astype(int) - 128) <= 1)
    assert loaded.bit_depth_reduced == 16
    assert "16-bit I;16 scaled to 8 bits" in loaded.message


def test_16_bit_grey_gradient_keeps_its_range(tmp_path):
    path = tmp_path / "ramp16.png"
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(path)
    pixels = load_image(path).pixels
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_16_bit_modes_I_and_big_endian(tmp_path):
    # Mode I is how older Pillows open 16-bit PNGs; I;16B is big-endian 16-bit (TIFF, PGM).
    values = np.full((20, 20), 0x4000, np.int32)
    path = tmp_path / "i32.tif"
    Image.fromarray(values, "I").save(path)
    loaded = load_image(path)
    assert loaded.original_mode == "I" and np.all(loaded.pixels == 0x40)
    path = tmp_path / "be.tif"
    Image.frombytes("I;16B", (20, 20), np.full((20, 20), 0xC000, ">u2").tobytes()).save(path)
    loaded = load_image(path)
    assert loaded.original_mode == "I;16B" and np.all(loaded.pixels == 0xC0)
    path = tmp_path / "grey16.pgm"  # maxval 65535: Pillow opens it as mode I
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(path)
    assert np.all(load_image(path).pixels == 40000 >> 8)


def test_16_bit_rgb_png(tmp_path):
    # Pillow decodes 16-bit RGB PNGs to 8-bit RGB by their high byte: values survive.
    import struct
    import zlib

    height, width = 16, 16
    raw = b"".join(b"\0" + struct.pack(">HHH", 0x8000, 0x4000, 0xFFFF) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path = tmp_path / "rgb16.png"
    path.write_bytes(png)
    pixels = load_image(path).pixels
    assert np.all(np.abs(pixels.astype(int) - (128, 64, 255)) <= 1)


def test_half_transparent_red_is_composited_over_white(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (32, 16), (255, 0, 0, 128)).save(path)
    loaded = load_image(path)
    assert loaded.pixels.shape == (16, 32, 3)
    assert np.all(np.abs(loaded.pixels.astype(int) - (255, 128, 128)) <= 1)
    assert loaded.alpha_composited and loaded.background == (255, 255, 255)
    assert "transparency composited onto white" in loaded.message


def test_transparent_pixels_do_not_show_their_hidden_colour(tmp_path):
    # Fully transparent black (0, 0, 0, 0): convert("RGB") shows black, compositing white.
    path = tmp_path / "cutout.png"
    image = np.zeros((16, 16, 4), np.uint8)
    image[4:12, 4:12] = (0, 0, 255, 255)
    Image.fromarray(image, "RGBA").save(path)
    pixels = load_image(path).pixels
    assert np.all(pixels[0, 0] == 255) and np.all(pixels[8, 8] == (0, 0, 255))


def test_background_is_a_parameter(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(path)
    loaded = load_image(path, background=(0, 0, 0))
    assert np.all(np.abs(loaded.pixels.astype(int) - (128, 0, 0)) <= 1)
    assert "composited onto black" in loaded.message


def test_grey_with_alpha_and_palette_with_transparency(tmp_path):
    path = tmp_path / "la.png"
    Image.new("LA", (16, 16), (0, 0)).save(path)  # black, fully transparent
    assert np.all(load_image(path).pixels == 255)

    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    path = tmp_path / "p.png"
    palette.save(path, transparency=0)
    loaded = load_image(path)
    assert np.all(loaded.pixels[:, :8] == 255) and np.all(loaded.pixels[:, 8:] == (0, 255, 0))
    assert loaded.alpha_composited


def test_an_opaque_rgba_image_is_not_reported_as_composited(tmp_path):
    path = tmp_path / "opaque.png"
    Image.new("RGBA", (16, 16), (10, 20, 30, 255)).save(path)
    loaded = load_image(path)
    assert np.all(loaded.pixels == (10, 20, 30)) and not loaded.alpha_composited and loaded.message == ""


def test_cmyk_and_other_modes(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, quality=98)  # pure cyan
    assert np.all(np.abs(load_image(path).pixels.astype(int) - (0, 255, 255)) <= 3)
    path = tmp_path / "bits.png"
    Image.new("1", (16, 16), 1).save(path)
    assert np.all(load_image(path).pixels == 255)
    path = tmp_path / "grey.png"
    Image.new("L", (16, 16), 77).save(path)
    loaded = load_image(path)
    assert np.all(loaded.pixels == 77) and loaded.message == ""


def test_a_5000_square_photo_is_downscaled_to_the_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (5000, 5000), (200, 100, 50)).save(path, compress_level=1)
    loaded = load_image(path, max_pixels=MAX_IMAGE_PIXELS)
    height, width = loaded.pixels.shape[:2]
    assert width * height <= MAX_IMAGE_PIXELS and (width, height) == (4096, 4096)
    assert loaded.downscaled_from == (5000, 5000) and loaded.downscaled_to == (4096, 4096)
    assert np.all(np.abs(loaded.pixels[::512, ::512].astype(int) - (200, 100, 50)) <= 1)
    assert "downscaled from 5000×5000 (25,000,000 pixels) to 4096×4096" in loaded.message
    assert "limit of 16,777,216 pixels" in loaded.message


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_downscale_keeps_the_aspect_ratio(tmp_path, suffix):
    path = tmp_path / f"wide{suffix}"
    Image.new("RGB", (3000, 2000), (0, 128, 0)).save(path)
    loaded = load_image(path, max_pixels=600_000)
    width, height = loaded.size
    assert width * height <= 600_000 and width * height > 590_000
    assert abs(width / height - 1.5) < 0.005
    assert loaded.downscaled_from == (3000, 2000)
    assert "downscaled from 3000×2000" in loaded.message


def test_downscaling_an_exif_rotated_photo_reports_the_upright_size(tmp_path):
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (3000, 2000), (0, 0, 200)).save(path, exif=exif.tobytes())
    loaded = load_image(path, max_pixels=600_000)
    width, height = loaded.size
    assert height > width and width * height <= 600_000
    assert loaded.downscaled_from == (2000, 3000)


def test_images_the_server_must_refuse_are_passed_on_unchanged(tmp_path):
    for name, size in (("tiny.png", (10, 10)), ("strip.png", (400, 20))):
        path = tmp_path / name
        Image.new("RGB", size, (1, 2, 3)).save(path)
        loaded = load_image(path)
        assert loaded.size == size and loaded.message == ""


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"this is not an image at all"), "not a readable image"),
    (lambda p: p.write_bytes(b""), "not a readable image"),
    (None, "no such file"),
])
def test_unreadable_files_raise_one_clear_line(tmp_path, make, reason):
    path = tmp_path / "photo.png"
    if make is not None:
        make(path)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, label="--image")
    message = str(caught.value)
    assert message.startswith(f"--image {path}: {reason}") and "\n" not in message
    assert isinstance(caught.value, ValueError)  # the CLI prints ValueErrors as one line
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_raise_one_clear_line(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(whole)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a readable image (") and "\n" not in message


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path)


def test_fit_size():
    assert fit_size(5000, 5000, 4096 * 4096) == (4096, 4096)
    assert fit_size(100, 50, 10_000) == (100, 50)
    for width, height, limit in ((6000, 8000, 4096 * 4096), (12000, 9000, 1_000_000), (7, 3000, 1000)):
        w, h = fit_size(width, height, limit)
        assert w * h <= limit and w >= 1 and h >= 1
        assert (w + 1) * (h + 1) > limit  # as large as fits
    with pytest.raises(ValueError):
        fit_size(10, 10, 0)


def test_prepare_array_for_already_decoded_images():
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    loaded = prepare_array(rgba)
    assert isinstance(loaded, LoadedImage) and loaded.alpha_composited
    assert np.all(np.abs(loaded.pixels.astype(int) - (255, 128, 128)) <= 1)
    grey16 = np.full((20, 30), 32768, np.uint16)
    assert np.all(np.abs(prepare_array(grey16).pixels.astype(int) - 128) <= 1)
    big = np.zeros((300, 200, 3), np.uint8)
    loaded = prepare_array(big, max_pixels=15_000, source="upload")
    assert loaded.size[0] * loaded.size[1] <= 15_000 and loaded.message.startswith("upload: downscaled from 200×300")
    plain = np.full((20, 30, 3), 9, np.uint8)
    loaded = prepare_array(plain)
    assert np.array_equal(loaded.pixels, plain) and loaded.message == ""
    with pytest.raises(ValueError):
        prepare_array(np.zeros((4, 4, 2), np.uint8))
