import numpy as np
import pytest
import torch

from framepack_backend.preview import LATENT_RGB_BIAS, LATENT_RGB_FACTORS, latent_preview


def latent_for_colour(rgb: tuple[float, float, float]) -> torch.Tensor:
    """A 16-channel latent vector the preview map sends exactly to `rgb` (least-norm solution)."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float64)  # (16, 3)
    target = torch.tensor(rgb, dtype=torch.float64) - torch.tensor(LATENT_RGB_BIAS, dtype=torch.float64)
    return torch.linalg.pinv(factors.T) @ target  # (16,)


def test_public_factor_table_shape_and_spot_values():
    assert len(LATENT_RGB_FACTORS) == 16 and all(len(row) == 3 for row in LATENT_RGB_FACTORS)
    assert LATENT_RGB_FACTORS[0] == (-0.0395, -0.0331, 0.0445)
    assert LATENT_RGB_FACTORS[12] == (-0.2315, -0.1920, -0.1355)
    assert LATENT_RGB_BIAS == (0.0259, -0.0192, -0.0761)


def test_shape_dtype_and_strip_layout():
    x0 = torch.zeros(1, 16, 9, 6, 5)
    preview = latent_preview(x0)
    assert preview.shape == (6, 9 * 5, 3)
    assert preview.dtype == np.uint8


def test_latent_maps_to_a_known_colour():
    latent = latent_for_colour((0.2, 0.6, 0.8))
    x0 = latent.float().view(1, 16, 1, 1, 1).expand(1, 16, 3, 4, 4)
    preview = latent_preview(x0)
    assert (preview == np.array([51, 153, 204], dtype=np.uint8)).all()


def test_each_frame_has_its_own_columns():
    red, blue = latent_for_colour((1.0, 0.0, 0.0)), latent_for_colour((0.0, 0.0, 1.0))
    x0 = torch.stack([red, blue, red], dim=1).float().view(1, 16, 3, 1, 1).expand(1, 16, 3, 2, 4)
    preview = latent_preview(x0)
    assert (preview[:, 0:4] == [255, 0, 0]).all()
    assert (preview[:, 4:8] == [0, 0, 255]).all()
    assert (preview[:, 8:12] == [255, 0, 0]).all()


def test_zero_latent_shows_the_clamped_bias_and_large_values_clamp():
    assert (latent_preview(torch.zeros(1, 16, 1, 1, 1)) == [7, 0, 0]).all()  # 0.0259·255 = 6.6
    bright = latent_for_colour((0.5, 0.5, 0.5)).float().view(1, 16, 1, 1, 1) * 100
    assert set(np.unique(latent_preview(bright))) <= {0, 255}


def test_bf16_input_is_accepted():
    x0 = latent_for_colour((0.2, 0.6, 0.8)).view(1, 16, 1, 1, 1).to(torch.bfloat16)
    # bf16 rounds the latent to ~3 significant digits; that may move a colour by a level
    assert np.abs(latent_preview(x0).astype(int) - [51, 153, 204]).max() <= 1


@pytest.mark.parametrize("shape", [(16, 9, 6, 5), (1, 4, 9, 6, 5)])
def test_bad_shape_names_the_field(shape):
    with pytest.raises(ValueError, match="x0"):
        latent_preview(torch.zeros(shape))
