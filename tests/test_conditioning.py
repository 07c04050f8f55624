import numpy as np
import pytest
import torch

from framepack_backend import conditioning as cond
from framepack_backend.components import load_components
from framepack_backend.settings import SettingsError
from framepack_backend.testing.tiny_bundle import TINY_CLIP, TINY_LLAMA, TINY_SIGLIP

LLAMA_DIM = TINY_LLAMA["hidden_size"]
CLIP_DIM = TINY_CLIP["hidden_size"]


@pytest.fixture(scope="module")
def components(tiny_bundle):
    return load_components(tiny_bundle, dtype=torch.float32)


def _encode(c, prompt):
    return cond.encode_prompt(
        c.tokenizer, c.text_encoder, c.tokenizer_2, c.text_encoder_2, prompt, "cpu", torch.float32
    )


def _image(height=64, width=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- prompt


def test_prefix_is_the_template_before_the_prompt(components):
    tok = components.tokenizer
    prefix = cond.prompt_prefix_length(tok)
    prompt = "A cat walks on the grass, realistic style."
    full = tok(cond.PROMPT_TEMPLATE.format(prompt))["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert full[prefix:] == prompt_ids + [eot]
    assert full[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    # The same count from the template with an empty prompt: everything but the closing <|eot_id|>.
    assert prefix == len(tok(cond.PROMPT_TEMPLATE.format(""))["input_ids"]) - 1


def test_prompt_embedding_is_the_prompt_tokens_of_hidden_state_minus_3(components):
    c = components
    prompt = "A cat walks on the grass, realistic style."
    emb = _encode(c, prompt)
    length = len(c.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + <|eot_id|>
    assert emb.hidden.shape == (1, length, LLAMA_DIM)
    assert emb.mask.shape == (1, length) and emb.mask.dtype == torch.bool and bool(emb.mask.all())
    assert emb.pooled.shape == (1, CLIP_DIM)

    prefix = cond.prompt_prefix_length(c.tokenizer)
    ids = torch.tensor([c.tokenizer(cond.PROMPT_TEMPLATE.format(prompt))["input_ids"]])
    with torch.no_grad():
        states = c.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
    expected = states[-3][:, prefix:]
    assert torch.allclose(emb.hidden, expected, atol=1e-5)
    assert not torch.allclose(emb.hidden, states[-1][:, prefix:], atol=1e-3)


def test_prompts_differ_and_repeat_exactly(components):
    a, b = _encode(components, "a red car"), _encode(components, "a blue boat")
    assert not torch.allclose(a.pooled, b.pooled)
    # Causal attention: the first tokens ("a") match; the closing token has read the whole prompt.
    assert not torch.allclose(a.hidden[:, -1], b.hidden[:, -1])
    again = _encode(components, "a red car")
    assert torch.equal(a.hidden, again.hidden) and torch.equal(a.pooled, again.pooled)


@pytest.mark.parametrize(
    "prompt", ["", "🐱🚀 emoji only", "日本語のプロンプト", "Ünïcödé — “quotes” ½", "tab\there\nnewline"]
)
def test_any_utf8_prompt_encodes(components, prompt):
    emb = _encode(components, prompt)
    assert emb.hidden.shape[1] >= 1 and torch.isfinite(emb.hidden).all() and torch.isfinite(emb.pooled).all()
    if prompt.startswith("🐱"):
        # Byte-level BPE: the emoji's 8 bytes are real tokens, not one unknown token.
        assert emb.hidden.shape[1] >= 8


def test_empty_prompt_keeps_only_the_closing_token(components):
    assert _encode(components, "").hidden.shape == (1, 1, LLAMA_DIM)


def test_long_prompt_is_cut_to_256_tokens(components):
    emb = _encode(components, "a cat and a dog " * 400)
    assert emb.hidden.shape == (1, cond.LLAMA_MAX_PROMPT_TOKENS, LLAMA_DIM)


def test_non_string_prompt_names_the_field(components):
    # The request's prompt was checked when parsed: here a non-string is the engine's bug.
    with pytest.raises(ValueError, match="^prompt=None") as info:
        _encode(components, None)
    assert not isinstance(info.value, SettingsError)


def test_pad_crop_and_zero_negative(components):
    emb = _encode(components, "a red car")
    length = emb.hidden.shape[1]
    padded = emb.padded()
    assert padded.hidden.shape == (1, 512, LLAMA_DIM) and padded.mask.shape == (1, 512)
    assert int(padded.mask.sum()) == length and bool(padded.mask[0, :length].all())
    assert torch.equal(padded.hidden[:, :length], emb.hidden)
    assert padded.hidden[:, length:].abs().max() == 0
    back = padded.cropped()
    assert torch.equal(back.hidden, emb.hidden) and torch.equal(back.mask, emb.mask)
    short = emb.padded(2)
    assert short.hidden.shape == (1, 2, LLAMA_DIM) and torch.equal(short.hidden, emb.hidden[:, :2])

    negative = cond.zero_prompt_like(emb)
    assert negative.hidden.shape == emb.hidden.shape and negative.pooled.shape == emb.pooled.shape
    assert negative.hidden.abs().max() == 0 and negative.pooled.abs().max() == 0
    assert torch.equal(negative.mask, emb.mask)


# ---------------------------------------------------------------- image latent


def test_image_latent_shape_and_determinism(components):
    vae = components.vae
    latent = cond.encode_image_latent(vae, _image(64, 96), "cpu", torch.float32)
    assert latent.shape == (1, 16, 1, 8, 12) and latent.dtype == torch.float32
    assert torch.equal(latent, cond.encode_image_latent(vae, _image(64, 96), "cpu", torch.float32))
    assert not torch.allclose(latent, cond.encode_image_latent(vae, _image(64, 96, seed=1), "cpu"))
    # The posterior mean times the scaling factor.
    pixels = torch.from_numpy(_image(64, 96)).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    assert torch.allclose(latent, mean * 0.476986, atol=1e-6)


def test_image_latent_sampled_with_a_generator(components):
    vae, image = components.vae, _image(32, 32)
    sample = cond.encode_image_latent(vae, image, "cpu", generator=torch.Generator().manual_seed(7))
    again = cond.encode_image_latent(vae, image, "cpu", generator=torch.Generator().manual_seed(7))
    assert torch.equal(sample, again)
    assert not torch.equal(sample, cond.encode_image_latent(vae, image, "cpu"))


def test_image_latent_rejects_bad_images(components):
    for bad in (_image(60, 96), _image(64, 96).astype(np.float32), _image(64, 96)[..., :2]):
        with pytest.raises(ValueError, match="^image=") as info:
            cond.encode_image_latent(components.vae, bad, "cpu")
        assert not isinstance(info.value, SettingsError)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 6])
def test_decode_frame_count(components, latent_frames):
    latents = torch.randn(1, 16, latent_frames, 4, 6, generator=torch.Generator().manual_seed(0))
    pixels = cond.decode_latents(components.vae, latents)
    assert pixels.shape == (1, 3, 4 * (latent_frames - 1) + 1, 32, 48)
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()


def test_decode_divides_by_the_scaling_factor(components):
    vae = components.vae
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(latents / 0.476986).sample
    assert torch.allclose(cond.decode_latents(vae, latents), expected, atol=1e-6)


def test_frames_to_uint8_values_and_layout():
    pixels = torch.zeros(1, 3, 2, 4, 5)
    pixels[0, 0] = -1.0  # red channel: 0
    pixels[0, 1] = 1.0  # green: 255
    pixels[0, 2, 1] = 2.0  # blue, second frame: clamped to 255
    frames = cond.frames_to_uint8(pixels)
    assert frames.shape == (2, 4, 5, 3) and frames.dtype == np.uint8
    assert (frames[..., 0] == 0).all() and (frames[..., 1] == 255).all()
    assert (frames[0, ..., 2] == 128).all() and (frames[1, ..., 2] == 255).all()
    assert np.array_equal(cond.frames_to_uint8(pixels[0]), frames)
    with pytest.raises(ValueError, match="batch size 1") as info:
        cond.frames_to_uint8(torch.zeros(2, 3, 1, 4, 4))
    assert not isinstance(info.value, SettingsError)


def test_encode_decode_round_trip_shape(components):
    latent = cond.encode_image_latent(components.vae, _image(64, 96), "cpu")
    frames = cond.frames_to_uint8(cond.decode_latents(components.vae, latent))
    assert frames.shape == (1, 64, 96, 3)


# ---------------------------------------------------------------- SigLIP


def test_image_embeds_shape(components):
    c = components
    tokens = (TINY_SIGLIP["image_size"] // TINY_SIGLIP["patch_size"]) ** 2
    embeds = cond.encode_image_embeds(c.feature_extractor, c.image_encoder, _image(64, 96), "cpu", torch.float32)
    assert embeds.shape == (1, tokens, TINY_SIGLIP["hidden_size"])
    other_size = cond.encode_image_embeds(c.feature_extractor, c.image_encoder, _image(100, 40, seed=1), "cpu")
    assert other_size.shape == embeds.shape and not torch.allclose(other_size, embeds)
    again = cond.encode_image_embeds(c.feature_extractor, c.image_encoder, _image(64, 96), "cpu", torch.float32)
    assert torch.equal(embeds, again)
