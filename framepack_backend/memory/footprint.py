"""How many GPU bytes a job needs: component weights and per-phase working memory.

Weights are counted exactly from the loaded modules. Working memory (activations,
allocator slack) is estimated from measured peaks; each constant says where its
number comes from. `benchmarks/memory.py` reports the measured peaks to check them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .host import module_bytes

GIB = 1 << 30

# Peak activation memory of one transformer forward, in units of one bf16 hidden state
# (tokens × inner_dim × 2 bytes). ≈18 measured at the 640 bucket (26 GiB peak with 24 GiB
# of weights, shared/GPU.md); 24 leaves room for allocator fragmentation.
SAMPLING_HIDDEN_STATES = 24
# HunyuanVideo VAE decode working memory per pixel of the frame area: 22.6–23 GiB at
# 640×640 untiled whatever the frame count (diffusers decodes 16 frames at a time; GPU.md).
DECODE_BYTES_PER_PIXEL = 60_000
# diffusers' default spatial tile (256×256 pixels): tiled decode works on one tile at a time
# (4.3 GiB measured for 19 latent frames at 640×640, of which ≈0.9 GB is the decoded video).
VAE_TILE_PIXELS = 256 * 256
# Decoded video kept while decoding: fp16 sample, its fp32 copy and the blended result.
DECODED_BYTES_PER_VALUE = 2 + 4 + 4
# Estimates, not measured: one frame through the VAE encoder (a few full-resolution
# 128-channel activations) and Llama over ≤ 351 tokens keeping all hidden states.
ENCODE_BYTES_PER_PIXEL = 8_000
TEXT_WORK_BYTES = 1 * GIB
# Context tokens beside the latents: SigLIP image tokens and at most 256 prompt tokens.
IMAGE_TOKENS = 729
TEXT_TOKENS = 256
CONTEXT_FRAMES = {"1x": 2, "2x": 2, "4x": 16}  # clean history frames per scale (planner.py)


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes on the GPU: weights per component (in their run dtype) and working memory per phase.

    `*_layers` / `transformer_blocks` list the bytes of each streamable block in forward
    order; `*_tiled` is the working memory with the VAE tiled (stream mode).
    """

    text_encoder: int
    text_encoder_layers: tuple[int, ...]
    text_encoder_2: int
    image_encoder: int
    vae: int
    transformer: int
    transformer_blocks: tuple[int, ...]
    text_work: int
    image_work: int
    image_work_tiled: int
    sampling_work: int
    decode_work: int
    decode_work_tiled: int

    @property
    def weights(self) -> int:
        return self.text_encoder + self.text_encoder_2 + self.image_encoder + self.vae + self.transformer


def streamable_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model, in forward order: what block streaming moves one at a time.

    Our transformer's dual- then single-stream blocks; a transformers decoder's `layers`
    (the Llama text encoder). Other models have none and move whole.
    """
    if hasattr(module, "transformer_blocks") and hasattr(module, "single_transformer_blocks"):
        return [*module.transformer_blocks, *module.single_transformer_blocks]
    layers = getattr(module, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def sampling_tokens(config: Any, height: int, width: int, window: int) -> int:
    """Tokens one transformer forward sees: noisy + 1x/2x/4x context latents, image and text tokens."""
    p = config.patch_size
    lh, lw = height // 8, width // 8
    latent = (window * (lh // p) * (lw // p)
              + CONTEXT_FRAMES["1x"] * (lh // p) * (lw // p)
              + math.ceil(CONTEXT_FRAMES["2x"] / 2) * math.ceil(lh / 4) * math.ceil(lw / 4)
              + math.ceil(CONTEXT_FRAMES["4x"] / 4) * math.ceil(lh / 8) * math.ceil(lw / 8))
    return latent + IMAGE_TOKENS + TEXT_TOKENS


def decode_work_bytes(height: int, width: int, window: int, tiled: bool) -> int:
    """VAE decode of one section (2·window latent frames + 1, the most decode_range asks for)."""
    pixels = height * width
    frames = 4 * (2 * window) + 1
    working = DECODE_BYTES_PER_PIXEL * (min(pixels, VAE_TILE_PIXELS) if tiled else pixels)
    return working + frames * pixels * 3 * DECODED_BYTES_PER_VALUE


def job_footprint(components: Any, height: int, width: int, window: int) -> MemoryFootprint:
    """The footprint of a job at `height`×`width` pixels and `window` latent frames per section."""
    transformer = components.transformer
    text_layers = streamable_blocks(components.text_encoder)
    tokens = sampling_tokens(transformer.config, height, width, window)
    hidden_bytes = tokens * transformer.config.inner_dim * next(transformer.parameters()).element_size()
    return MemoryFootprint(
        text_encoder=module_bytes(components.text_encoder),
        text_encoder_layers=tuple(module_bytes(layer) for layer in text_layers),
        text_encoder_2=module_bytes(components.text_encoder_2),
        image_encoder=module_bytes(components.image_encoder),
        vae=module_bytes(components.vae),
        transformer=module_bytes(transformer),
        transformer_blocks=tuple(module_bytes(block) for block in streamable_blocks(transformer)),
        text_work=TEXT_WORK_BYTES,
        image_work=ENCODE_BYTES_PER_PIXEL * height * width,
        image_work_tiled=ENCODE_BYTES_PER_PIXEL * min(height * width, VAE_TILE_PIXELS),
        sampling_work=SAMPLING_HIDDEN_STATES * hidden_bytes,
        decode_work=decode_work_bytes(height, width, window, tiled=False),
        decode_work_tiled=decode_work_bytes(height, width, window, tiled=True),
    )
