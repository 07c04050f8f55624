"""How many GPU bytes a job needs: component weights and per-phase working memory.

Weights are counted exactly from the loaded modules. Working memory (activations,
allocator slack) is estimated from measured peaks; each constant says where its
number comes from. `benchmarks/memory.py` reports the measured peaks to check them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..components import COMPONENT_SPECS
from ..models.transformer import CONTEXT_KERNELS
from ..planner import CONTEXT_1X, CONTEXT_2X, CONTEXT_4X, VAE_SPATIAL_STRIDE, VAE_TIME_STRIDE
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
# Clean frames per context scale (planner.py); the start latent rides with the 1x history.
CONTEXT_FRAMES = {"1x": 1 + CONTEXT_1X, "2x": CONTEXT_2X, "4x": CONTEXT_4X}
# The phases a job's LoRAs are on the device for: applied at the first transformer forward,
# removed when the job ends (lora/apply.py: job_loras).
LORA_PHASES = ("sampling", "decode")


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes on the GPU: weights per component (in their run dtype) and working memory per job phase.

    `component_bytes` is keyed by the COMPONENT_SPECS names; `block_bytes` lists the bytes
    of each streamable block of the streamed components, in forward order; `work_bytes`
    is keyed by the job phases, and `tiled_work_bytes` replaces it where the VAE works in
    tiles (stream mode).
    """

    component_bytes: Mapping[str, int]
    block_bytes: Mapping[str, tuple[int, ...]]
    work_bytes: Mapping[str, int]
    tiled_work_bytes: Mapping[str, int]
    # The job's LoRAs per memory mode (lora/footprint.py): on the device from the first
    # forward to the job's end, so beside the working memory of the phases in LORA_PHASES.
    lora_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(self.component_bytes.values())

    def work(self, phase: str, mode: str) -> int:
        """Working memory of `phase` in memory mode `mode`, the job's LoRAs included."""
        return self.work_bytes[phase] + self.loras_in(phase, mode)

    def tiled_work(self, phase: str, mode: str) -> int:
        """Working memory of `phase` where the VAE works in tiles, the job's LoRAs included."""
        return self.tiled_work_bytes.get(phase, self.work_bytes[phase]) + self.loras_in(phase, mode)

    def loras_in(self, phase: str, mode: str) -> int:
        return self.lora_bytes.get(mode, 0) if phase in LORA_PHASES else 0


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
    lh, lw = height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE
    noisy = window * (lh // p) * (lw // p)
    return noisy + sum(context_tokens(scale, lh, lw) for scale in CONTEXT_FRAMES) + IMAGE_TOKENS + TEXT_TOKENS


def context_tokens(scale: str, latent_height: int, latent_width: int) -> int:
    """Tokens of one context scale: its clean frames through that scale's patch kernel.

    The 1x patch drops an odd last row or column, as the noisy latents' patch does; the
    2x and 4x ones pad to a multiple of their kernel first (transformer.ContextPatchEmbed).
    """
    kt, kh, kw = CONTEXT_KERNELS[scale]
    frames = CONTEXT_FRAMES[scale]
    if scale == "1x":
        return frames // kt * (latent_height // kh) * (latent_width // kw)
    return math.ceil(frames / kt) * math.ceil(latent_height / kh) * math.ceil(latent_width / kw)


def decode_work_bytes(height: int, width: int, window: int, tiled: bool, latent_frames: int | None = None) -> int:
    """VAE decode of one section: `latent_frames` latents (default 2·window + 1, the most
    decode_range asks for) → their frames at `height`×`width`, whole or in spatial tiles."""
    pixels = height * width
    latents = 2 * window + 1 if latent_frames is None else latent_frames
    frames = VAE_TIME_STRIDE * (latents - 1) + 1
    working = DECODE_BYTES_PER_PIXEL * (min(pixels, VAE_TILE_PIXELS) if tiled else pixels)
    return working + frames * pixels * 3 * DECODED_BYTES_PER_VALUE


def job_footprint(components: Any, height: int, width: int, window: int,
                  lora_bytes: Mapping[str, int] | None = None) -> MemoryFootprint:
    """The footprint of a job at `height`×`width` pixels and `window` latent frames per
    section, with LoRAs holding `lora_bytes` per memory mode."""
    modules = {spec.name: getattr(components, spec.name) for spec in COMPONENT_SPECS}
    transformer = components.transformer
    tokens = sampling_tokens(transformer.config, height, width, window)
    hidden_bytes = tokens * transformer.config.inner_dim * next(transformer.parameters()).element_size()
    return MemoryFootprint(
        component_bytes={name: module_bytes(module) for name, module in modules.items()},
        block_bytes={
            spec.name: tuple(module_bytes(block) for block in streamable_blocks(modules[spec.name]))
            for spec in COMPONENT_SPECS
            if spec.streamed
        },
        work_bytes={
            "text": TEXT_WORK_BYTES,
            "image": ENCODE_BYTES_PER_PIXEL * height * width,
            "sampling": SAMPLING_HIDDEN_STATES * hidden_bytes,
            "decode": decode_work_bytes(height, width, window, tiled=False),
        },
        tiled_work_bytes={
            "image": ENCODE_BYTES_PER_PIXEL * min(height * width, VAE_TILE_PIXELS),
            "decode": decode_work_bytes(height, width, window, tiled=True),
        },
        lora_bytes=dict(lora_bytes or {}),
    )
