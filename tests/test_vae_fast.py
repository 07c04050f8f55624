"""The fast VAE decode (framepack_backend/vae_fast.py) against diffusers' own, and its GroupNorm+SiLU kernel.

On the CPU the accelerated decoder runs the same torch ops as diffusers' but for the
mid-block attention (per frame instead of masked: another summation order), so fp32
decodes agree within 1e-5 (6e-6 measured on the tiny VAE); with the Triton kernel
(interpreted here, compiled on a GPU) the norms' float32 summation order differs too.
GPU tests compare fp16 decodes of the full configuration against an fp32 decode: the
accelerated decode's error must stay within the stock fp16 decode's own (fp16 noise).
"""

from __future__ import annotations

# First: the kernels are imported interpreted (no GPU) only if Triton was not imported
# compiled before, and diffusers imports it.
from test_kernels import INTERPRETED, assert_close, kernels  # isort: skip

import copy  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKLHunyuanVideo  # noqa: E402

from framepack_backend import conditioning, vae_fast  # noqa: E402
from framepack_backend.errors import GenerationCancelled  # noqa: E402
from framepack_backend.settings import EngineOptions  # noqa: E402
from framepack_backend.testing.tiny_bundle import TINY_VAE  # noqa: E402
from framepack_backend.vae_fast import accelerate_vae, configure_vae, is_accelerated, replicate_borders  # noqa: E402

FP32_TOLERANCE = 1e-5


def tiny_vae(seed: int = 0) -> AutoencoderKLHunyuanVideo:
    """The tiny bundle's VAE with random norm affines too (diffusers initialises them to 1 and 0)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(**TINY_VAE).eval()
    for module in vae.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.data.normal_(1.0, 0.3)
            module.bias.data.normal_(0.0, 0.3)
    return vae


def latents(frames: int, height: int, width: int, seed: int = 1, **kwargs) -> torch.Tensor:
    return torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(seed)).to(**kwargs)


def stock_and_fast(vae, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        accelerate_vae(vae, False)
        stock = vae.decode(z).sample
        accelerate_vae(vae)
        fast = vae.decode(z).sample
    return stock, fast


@pytest.mark.parametrize("padding", [(1, 1, 1, 1, 2, 0), (0, 0, 0, 0, 0, 0), (2, 0, 0, 3, 1, 2)])
def test_replicate_borders_equal_f_pad(padding):
    x = torch.randn(2, 3, 4, 5, 6)
    w_left, w_right, h_top, h_bottom, t_front, t_back = padding
    buffer = torch.full((2, 3, 4 + t_front + t_back, 5 + h_top + h_bottom, 6 + w_left + w_right), float("nan"))
    buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
    buffer[:, :, t_front : t_front + 4, h_top : h_top + 5, w_left : w_left + 6] = x
    assert torch.equal(replicate_borders(buffer, padding), F.pad(x, padding, mode="replicate"))


@pytest.mark.parametrize("frames", [10, 5, 2, 1])  # a section's 10 (four overlapping tiles), shorter tails
def test_fast_decode_equals_stock_fp32(frames):
    vae = tiny_vae()
    stock, fast = stock_and_fast(vae, latents(frames, 12, 14))
    assert fast.shape == stock.shape == (1, 3, 4 * (frames - 1) + 1, 96, 112)
    assert fast.is_contiguous()
    assert (fast - stock).abs().max().item() <= FP32_TOLERANCE


def test_fast_decode_equals_stock_with_spatial_tiles():
    vae = tiny_vae()
    vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64,
                      tile_sample_stride_height=48, tile_sample_stride_width=48)
    stock, fast = stock_and_fast(vae, latents(6, 14, 18))
    assert fast.shape == (1, 3, 21, 112, 144)
    assert (fast - stock).abs().max().item() <= FP32_TOLERANCE


@pytest.mark.parametrize("frames", [1, 4])
def test_frame_causal_attention_equals_the_masked_attention(frames):
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

    attn = tiny_vae().decoder.mid_block.attentions[0].double()
    x = torch.randn(2, 16, frames, 3, 5, dtype=torch.float64)
    flat = x.permute(0, 2, 3, 4, 1).flatten(1, 3)
    mask = prepare_causal_attention_mask(frames, 15, flat.dtype, flat.device, batch_size=2)
    with torch.no_grad():
        expected = attn(flat, attention_mask=mask).unflatten(1, (frames, 3, 5)).permute(0, 4, 1, 2, 3)
        actual = vae_fast.frame_causal_attention(attn, x)
    assert actual.shape == x.shape
    assert (actual - expected).abs().max().item() < 1e-12


def test_accelerate_keeps_the_module_and_reverts():
    vae = tiny_vae()
    parameters = dict(vae.named_parameters())
    keys = list(vae.state_dict())
    accelerate_vae(accelerate_vae(vae))  # idempotent
    assert is_accelerated(vae)
    assert type(vae.decoder.up_blocks[0].resnets[0]) is vae_fast.FastResnetBlock
    assert type(vae.encoder.down_blocks[0].resnets[0]).__name__ == "HunyuanVideoResnetBlockCausal3D"
    assert list(vae.state_dict()) == keys
    assert all(p is parameters[name] for name, p in vae.named_parameters())
    accelerate_vae(vae, False)
    assert not is_accelerated(vae)
    assert not any(type(m).__module__ == vae_fast.__name__ for m in vae.modules())


def test_training_mode_runs_diffusers_forward():
    vae = tiny_vae()
    z = latents(2, 6, 5)
    stock = vae.decode(z).sample
    accelerate_vae(vae).train()
    fast = vae.decode(z).sample
    assert fast.requires_grad and torch.equal(fast, stock)


def test_unsupported_configuration_is_refused():
    vae = tiny_vae()
    vae.decoder.conv_out.pad_mode = "constant"
    with pytest.raises(ValueError, match="decoder.conv_out|conv_out pads with 'constant'"):
        accelerate_vae(vae)
    assert not is_accelerated(vae)


def test_cancel_is_still_polled_before_each_decoder_call():
    vae = accelerate_vae(tiny_vae())
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(GenerationCancelled):
        conditioning.decode_latents(vae, latents(10, 6, 5), cancel=cancel)
    assert len(calls) == 3  # the third of the four temporal tiles


def test_configure_default_is_on_for_cuda_only_and_explicit_on_runs_anywhere():
    vae = tiny_vae()
    applied = configure_vae(vae, torch.device("cpu"), EngineOptions())
    assert applied.fast_vae_decode is False and not is_accelerated(vae)
    # The default on CUDA, decided by the device alone (the swap itself moves nothing).
    applied = configure_vae(vae, torch.device("cuda"), EngineOptions())
    assert applied.fast_vae_decode is True and is_accelerated(vae)
    applied = configure_vae(vae, torch.device("cuda"), EngineOptions(fast_vae_decode=False))
    assert applied.fast_vae_decode is False and not is_accelerated(vae)


def test_without_triton_the_default_is_the_stock_decode(monkeypatch):
    # The fused GroupNorm is a Triton kernel: a CUDA machine without Triton keeps diffusers' decode.
    from framepack_backend import settings

    real_find_spec = settings.importlib.util.find_spec
    monkeypatch.setattr(settings.importlib.util, "find_spec",
                        lambda name, *args: None if name == "triton" else real_find_spec(name, *args))
    vae = tiny_vae()
    applied = configure_vae(vae, torch.device("cuda"), EngineOptions())
    assert applied.fast_vae_decode is False and not is_accelerated(vae)
    applied = configure_vae(vae, torch.device("cpu"), EngineOptions(fast_vae_decode=True))
    assert applied.fast_vae_decode is True and is_accelerated(vae)


def test_pipeline_option_makes_the_same_video(tiny_bundle, image):
    from framepack_backend.pipeline import Pipeline
    from framepack_backend.request import GenerationRequest

    # Two sections: the second decode re-decodes the first's latents for the cross-fade.
    settings = {"resolution": 128, "steps": 2, "seconds": 2, "teacache": False, "preview": False}
    videos = []
    for fast in (False, True):
        pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu", options=EngineOptions(fast_vae_decode=fast))
        assert pipeline.options.fast_vae_decode is fast and is_accelerated(pipeline.components.vae) is fast
        result = list(pipeline.generate(GenerationRequest.parse(image, "a robot waves", **settings)))[-1]
        assert result.settings["fast_vae_decode"] is fast
        videos.append(result.frames.astype(int))
    assert videos[0].shape == videos[1].shape and videos[0].shape[0] > 37
    assert abs(videos[0] - videos[1]).max() <= 1  # the attention's fp32 summation order may round a pixel


# --- the GroupNorm + SiLU kernel ------------------------------------------------------------


class GroupNormSiluComparisons:
    device: str

    def channels_last(self, *shape: int, dtype=torch.float32, seed: int = 0, mean: float = 0.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2 + mean
        return x.to(self.device, dtype).contiguous(memory_format=torch.channels_last_3d)

    def affine(self, channels: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(9)
        return (torch.randn(channels, generator=g).to(self.device, dtype),
                torch.randn(channels, generator=g).to(self.device, dtype))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("shape, groups", [((1, 16, 3, 5, 7), 4), ((2, 64, 2, 9, 11), 32), ((1, 24, 1, 3, 3), 8)])
    @pytest.mark.parametrize("silu", [True, False])
    def test_matches_reference(self, shape, groups, dtype, silu):
        x = self.channels_last(*shape, dtype=dtype)
        weight, bias = self.affine(shape[1], dtype)
        out = kernels.group_norm_silu(x, weight, bias, groups, 1e-6, silu=silu)
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        assert_close(out, kernels.group_norm_silu_reference(x, weight, bias, groups, 1e-6, silu=silu), dtype)

    def test_large_mean_many_programs_and_partial_tiles(self, monkeypatch):
        # Small tiles and few programs per sample: every program merges several tiles, the
        # last tile of each is partial, and the partials are merged again in torch.
        module = sys.modules["framepack_kernels.group_norm_silu"]  # the package's name is the function
        monkeypatch.setattr(module, "TILE_ELEMENTS", 64)
        monkeypatch.setattr(module, "STATS_PROGRAMS", 3)
        x = self.channels_last(2, 32, 3, 7, 5, mean=300.0)  # variance 4 under a mean of 300
        weight, bias = self.affine(32, torch.float32)
        out = kernels.group_norm_silu(x, weight, bias, 8, 1e-6)
        exact = F.silu(F.group_norm(x.double().cpu().contiguous(), 8, weight.double().cpu(), bias.double().cpu(), 1e-6))
        torch_fp32 = F.silu(F.group_norm(x.cpu().contiguous(), 8, weight.cpu(), bias.cpu(), 1e-6))
        # At mean/std 150 float32 itself is off by ~2e-5: as accurate as torch's own GroupNorm.
        torch_error = (torch_fp32.double() - exact).abs().max().item()
        assert (out.double().cpu() - exact).abs().max().item() <= 1.5 * torch_error + 1e-6

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_writes_the_interior_of_a_padded_buffer_only(self, dtype):
        x = self.channels_last(1, 16, 3, 5, 7, dtype=dtype)
        weight, bias = self.affine(16, dtype)
        buffer = torch.full((1, 16, 5, 7, 9), float("nan"), dtype=dtype, device=self.device)
        buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
        interior = buffer[:, :, 2:, 1:-1, 1:-1]
        assert kernels.group_norm_silu(x, weight, bias, 4, 1e-6, out=interior) is interior
        assert_close(interior, kernels.group_norm_silu_reference(x, weight, bias, 4, 1e-6), dtype)
        border = torch.ones_like(buffer, dtype=torch.bool)
        border[:, :, 2:, 1:-1, 1:-1] = False
        assert buffer[border].isnan().all()

    def test_bad_arguments_name_the_field(self):
        x = self.channels_last(1, 16, 2, 3, 3)
        weight, bias = self.affine(16, torch.float32)
        with pytest.raises(ValueError, match="x must be channels_last_3d"):
            kernels.group_norm_silu(x.contiguous(), weight, bias, 4, 1e-6)
        with pytest.raises(ValueError, match="groups=5 must divide the 16 channels"):
            kernels.group_norm_silu(x, weight, bias, 5, 1e-6)
        with pytest.raises(ValueError, match="weight has shape"):
            kernels.group_norm_silu(x, weight[:8], bias, 4, 1e-6)
        with pytest.raises(ValueError, match="unit stride over channels"):
            ncdhw = torch.empty_like(x, memory_format=torch.contiguous_format)
            kernels.group_norm_silu(x, weight, bias, 4, 1e-6, out=ncdhw)


@pytest.mark.skipif(not INTERPRETED, reason="kernels were imported compiled (CUDA present); the CUDA class covers them")
class TestGroupNormSiluInterpreted(GroupNormSiluComparisons):
    device = "cpu"

    def test_fast_decode_on_the_kernel_equals_stock_fp32(self, monkeypatch):
        # The accelerated decoder with every norm on the (interpreted) kernel.
        def norm_on_kernel(norm, x, out, silu=True):
            x = x.contiguous(memory_format=torch.channels_last_3d)  # the CPU's convs return NCDHW
            kernels.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=silu, out=out)

        monkeypatch.setattr(vae_fast, "group_norm_silu_into", norm_on_kernel)
        vae = tiny_vae()
        stock, fast = stock_and_fast(vae, latents(2, 4, 5))
        assert fast.shape == (1, 3, 5, 32, 40)
        scale = stock.abs().max().item()
        assert (fast - stock).abs().max().item() <= FP32_TOLERANCE * max(1.0, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestGroupNormSiluCuda(GroupNormSiluComparisons):
    device = "cuda"

    @pytest.mark.parametrize("channels", [128, 256, 512])
    def test_full_size_shapes(self, channels):
        x = self.channels_last(1, channels, 9, 136, 176, dtype=torch.float16, mean=1.0)
        weight, bias = self.affine(channels, torch.float16)
        out = kernels.group_norm_silu(x, weight, bias, 32, 1e-6)
        assert_close(out, kernels.group_norm_silu_reference(x, weight, bias, 32, 1e-6), torch.float16)


# --- the full configuration on a GPU ---------------------------------------------------------


@pytest.fixture(scope="module")
def full_vae_fp32():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLHunyuanVideo().eval()
    return vae


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frames", [10, 2])  # one section at 544×704, and a short tail
def test_full_vae_fp16_fast_decode_within_fp16_noise(full_vae_fp32, frames):
    z = latents(frames, 68, 88, device="cuda")
    # fp32 stock without TF32 convolutions: the values fp16 approximates.
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        accelerate_vae(full_vae_fp32, False)
        reference = full_vae_fp32.decode(z).sample
    vae = copy.deepcopy(full_vae_fp32).half()
    videos, peaks = {}, {}
    with torch.inference_mode():
        for accelerated in (False, True):
            accelerate_vae(vae, accelerated)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            videos[accelerated] = vae.decode(z.half()).sample
            peaks[accelerated] = torch.cuda.max_memory_allocated()
    stock, fast = videos[False], videos[True]
    assert fast.shape == stock.shape == (1, 3, 4 * (frames - 1) + 1, 544, 704)
    # The memory planner's decode estimate (memory/footprint.py) was measured on diffusers' decode.
    assert peaks[True] <= 1.05 * peaks[False]
    stock_error = (stock.float() - reference).abs()
    fast_error = (fast.float() - reference).abs()
    # The fast decode approximates the fp32 decode as well as diffusers' fp16 decode does.
    assert fast_error.max().item() <= 1.5 * stock_error.max().item() + 1e-3
    assert fast_error.mean().item() <= 1.2 * stock_error.mean().item() + 1e-5
    assert (fast.float() - stock.float()).abs().max().item() <= 2 * stock_error.max().item() + 1e-3
