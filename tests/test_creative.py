"""Creative controls on the tiny model: where each guide lands in the transformer's inputs,
per-section text conditioning, text-to-video starts, bit-identity of the neutral settings."""

import numpy as np
import pytest
import torch

from framepack_backend import conditioning, guides, planner
from framepack_backend.buckets import resize_and_center_crop
from framepack_backend.events import GenerationResult
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SettingsError

request = GenerationRequest.parse
# Window 3: a section is 12 frames (0.4 s), so 0.8 s is 2 sections and 1.2 s is 3, each quick on a CPU.
FAST = {"resolution": 128, "steps": 1, "window": 3, "seconds": 0.8, "teacache": False, "preview": False}
THREE = {**FAST, "seconds": 1.2}  # playback sections 0-0.4, 0.4-0.8, 0.8-1.2 s; middles 0.2, 0.6, 1.0 s
HEIGHT, WIDTH = 112, 144  # the conftest image's bucket at resolution 128


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    return Pipeline.from_pretrained(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def end_image(image):
    return np.ascontiguousarray(255 - image[::-1])


def run(pipeline, req):
    """The job's frames and the transformer inputs of every call, grouped by section (generation order)."""
    calls = []

    def record(module, args, kwargs):
        calls.append({k: kwargs[k].detach().clone() for k in
                      ("latents_clean", "encoder_hidden_states", "pooled_projections", "image_embeds")})

    handle = pipeline.components.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = list(pipeline.generate(req))[-1]
    finally:
        handle.remove()
    assert isinstance(result, GenerationResult)
    steps = req.settings.steps
    return result.frames, [calls[i] for i in range(0, len(calls), steps)]


def latent_of(pipeline, image):
    pixels = resize_and_center_crop(image, WIDTH, HEIGHT)
    return conditioning.encode_image_latent(pipeline.components.vae, pixels, "cpu").float()


def embeds_of(pipeline, image):
    c = pipeline.components
    pixels = resize_and_center_crop(image, WIDTH, HEIGHT)
    return conditioning.encode_image_embeds(c.feature_extractor, c.image_encoder, pixels, "cpu")


def encoded(pipeline, prompt):
    c = pipeline.components
    return conditioning.encode_prompt(c.tokenizer, c.text_encoder, c.tokenizer_2, c.text_encoder_2, prompt,
                                      "cpu", torch.float32)


@pytest.fixture(scope="module")
def plain(pipeline, image):
    return run(pipeline, request(image, "a cat", **FAST))


@pytest.fixture(scope="module")
def with_end(pipeline, image, end_image):
    return run(pipeline, request(image, "a cat", end_image=end_image, **FAST))


def test_the_end_latent_is_the_first_inverted_section_s_1x_context_and_only_there(
        pipeline, image, end_image, plain, with_end):
    _, sections = with_end
    end = latent_of(pipeline, end_image)
    start = latent_of(pipeline, image)
    first, second = sections
    torch.testing.assert_close(first["latents_clean"][:, :, 1:2], end, rtol=0, atol=0)
    torch.testing.assert_close(first["latents_clean"][:, :, 0:1], start, rtol=0, atol=0)
    assert not torch.equal(second["latents_clean"][:, :, 1:2], end)
    # Without an end image the slot holds the empty history's zeros.
    assert plain[1][0]["latents_clean"][:, :, 1].abs().max() == 0
    # SigLIP: the start's and the end's tokens averaged at strength 1.
    mean = torch.lerp(embeds_of(pipeline, image), embeds_of(pipeline, end_image), 0.5)
    torch.testing.assert_close(first["image_embeds"], mean, rtol=0, atol=0)


def test_end_strength_scales_the_end_latent_and_zero_is_no_end_image(pipeline, image, end_image, plain, with_end):
    frames, sections = run(pipeline, request(image, "a cat", end_image=end_image, end_strength=0.5, **FAST))
    torch.testing.assert_close(sections[0]["latents_clean"][:, :, 1:2], 0.5 * latent_of(pipeline, end_image))
    zero_frames, _ = run(pipeline, request(image, "a cat", end_image=end_image, end_strength=0, **FAST))
    assert np.array_equal(zero_frames, plain[0])
    assert not np.array_equal(with_end[0], plain[0])
    assert not np.array_equal(frames, with_end[0])


def test_loop_ends_on_the_start_image(pipeline, image, plain):
    frames, sections = run(pipeline, request(image, "a cat", loop=True, **FAST))
    torch.testing.assert_close(sections[0]["latents_clean"][:, :, 1:2], latent_of(pipeline, image), rtol=0, atol=0)
    assert not np.array_equal(frames, plain[0])


@pytest.fixture(scope="module")
def plain_three(pipeline, image):
    return run(pipeline, request(image, "a cat", **THREE))


def test_a_keyframe_s_latent_lands_in_the_section_covering_its_time(pipeline, image, end_image, plain_three):
    req = request(image, "a cat", keyframes=end_image[None], keyframe_times="0.6", **THREE)
    frames, sections = run(pipeline, req)
    assert len(sections) == 3
    keyframe, start = latent_of(pipeline, end_image), latent_of(pipeline, image)
    # 0.6 s is in the middle playback section, generated second in an inverted run.
    for index, section in enumerate(sections):
        expected = keyframe if index == 1 else start
        torch.testing.assert_close(section["latents_clean"][:, :, 0:1], expected, rtol=0, atol=0)
    assert not np.array_equal(frames, plain_three[0])


def test_each_section_is_conditioned_on_the_prompt_active_at_its_time(pipeline, image, plain_three, monkeypatch):
    encodes = []
    real = conditioning.encode_prompt

    def counting(*args):
        encodes.append(args[4])
        return real(*args)

    monkeypatch.setattr(conditioning, "encode_prompt", counting)
    frames, sections = run(pipeline, request(image, "[0s: a cat] [0.5s: a dog] [0.9s: a cat]", **THREE))
    assert sorted(encodes) == ["a cat", "a dog"]  # each distinct prompt once
    cat, dog = encoded(pipeline, "a cat"), encoded(pipeline, "a dog")
    expected = [cat, dog, cat][::-1]  # generation order: the video's end first
    for section, prompt in zip(sections, expected):
        torch.testing.assert_close(section["encoder_hidden_states"], prompt.hidden, rtol=0, atol=0)
        torch.testing.assert_close(section["pooled_projections"], prompt.pooled, rtol=0, atol=0)
    assert not np.array_equal(frames, plain_three[0])


def test_blended_sections_are_the_stated_linear_mix(pipeline, image):
    settings = {**THREE, "prompt_blend_sections": 1}
    _, sections = run(pipeline, request(image, "[0s: a cat] [0.5s: a dog waves hello]", **settings))
    cat, dog = encoded(pipeline, "a cat"), encoded(pipeline, "a dog waves hello")
    length = max(cat.hidden.shape[1], dog.hidden.shape[1])
    mix = 0.5 * cat.padded(length).hidden + 0.5 * dog.padded(length).hidden
    # Playback: cat, the change section (half and half), dog; generated in reverse.
    torch.testing.assert_close(sections[2]["encoder_hidden_states"], cat.hidden, rtol=0, atol=0)
    torch.testing.assert_close(sections[1]["encoder_hidden_states"], mix)
    torch.testing.assert_close(sections[1]["pooled_projections"], 0.5 * cat.pooled + 0.5 * dog.pooled)
    torch.testing.assert_close(sections[0]["encoder_hidden_states"], dog.hidden, rtol=0, atol=0)


def test_a_single_timed_prompt_gives_the_plain_prompt_s_frames(pipeline, image, plain):
    frames, _ = run(pipeline, request(image, "[0s: a cat]", **FAST))
    assert np.array_equal(frames, plain[0])


@pytest.mark.parametrize("latent_init", ["black", "noise"])
def test_text_to_video_starts_from_the_latent_init_picture(pipeline, latent_init):
    frames, sections = run(pipeline, request(None, "a cat", latent_init=latent_init, seed=7, **FAST))
    height, width = guides.start_size(None, 128)
    assert frames.shape == (planner.video_frame_count(2, 3), height, width, 3) == (25, 128, 128, 3)
    pixels = guides.init_pixels(latent_init, height, width, seed=7)
    if latent_init == "black":
        assert pixels.max() == 0
    start = conditioning.encode_image_latent(pipeline.components.vae, pixels, "cpu").float()
    for section in sections:
        torch.testing.assert_close(section["latents_clean"][:, :, 0:1], start, rtol=0, atol=0)


def test_text_to_video_pictures_are_black_white_or_noise_from_the_seed():
    assert guides.init_pixels("black", 16, 16, 1).max() == 0 and guides.init_pixels("white", 16, 16, 1).min() == 255
    a, b = guides.init_pixels("noise", 16, 16, 1), guides.init_pixels("noise", 16, 16, 2)
    assert np.array_equal(a, guides.init_pixels("noise", 16, 16, 1)) and not np.array_equal(a, b)


def test_f1_refuses_end_images_loops_and_keyframes(tiny_bundle, image, end_image):
    f1 = Pipeline.from_pretrained(tiny_bundle, device="cpu", sampling="f1")
    for extra, field in (({"end_image": end_image}, "end_image"), ({"loop": True}, "loop"),
                         ({"keyframes": end_image[None], "keyframe_times": "0.5"}, "keyframes")):
        with pytest.raises(SettingsError) as error:
            next(iter(f1.generate(request(image, "a cat", **extra, **FAST))))
        assert error.value.field == field


@pytest.mark.parametrize("extra, field, words", [
    ({"keyframe_times": "9"}, "keyframe_times", "0 to 0.8 s"),
    ({"keyframe_times": "x"}, "keyframe_times", "number of seconds"),
    ({"keyframe_times": "0.1, 0.2"}, "keyframe_times", "at most one keyframe per section"),
    ({"keyframe_times": "0.1, 0.5, 0.7"}, "keyframe_times", "at most one keyframe per section"),
    ({"keyframe_times": ""}, "keyframe_times", "one time in seconds per keyframe image"),
])
def test_bad_keyframes_are_refused_naming_the_value(image, extra, field, words):
    count = max(len(extra["keyframe_times"].split(",")), 1)
    keyframes = np.stack([image] * count)
    with pytest.raises(SettingsError) as error:
        request(image, "a cat", keyframes=keyframes, **{**FAST, **extra})
    assert error.value.field == field and words in str(error.value)


def test_bad_guide_images_and_loop_with_an_end_image_are_refused(image):
    with pytest.raises(SettingsError, match="end_image"):
        request(image, "a cat", end_image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SettingsError, match="at most 16777216 pixels") as oversize:
        request(image, "a cat", end_image=np.zeros((4097, 4096, 3), np.uint8))
    assert oversize.value.field == "end_image"
    with pytest.raises(SettingsError, match="a start image and no end image"):
        request(None, "a cat", loop=True)  # text-to-video has no start image to loop to
    with pytest.raises(SettingsError, match="keyframes"):
        request(image, "a cat", keyframes=np.zeros((17, 32, 32, 3), np.uint8), keyframe_times="0")
    with pytest.raises(SettingsError, match="loop"):
        request(image, "a cat", end_image=image, loop=True)
