"""What the transformer is conditioned on: prompt embeddings, the start latent, SigLIP tokens.

Pure functions over components that are already loaded (see `components.py`); each
encoder runs in its own dtype on `device` and the result is returned in `dtype`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import GenerationCancelled

# The HunyuanVideo prompt template; the text encoder was trained to read prompts in it.
# The user prompt replaces "{}". Its tokens before the prompt (the "prefix") are dropped
# from the embedding.
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
LLAMA_MAX_PROMPT_TOKENS = 256
LLAMA_HIDDEN_LAYER = -3  # HunyuanVideo reads the Llama state two layers below the last
CLIP_MAX_TOKENS = 77
TRANSFORMER_TEXT_TOKENS = 512  # the transformer always sees 512 text slots with a mask


@dataclass
class PromptEmbedding:
    """One prompt, encoded: Llama tokens `hidden` (1, L, D) with `mask` (1, L) bool, CLIP `pooled` (1, Dp)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def cropped(self) -> PromptEmbedding:
        """Only the tokens the mask keeps (batch 1: the mask is a prefix of True)."""
        length = int(self.mask[0].sum())
        return PromptEmbedding(self.hidden[:, :length], self.mask[:, :length], self.pooled)

    def padded(self, length: int = TRANSFORMER_TEXT_TOKENS) -> PromptEmbedding:
        """Zero-pad (or crop) the token axis to `length`; padded slots are masked out."""
        current = self.hidden.shape[1]
        if current >= length:
            return PromptEmbedding(self.hidden[:, :length], self.mask[:, :length], self.pooled)
        hidden = self.hidden.new_zeros(self.hidden.shape[0], length, self.hidden.shape[2])
        hidden[:, :current] = self.hidden
        mask = torch.zeros(self.mask.shape[0], length, dtype=torch.bool, device=self.mask.device)
        mask[:, :current] = self.mask
        return PromptEmbedding(hidden, mask, self.pooled)


def prompt_prefix_length(tokenizer) -> int:
    """How many Llama tokens the template puts before the user prompt (95 with HunyuanVideo's tokenizer).

    Counted from the tokenizer itself (special tokens such as BOS included), so the same
    code drops the right tokens for the real and the tiny tokenizer. The prefix ends in
    "\\n\\n", which the Llama-3 pre-tokenizer keeps as its own piece, so the count does not
    depend on the prompt.
    """
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(prefix, add_special_tokens=True)["input_ids"])


def encode_prompt(
    tokenizer,
    text_encoder,
    tokenizer_2,
    text_encoder_2,
    prompt: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> PromptEmbedding:
    """Encode `prompt` with Llama (template, hidden_states[-3]) and CLIP (pooler_output).

    Returns the Llama tokens of the prompt only: the template prefix is dropped and the
    sequence is cut to its attention-masked length (at most 256 tokens; the template's
    closing <|eot_id|> counts), so `mask` is all True. The prompt was checked with the
    request (request.parse_request); a non-string here is a bug (ValueError).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt={prompt!r} is not allowed: expected a string")
    prefix_length = prompt_prefix_length(tokenizer)
    llama_inputs = tokenizer(
        PROMPT_TEMPLATE.format(prompt),
        max_length=LLAMA_MAX_PROMPT_TOKENS + prefix_length,
        padding="max_length",
        padding_side="right",  # the prefix must sit at the start to be cut off by position
        truncation=True,
        return_tensors="pt",
    )
    input_ids = llama_inputs["input_ids"].to(device)
    attention_mask = llama_inputs["attention_mask"].to(device)
    with torch.no_grad():
        llama_states = text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states[LLAMA_HIDDEN_LAYER]
    hidden = llama_states[:, prefix_length:].to(dtype)
    mask = attention_mask[:, prefix_length:].bool()

    clip_inputs = tokenizer_2(
        prompt, max_length=CLIP_MAX_TOKENS, padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        pooled = text_encoder_2(input_ids=clip_inputs["input_ids"].to(device)).pooler_output
    return PromptEmbedding(hidden, mask, pooled.to(dtype)).cropped()


def zero_prompt_like(embedding: PromptEmbedding) -> PromptEmbedding:
    """The negative prompt at cfg == 1: zeros of the positive's shape, same mask (no encoder call)."""
    return PromptEmbedding(
        torch.zeros_like(embedding.hidden), embedding.mask.clone(), torch.zeros_like(embedding.pooled)
    )


def encode_image_latent(
    vae,
    pixels: np.ndarray,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """VAE-encode one RGB frame (uint8 H×W×3, sides multiples of 8) → start latent (1, 16, 1, H/8, W/8).

    Uses the posterior mean, so a job does not depend on global RNG state; passing a
    `generator` samples the posterior with it instead (the reference samples). The result
    is multiplied by the VAE scaling factor, as the transformer expects.
    """
    _check_rgb(pixels, multiple_of=8)
    video = _pixels_to_video(pixels).to(device=device, dtype=vae.dtype)
    with torch.no_grad():
        posterior = vae.encode(video).latent_dist
    latent = posterior.mean if generator is None else posterior.sample(generator)
    return (latent * vae.config.scaling_factor).to(dtype)


def encode_video_latents(
    vae,
    frames: np.ndarray,
    device: torch.device | str,
    tiled: bool | None = None,
) -> torch.Tensor:
    """VAE-encode a clip (uint8 T×H×W×3, sides multiples of 8) → latents (1, 16, 1 + ⌊(T−1)/4⌋, H/8, W/8).

    One encode of the whole clip: latent 0 stands for frame 0 and each later one for the
    next 4 frames (the convolutions are causal in time, but the group norms take their
    statistics over the whole clip, so latent 0 is near, not equal to, frame 0's image
    latent); diffusers encodes a long clip in overlapping temporal tiles. `tiled` turns the
    spatial tiling on or off (None: as the VAE is set). Posterior mean times the scaling
    factor, as encode_image_latent.
    """
    if not (isinstance(frames, np.ndarray) and frames.ndim == 4 and len(frames)):
        raise ValueError(f"frames of shape {getattr(frames, 'shape', None)}: expected a uint8 array T×H×W×3, T ≥ 1")
    _check_rgb(frames[0], multiple_of=8)
    video = torch.from_numpy(frames.astype(np.float32)) / 127.5 - 1.0
    video = video.permute(3, 0, 1, 2)[None].to(device=device, dtype=vae.dtype)
    with ExitStack() as stack:
        if tiled is not None and hasattr(vae, "use_tiling"):
            stack.callback(setattr, vae, "use_tiling", vae.use_tiling)
            vae.use_tiling = tiled
        with torch.no_grad():
            latent = vae.encode(video).latent_dist.mean
    return latent * vae.config.scaling_factor


def decode_latents(
    vae,
    latents: torch.Tensor,
    tiled: bool | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Decode latents (1, 16, T, h, w) → pixels (1, 3, 4(T−1)+1, 8h, 8w) in about [−1, 1] (float32).

    `tiled` turns the VAE's spatial tiling on or off for this decode (None: as the VAE is
    set). `cancel` is polled before every call of the VAE's decoder: diffusers' HunyuanVideo
    VAE already decodes in overlapping temporal chunks (and spatial tiles when tiling is on),
    one decoder call each, so a long decode stops within one chunk (GenerationCancelled)
    and the pixels are exactly those of an uncancellable decode.
    """
    if latents.ndim != 5:
        raise ValueError(
            f"latents of shape {tuple(latents.shape)}: expected a 5-d tensor (batch, channels, frames, height, width)"
        )
    scaled = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    with ExitStack() as stack:
        if tiled is not None and hasattr(vae, "use_tiling"):
            was_tiled = vae.use_tiling
            vae.use_tiling = tiled
            stack.callback(setattr, vae, "use_tiling", was_tiled)
        if cancel is not None:
            stack.callback(vae.decoder.register_forward_pre_hook(_cancel_check(cancel)).remove)
        with torch.no_grad():
            return vae.decode(scaled).sample.float()


def _cancel_check(cancel: Callable[[], bool]) -> Callable[..., None]:
    def check(module, args) -> None:
        if cancel():
            raise GenerationCancelled("cancelled during the VAE decode")

    return check


def frames_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels (1, 3, T, H, W) or (3, T, H, W) in [−1, 1] → uint8 frames T×H×W×3 (clamped, rounded)."""
    if pixels.ndim == 5:
        if pixels.shape[0] != 1:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}: expected batch size 1")
        pixels = pixels[0]
    if pixels.ndim != 4 or pixels.shape[0] != 3:
        raise ValueError(f"pixels of shape {tuple(pixels.shape)}: expected shape (1, 3, T, H, W) or (3, T, H, W)")
    scaled = ((pixels.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def encode_image_embeds(
    feature_extractor,
    image_encoder,
    pixels: np.ndarray,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SigLIP tokens (1, N, C) of an RGB image (uint8 H×W×3): last_hidden_state (729×1152 for the real encoder)."""
    _check_rgb(pixels, multiple_of=1)
    inputs = feature_extractor(images=pixels, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=device, dtype=image_encoder.dtype)
    with torch.no_grad():
        tokens = image_encoder(pixel_values=pixel_values).last_hidden_state
    return tokens.to(dtype)


def _pixels_to_video(pixels: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 → float (1, 3, 1, H, W) in [−1, 1]."""
    image = torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1.0  # astype copies: input may be read-only
    return image.permute(2, 0, 1)[None, :, None]


def _check_rgb(pixels: np.ndarray, multiple_of: int) -> None:
    """The engine's own resized image (the request's was checked when parsed): a bug if wrong."""
    ok = isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    if not ok or pixels.shape[0] % multiple_of or pixels.shape[1] % multiple_of:
        shown = f"array {pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        sides = f" with height and width multiples of {multiple_of}" if multiple_of > 1 else ""
        raise ValueError(f"image={shown} is not allowed: expected a uint8 numpy array of shape H×W×3 (RGB){sides}")


def mix_prompts(embeddings: list[PromptEmbedding], weights: tuple[tuple[int, float], ...]) -> PromptEmbedding:
    """The weighted sum of prompt embeddings `((index, weight), …)`; one prompt is returned as it is.

    Prompts of different token lengths are zero-padded to the longest first (the zeros the
    transformer's 512-slot layout pads with), and the mix keeps every token of the longest.
    """
    if len(weights) == 1:
        return embeddings[weights[0][0]]
    length = max(embeddings[index].hidden.shape[1] for index, _ in weights)
    padded = [(embeddings[index].padded(length), weight) for index, weight in weights]
    hidden = sum(weight * e.hidden.float() for e, weight in padded)
    pooled = sum(weight * e.pooled.float() for e, weight in padded)
    first = padded[0][0]
    mask = torch.ones_like(first.mask)
    return PromptEmbedding(hidden.to(first.hidden.dtype), mask, pooled.to(first.pooled.dtype))  # type: ignore[union-attr]
