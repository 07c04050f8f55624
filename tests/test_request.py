"""The request boundary: one parse of image, prompt and settings into a GenerationRequest,
and the per-instance options a job may override through one explicit path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from framepack_backend.prompt_schedule import TimedPrompt
from framepack_backend.request import GenerationRequest, parse_request
from framepack_backend.settings import EngineOptions, EngineOverrides, SamplingSettings, SettingsError
from framepack_backend.variants import SamplingVariant

IMAGE = np.zeros((32, 48, 3), np.uint8)


def test_parameters_become_one_request_with_settings_and_overrides_apart():
    request = parse_request(IMAGE, {"prompt": "waves", "steps": "7", "attention": "sdpa", "memory_mode": "offload",
                                    "gpu_memory_preservation": "2.5", "sampling": "auto", "crf": "20"})
    assert request.image is IMAGE and request.prompt == "waves"
    assert request.settings == SamplingSettings(steps=7)
    assert request.engine == EngineOverrides(sampling="auto", attention="sdpa", memory_mode="offload",
                                             gpu_memory_preservation=2.5)
    assert not hasattr(request.settings, "crf")  # checked, then left to the client


def test_the_convenience_parse_takes_settings_as_keywords():
    request = GenerationRequest.parse(IMAGE, "waves", steps=7, preset="Hand Movement")
    assert (request.settings.steps, request.settings.gs, request.settings.flow_preset) == (7, 14.0, "hand_detail")
    assert request.engine.gpu_memory_preservation == 8.0  # the preset's, an override of the instance option
    assert request.engine.attention is None and request.engine.memory_mode is None


def test_a_request_is_frozen():
    request = GenerationRequest.parse(IMAGE, "waves")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.prompt = "other"  # type: ignore[misc]


@pytest.mark.parametrize("image, parameters, field, allowed", [
    (None, {"prompt": "x", "latent_init": "green"}, "latent_init", "one of 'black', 'white', 'noise'"),
    (IMAGE[:, :, :2], {"prompt": "x"}, "image", "shape H×W×3 (RGB)"),
    (IMAGE.astype(np.float32), {"prompt": "x"}, "image", "dtype uint8"),
    (IMAGE, {}, "prompt", "a text prompt in the request parameter 'prompt'"),
    (IMAGE, {"prompt": "nul\x00"}, "prompt", "text without NUL characters"),
    (IMAGE, {"prompt": "x", "crf": 52}, "crf", "int in [0, 51]"),
    (IMAGE, {"prompt": "x", "sampling": "sideways"}, "sampling", "one of 'auto', 'inverted', 'f1'"),
    (IMAGE, {"prompt": "x", "gpu_memory_preservation": -1}, "gpu_memory_preservation", "float in [0.0, 256.0]"),
    (IMAGE, {"prompt": "x", "fp8": True}, "fp8", "one of the settings"),  # an instance option, not per job
])
def test_bad_input_is_refused_at_the_boundary_naming_the_field(image, parameters, field, allowed):
    with pytest.raises(SettingsError) as caught:
        parse_request(image, parameters)
    assert caught.value.field == field and allowed in caught.value.allowed


def test_a_request_without_an_image_is_text_to_video_from_its_latent_init():
    request = parse_request(None, {"prompt": "a cat", "latent_init": "white"})
    assert request.image is None and request.settings.latent_init == "white"
    assert request.schedule == (TimedPrompt(0.0, "a cat"),)


def test_overrides_apply_to_a_copy_of_the_instance_options():
    options = EngineOptions(sampling="f1", memory_mode="stream", gpu_memory_preservation=4.0)
    assert options.sampling is SamplingVariant.F1
    job = options.for_job(EngineOverrides(attention="sdpa", gpu_memory_preservation=1.0))
    assert (job.sampling, job.attention, job.memory_mode, job.gpu_memory_preservation) == ("f1", "sdpa", "stream", 1.0)
    assert options == EngineOptions(sampling="f1", memory_mode="stream", gpu_memory_preservation=4.0)  # unchanged
    assert options.for_job(EngineOverrides()) == options
    assert options.for_job(EngineOverrides(sampling="f1")) == options


def test_a_job_cannot_switch_the_loaded_sampling_variant():
    with pytest.raises(SettingsError) as caught:
        EngineOptions().for_job(EngineOverrides(sampling="f1"))
    assert caught.value.field == "sampling" and "loaded with transformer/" in caught.value.allowed
