"""Cheap per-step preview: latent -> RGB by a fixed linear map, no VAE (SPEC §6).

The 16x3 factors and the bias are the public HunyuanVideo latent-to-RGB preview
values, as published in ComfyUI (`comfy/latent_formats.py`, class HunyuanVideo) and
used by FramePack (`diffusers_helper/hunyuan.py`, `vae_decode_fake`). They apply to
latents in sampler space (already multiplied by the VAE scaling factor).
"""

import numpy as np
import torch

LATENT_CHANNELS = 16

# Row c: the (R, G, B) contribution of latent channel c.
LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445),
    (0.0696, 0.0795, 0.0518),
    (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224),
    (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669),
    (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375),
    (0.1166, 0.1627, 0.0962),
    (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355),
    (-0.0270, 0.0401, -0.0821),
    (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)
LATENT_RGB_BIAS = (0.0259, -0.0192, -0.0761)


def latent_rgb(x0: torch.Tensor) -> torch.Tensor:
    """(B, 16, T, h, w) latents -> (B, T, h, w, 3) RGB in [0, 1], fp32, on x0's device."""
    if x0.ndim != 5 or x0.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"x0 must be (B, {LATENT_CHANNELS}, T, h, w) latents, got shape {tuple(x0.shape)}")
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=x0.device)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=x0.device)
    return (torch.einsum("bcthw,cr->bthwr", x0.float(), factors) + bias).clamp(0.0, 1.0)


def latent_preview(x0: torch.Tensor) -> np.ndarray:
    """Preview image of an x0 estimate: uint8 (B·h, T·w, 3).

    Layout: every latent frame of the section side by side, left to right in time
    (one row per batch item), at latent resolution — 80 x 684 for a 640-bucket
    window of 9. Showing all frames makes motion visible in a single small image.
    """
    rgb = latent_rgb(x0)
    b, t, h, w, _ = rgb.shape
    strip = rgb.permute(0, 2, 1, 3, 4).reshape(b * h, t * w, 3)
    return (strip * 255.0).round().to(torch.uint8).cpu().numpy()
