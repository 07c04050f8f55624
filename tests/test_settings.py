import math

import numpy as np
import pytest

from framepack_backend.presets import FLOW_PRESETS, PRESETS
from framepack_backend.settings import GenerationSettings, SettingsError, validate_image, validate_prompt


def test_defaults_follow_the_spec():
    s = GenerationSettings()
    assert (s.steps, s.gs, s.cfg, s.rs, s.seed, s.window) == (25, 10.0, 1.0, 0.0, 31337, 9)
    assert s.teacache and s.teacache_threshold == 0.15 and s.sampling == "auto"
    assert s.blend_latents == 33  # at least the window: the reference's whole-section overlap


def test_preset_applies_then_explicit_values_win():
    s = GenerationSettings.from_mapping({"preset": "Hand Movement", "steps": "12"})
    assert s.steps == 12
    assert s.gs == 14.0 and s.teacache is False and s.flow_preset == "hand_detail"
    assert s.gpu_memory_preservation == 8.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_names_a_flow_preset(name):
    s = GenerationSettings.from_mapping({"preset": name})
    assert s.flow_preset in FLOW_PRESETS
    assert s.steps == PRESETS[name].steps


def test_loose_values_are_coerced_strictly():
    s = GenerationSettings.from_mapping({"steps": "7", "gs": 3, "teacache": "off", "seed": 5.0})
    assert (s.steps, s.gs, s.teacache, s.seed) == (7, 3.0, False, 5)
    assert isinstance(s.gs, float)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"gs": math.nan}, "gs"),
        ({"gs": math.inf}, "gs"),
        ({"cfg": True}, "cfg"),
        ({"seed": -1}, "seed"),
        ({"seconds": 1e9}, "seconds"),
        ({"teacache": "maybe"}, "teacache"),
        ({"preset": "Nope"}, "preset"),
        ({"flow_preset": "wobbly"}, "flow_preset"),
        ({"resolution": 200}, "resolution"),
        ({"attention": "magic"}, "attention"),
        ({"crf": 52}, "crf"),
        ({"blend_latents": 0}, "blend_latents"),
        ({"blend_latents": 34}, "blend_latents"),
        ({"unknown_knob": 1}, "unknown_knob"),
        ({"negative_prompt": 5}, "negative_prompt"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(values, field):
    with pytest.raises(SettingsError) as info:
        GenerationSettings.from_mapping(values)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}=")
    assert "expected" in str(info.value)


def test_describe_lists_every_setting_with_its_default():
    spec = GenerationSettings.describe()
    assert spec["steps"]["default"] == 25 and spec["steps"]["low"] == 1
    assert "Dance" in spec["preset"]["choices"]


def test_image_checks():
    assert validate_image(np.zeros((32, 48, 3), np.uint8)).shape == (32, 48, 3)
    for bad, expected in [
        (np.zeros((32, 48, 4), np.uint8), "shape"),
        (np.zeros((32, 48, 3), np.float32), "dtype"),
        (np.zeros((8, 48, 3), np.uint8), "16 pixels"),
        ("not an image", "uint8 array"),
    ]:
        with pytest.raises(SettingsError) as info:
            validate_image(bad)
        assert info.value.field == "image" and expected in str(info.value)


def test_prompt_checks():
    assert validate_prompt("a cat 🐱".encode()) == "a cat 🐱"
    for bad in [b"\xff\xfe", "x" * 5000, "nul\x00", 42]:
        with pytest.raises(SettingsError) as info:
            validate_prompt(bad)
        assert info.value.field == "prompt"
