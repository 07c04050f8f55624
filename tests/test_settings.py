import math

import numpy as np
import pytest

from framepack_backend.presets import FLOW_PRESETS, PRESETS
from framepack_backend.request import validate_image
from framepack_backend.settings import (
    EngineOverrides,
    SamplingSettings,
    SettingsError,
    describe_settings,
    split_settings,
    validate_prompt,
)


def test_defaults_follow_the_spec():
    s = SamplingSettings()
    assert (s.steps, s.gs, s.cfg, s.rs, s.seed, s.window) == (25, 10.0, 1.0, 0.0, 31337, 9)
    assert s.teacache and s.teacache_threshold == 0.15 and EngineOverrides().sampling == "auto"
    assert s.blend_latents == 33  # at least the window: the reference's whole-section overlap


def test_preset_applies_then_explicit_values_win():
    s, engine = split_settings({"preset": "Hand Movement", "steps": "12"})
    assert s.steps == 12
    assert s.gs == 14.0 and s.teacache is False and s.flow_preset == "hand_detail"
    assert engine.gpu_memory_preservation == 8.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_names_a_flow_preset(name):
    s = SamplingSettings.from_mapping({"preset": name})
    assert s.flow_preset in FLOW_PRESETS
    assert s.steps == PRESETS[name].steps


def test_loose_values_are_coerced_strictly():
    s = SamplingSettings.from_mapping({"steps": "7", "gs": 3, "teacache": "off", "seed": 5.0})
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
        split_settings(values)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}=")
    assert "expected" in str(info.value)


def test_describe_lists_every_setting_with_its_default():
    spec = describe_settings()
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


def test_settings_split_by_scope_and_describe_lists_what_a_request_may_carry():
    from framepack_backend.settings import ATTENTION_BACKENDS, EngineOptions

    per_job = set(SamplingSettings.describe())
    overrides = set(EngineOverrides.describe())
    assert per_job.isdisjoint(overrides) and overrides == {"sampling", "attention", "memory_mode",
                                                           "gpu_memory_preservation"}
    assert set(EngineOptions.describe()) == {"sampling", "attention", "memory_mode", "gpu_memory_preservation",
                                             "fp8", "fused_qkv", "cuda_graphs",
                                             "fused_kernels", "fp32_output", "fast_vae_decode",
                                             "sequence_parallel"}
    spec = describe_settings()
    assert list(spec) == [*SamplingSettings.describe(), *EngineOverrides.describe()]
    assert "crf" not in spec and "fp8" not in spec
    # An override names the instance option's type and range; unset, the instance's value applies.
    assert spec["attention"]["choices"] == list(ATTENTION_BACKENDS) and spec["attention"]["default"] is None
    assert spec["gpu_memory_preservation"]["low"] == 0.0 and spec["gpu_memory_preservation"]["high"] == 256.0
    assert spec["sampling"] == {"type": "str", "default": "auto", "low": None, "high": None,
                                "choices": ["auto", "inverted", "f1"], "doc": spec["sampling"]["doc"]}
    assert EngineOptions.describe()["sampling"]["default"] == "inverted"


def test_crf_from_older_clients_is_range_checked_then_dropped():
    sampling, overrides = split_settings({"crf": "20", "steps": 3})
    assert sampling == SamplingSettings(steps=3) and overrides == EngineOverrides()
    from client.video import CRF_DEFAULT, CRF_HIGH, CRF_LOW
    from framepack_backend.settings import ClientOnlySettings

    spec = ClientOnlySettings.describe()["crf"]  # the server's legacy check agrees with the client's option
    assert (spec["default"], spec["low"], spec["high"]) == (CRF_DEFAULT, CRF_LOW, CRF_HIGH)


@pytest.mark.parametrize("given", ["dance", "DANCE", " Dance "])
def test_presets_and_flow_presets_are_accepted_in_any_case_and_reported_by_their_canonical_name(given):
    settings, _ = split_settings({"preset": given})
    assert settings.preset == "Dance" and settings.steps == 30 and settings.flow_preset == "dance"
    assert split_settings({"preset": "subtle movement"})[0].preset == "Subtle Movement"
    assert split_settings({"flow_preset": given.replace("dance", "Dance")})[0].flow_preset == "dance"
    assert split_settings({"flow_preset": "Hand_Detail"})[0].flow_preset == "hand_detail"
    assert split_settings({"memory_mode": "Stream"})[1].memory_mode == "stream"
    with pytest.raises(SettingsError) as info:
        split_settings({"preset": "dancing"})
    assert info.value.field == "preset" and "'Dance'" in str(info.value)
