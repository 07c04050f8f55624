"""Shifted sigma schedule for flow-matching sampling (SPEC §6, §8).

Sigmas run from 1 (pure noise) to 0 (data). A uniform grid t is warped by the
Flux/HunyuanVideo time shift ``e^mu / (e^mu + (1/t - 1)^sigma)``: a larger mu keeps
sigma high for longer, spending more steps on the noisy, layout-defining part.
mu grows linearly with the number of latent tokens and is capped at ln 7.
"""

import math
from typing import overload

import torch

from .presets import FLOW_MU_MIN, FLOW_SIGMA_RANGE

# mu = k·L + b through these two (tokens, mu) points; L counts 2x2 latent patches.
_BASE_TOKENS, _BASE_MU = 256, 0.5
_MAX_TOKENS, _MAX_MU = 4096, 1.15
# The reference caps the shift factor e^mu at 7; at FramePack's 640 buckets the
# linear rule gives mu ≈ 2.7, so this cap is what actually sets the schedule there.
MU_CAP = math.log(7.0)


def _require_positive_int(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def flow_mu(latent_frames: int, latent_height: int, latent_width: int) -> float:
    """mu for a noisy latent of shape (T, H, W), before any flow preset; capped at ln 7."""
    _require_positive_int("latent_frames", latent_frames)
    _require_positive_int("latent_height", latent_height)
    _require_positive_int("latent_width", latent_width)
    tokens = latent_frames * latent_height * latent_width / 4  # patch (1, 2, 2)
    slope = (_MAX_MU - _BASE_MU) / (_MAX_TOKENS - _BASE_TOKENS)
    mu = _BASE_MU + slope * (tokens - _BASE_TOKENS)
    return min(mu, MU_CAP)


@overload
def time_shift(t: float, mu: float, sigma: float = 1.0) -> float: ...
@overload
def time_shift(t: torch.Tensor, mu: float, sigma: float = 1.0) -> torch.Tensor: ...
def time_shift(t: float | torch.Tensor, mu: float, sigma: float = 1.0) -> float | torch.Tensor:
    """Warp t in [0, 1] to a noise level; fixes 0 and 1 for every mu and sigma."""
    if isinstance(t, torch.Tensor):
        # 1/0 = inf makes the shifted value exactly 0 at t = 0, as it should be.
        return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)


def shifted_sigmas(steps: int, mu: float, sigma: float = 1.0) -> torch.Tensor:
    """(steps + 1,) float64 sigmas from exactly 1 down to exactly 0."""
    _require_positive_int("steps", steps)
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return time_shift(t, mu, sigma)


def schedule_for(
    steps: int,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    mu_offset: float = 0.0,
    sigma: float = 1.0,
) -> torch.Tensor:
    """The sampling schedule for one section, with a flow preset (mu_offset, sigma).

    The offset is added *after* the ln 7 cap. The seed fork added it before, so at
    normal resolutions (where the cap binds) presets silently did nothing; applied
    after, a preset really moves the schedule. mu is floored at 0.3 and sigma clamped
    to [0.7, 1.3] so no preset can produce a degenerate schedule.
    """
    mu = max(flow_mu(latent_frames, latent_height, latent_width) + mu_offset, FLOW_MU_MIN)
    sigma = min(max(sigma, FLOW_SIGMA_RANGE[0]), FLOW_SIGMA_RANGE[1])
    return shifted_sigmas(steps, mu, sigma)
