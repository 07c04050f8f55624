import numpy as np
import pytest

from framepack_backend.buckets import BUCKETS_640, bucket_for, buckets, resize_and_center_crop
from framepack_backend.settings import SettingsError


def test_table_is_the_640_table():
    assert len(BUCKETS_640) == 14
    assert BUCKETS_640[0] == (416, 960) and BUCKETS_640[-1] == (960, 416)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in BUCKETS_640)


def test_landscape_4_3_goes_to_704x544():
    # 640 wide × 480 high → 704 wide × 544 high
    assert bucket_for(480, 640) == (544, 704)


def test_portrait_3_4_goes_to_544x704():
    assert bucket_for(640, 480) == (704, 544)


def test_square_tie_goes_to_later_bucket():
    # 608×640 and 640×608 are equally far from 1:1 (distance 32·side); the later one wins.
    assert bucket_for(1000, 1000) == (640, 608)


def test_extreme_aspects_go_to_table_ends():
    assert bucket_for(100, 2000) == (416, 960)
    assert bucket_for(2000, 100) == (960, 416)


def test_exact_aspect_match_is_chosen():
    for h, w in BUCKETS_640:
        assert bucket_for(h * 3, w * 3) == (h, w)


def test_scaled_resolution():
    table = buckets(320)
    assert table[4] == (272, 352)  # 544·0.5 = 272, 704·0.5 = 352
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in table)
    assert bucket_for(480, 640, resolution=320) == (272, 352)
    # 960 · 1.3 / 16 = 78 → 1248; 416 · 1.3 / 16 = 33.8 → 34 · 16 = 544
    assert buckets(832)[0] == (544, 1248)


@pytest.mark.parametrize("field,args", [("height", (0, 10)), ("width", (10, -3)), ("resolution", (10, 10, 100))])
def test_bad_input_names_the_field(field, args):
    with pytest.raises(SettingsError) as info:
        bucket_for(*args)
    assert info.value.field == field


def test_crop_shape_and_centre():
    # Left half red, right half blue, a green 20-pixel band in the middle row range.
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, :200, 0] = 255
    image[:, 200:, 2] = 255
    out = resize_and_center_crop(image, width=160, height=160)
    assert out.shape == (160, 160, 3) and out.dtype == np.uint8 and out.flags.writeable
    # Covering 160×160 scales by 160/300 → 213×160, then 26 columns are cut from each side,
    # so the red/blue boundary stays in the centre.
    assert out[:, :70, 0].min() > 240 and out[:, :70, 2].max() < 15
    assert out[:, 90:, 2].min() > 240 and out[:, 90:, 0].max() < 15


def test_crop_same_size_is_identity():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert np.array_equal(resize_and_center_crop(image, width=96, height=64), image)


def test_crop_rejects_non_rgb():
    with pytest.raises(SettingsError) as info:
        resize_and_center_crop(np.zeros((10, 10), np.uint8), 8, 8)
    assert info.value.field == "image"
