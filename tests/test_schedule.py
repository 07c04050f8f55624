import math

import pytest
import torch

from framepack_backend.presets import FLOW_PRESETS
from framepack_backend.schedule import flow_mu, schedule_for, shifted_sigmas, time_shift

# SPEC §4: the 640 resolution buckets (h, w) in pixels.
BUCKETS_640 = [
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
]


def test_flow_mu_on_the_line_through_the_two_anchor_points():
    # L = T·H·W/4: 1·32·32/4 = 256 -> 0.5; 1·64·256/4 = 4096 -> 1.15; 4·32·32/4 = 1024 -> 0.63
    assert flow_mu(1, 32, 32) == pytest.approx(0.5, abs=1e-12)
    assert flow_mu(1, 64, 256) == pytest.approx(1.15, abs=1e-12)
    assert flow_mu(4, 32, 32) == pytest.approx(0.5 + 0.65 * 768 / 3840, abs=1e-12)
    assert flow_mu(4, 32, 32) == pytest.approx(0.63, abs=1e-12)


@pytest.mark.parametrize("h,w", BUCKETS_640)
def test_cap_binds_at_every_640_bucket(h, w):
    latent_h, latent_w = h // 8, w // 8
    uncapped = 0.5 + 0.65 * (9 * latent_h * latent_w / 4 - 256) / 3840
    assert uncapped > math.log(7.0)
    assert flow_mu(9, latent_h, latent_w) == pytest.approx(math.log(7.0), abs=1e-12)


def test_time_shift_by_hand():
    mu = math.log(7.0)
    assert time_shift(0.5, mu) == pytest.approx(7 / 8, abs=1e-12)
    assert time_shift(0.25, mu) == pytest.approx(7 / 10, abs=1e-12)
    assert time_shift(0.25, mu, sigma=2.0) == pytest.approx(7 / 16, abs=1e-12)
    assert time_shift(0.0, mu) == 0.0
    assert time_shift(1.0, mu) == 1.0


def test_shifted_sigmas_values_endpoints_and_dtype():
    sigmas = shifted_sigmas(4, math.log(7.0))
    expected = torch.tensor([1.0, 21 / 22, 7 / 8, 7 / 10, 0.0], dtype=torch.float64)
    assert sigmas.shape == (5,)
    assert sigmas.dtype == torch.float64
    assert torch.allclose(sigmas, expected, atol=1e-12, rtol=0)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0


def test_shifted_sigmas_with_sigma_exponent():
    sigmas = shifted_sigmas(4, math.log(7.0), sigma=2.0)
    expected = torch.tensor([1.0, 63 / 64, 7 / 8, 7 / 16, 0.0], dtype=torch.float64)
    assert torch.allclose(sigmas, expected, atol=1e-12, rtol=0)


def test_mu_zero_sigma_one_is_the_plain_linear_schedule():
    assert torch.allclose(shifted_sigmas(25, 0.0), torch.linspace(1, 0, 26, dtype=torch.float64), atol=1e-12)


def test_standard_preset_at_640_is_shift_seven():
    sigmas = schedule_for(25, 9, 608 // 8, 640 // 8)
    t = torch.linspace(1, 0, 26, dtype=torch.float64)
    assert torch.allclose(sigmas, 7 * t / (7 * t + (1 - t)), atol=1e-12)
    # 25 steps: the last evaluated sigma is 7/(7+24)
    assert sigmas[-2].item() == pytest.approx(7 / 31, abs=1e-12)


def test_flow_preset_offset_is_applied_after_the_cap():
    standard = schedule_for(25, 9, 76, 80)
    hand = schedule_for(25, 9, 76, 80, mu_offset=-0.45, sigma=1.25)
    # mu = ln 7 - 0.45; at t = 0.5 the sigma exponent drops out: e^mu / (e^mu + 1)
    e_mu = 7 * math.exp(-0.45)
    assert hand[-2].item() == pytest.approx(e_mu / (e_mu + 24**1.25), abs=1e-12)
    half = schedule_for(2, 9, 76, 80, mu_offset=-0.45, sigma=1.25)[1].item()
    assert half == pytest.approx(e_mu / (e_mu + 1), abs=1e-12)
    assert (standard - hand).abs().max().item() > 0.05
    # The seed's order (offset before the cap) would leave the schedule unchanged here.
    uncapped = 0.5 + 0.65 * (9 * 76 * 80 / 4 - 256) / 3840
    assert min(uncapped - 0.45, math.log(7.0)) == pytest.approx(math.log(7.0))


def test_offset_sign_moves_every_interior_sigma():
    standard = schedule_for(25, 9, 76, 80)
    assert bool((schedule_for(25, 9, 76, 80, mu_offset=0.1)[1:-1] > standard[1:-1]).all())
    assert bool((schedule_for(25, 9, 76, 80, mu_offset=-0.15)[1:-1] < standard[1:-1]).all())
    action = schedule_for(25, 9, 76, 80, mu_offset=0.1, sigma=0.95)
    e_mu = 7 * math.exp(0.1)
    assert action[-2].item() == pytest.approx(e_mu / (e_mu + 24**0.95), abs=1e-12)


def test_mu_floor_and_sigma_clamp():
    floored = schedule_for(4, 9, 76, 80, mu_offset=-5.0)
    assert torch.allclose(floored, shifted_sigmas(4, 0.3), atol=1e-12)
    assert torch.allclose(schedule_for(4, 9, 76, 80, sigma=3.0), shifted_sigmas(4, math.log(7.0), 1.3), atol=1e-12)
    assert torch.allclose(schedule_for(4, 9, 76, 80, sigma=0.1), shifted_sigmas(4, math.log(7.0), 0.7), atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 25, 50])
def test_schedule_is_strictly_decreasing_from_one_to_zero(steps):
    sigmas = schedule_for(steps, 9, 76, 80, mu_offset=-0.3, sigma=1.15)
    assert sigmas.shape == (steps + 1,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("field,args", [("steps", (0, 9, 76, 80)), ("latent_frames", (25, 0, 76, 80)),
                                        ("latent_width", (25, 9, 76, 2.5))])
def test_bad_input_names_the_field(field, args):
    with pytest.raises(ValueError, match=field):
        schedule_for(*args)


@pytest.mark.parametrize("name", ["dance", "talking", "action", "subtle", "hand_detail"])
def test_every_flow_preset_changes_the_640_schedule(name):
    preset = FLOW_PRESETS[name]
    standard = schedule_for(25, 9, 76, 80)
    shaped = schedule_for(25, 9, 76, 80, mu_offset=preset.mu_offset, sigma=preset.sigma)
    e_mu = 7 * math.exp(preset.mu_offset)
    assert shaped[-2].item() == pytest.approx(e_mu / (e_mu + 24**preset.sigma), abs=1e-12)
    assert (shaped - standard).abs().max().item() > 0.01
