"""Our FramePackTransformer against diffusers' HunyuanVideoFramepackTransformer3DModel (fp32, CPU)."""

import dataclasses
import inspect

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from framepack_backend.attention import Attend
from framepack_backend.models.transformer import FramePackTransformer, TransformerConfig

TOLERANCE = 1e-4
TEXT_DIM, POOLED_DIM, IMAGE_DIM, CHANNELS = 24, 12, 20, 4

TINY = dict(
    in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=16,
    num_layers=2, num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
    rope_theta=256.0, rope_axes_dim=(4, 6, 6), image_condition_type=None, has_image_proj=True,
    image_proj_dim=IMAGE_DIM, has_clean_x_embedder=True,
)


def build_pair(config: dict, seed: int = 0) -> tuple[HunyuanVideoFramepackTransformer3DModel, FramePackTransformer]:
    torch.manual_seed(seed)
    reference = HunyuanVideoFramepackTransformer3DModel(**config).eval()
    with torch.no_grad():
        # Perturb every weight (norm scales too) so no parameter sits at a neutral value.
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = FramePackTransformer(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def section_inputs(
    batch: int, frames: int, height: int, width: int, padding: int, text_lengths: list[int], text_len: int, seed: int
) -> dict:
    """One inverted-sampling section: indices [1 | padding | frames | 1 | 2 | 16] (SPEC §5)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    indices = torch.arange(1 + padding + frames + 1 + 2 + 16)
    start, _, noisy, clean_1x, history_2x, history_4x = indices.split([1, padding, frames, 1, 2, 16])
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for row, length in enumerate(text_lengths):
        mask[row, :length] = 1
    return dict(
        hidden_states=rand(batch, CHANNELS, frames, height, width),
        timestep=torch.linspace(900.0, 300.0, batch),
        encoder_hidden_states=rand(batch, text_len, TEXT_DIM),
        encoder_attention_mask=mask,
        pooled_projections=rand(batch, POOLED_DIM),
        image_embeds=rand(batch, 5, IMAGE_DIM),
        indices_latents=noisy,
        guidance=torch.full((batch,), 10000.0),
        latents_clean=rand(batch, CHANNELS, 2, height, width),
        indices_latents_clean=torch.cat([start, clean_1x]),
        latents_history_2x=rand(batch, CHANNELS, 2, height, width),
        indices_latents_history_2x=history_2x,
        latents_history_4x=rand(batch, CHANNELS, 16, height, width),
        indices_latents_history_4x=history_4x,
    )


CASES = {
    # name: (config overrides, batch, frames, height, width, padding, text lengths, padded text length)
    "tiny": ({}, 1, 2, 4, 4, 0, [6], 9),
    "odd_non_square": (
        dict(num_attention_heads=3, attention_head_dim=8, rope_axes_dim=(2, 2, 4)), 2, 3, 6, 10, 1, [4, 7], 7
    ),
    "multi_section_masked": ({}, 2, 5, 10, 14, 3, [3, 8], 8),
    "multi_section_batch1": ({}, 1, 5, 10, 14, 2, [5], 11),
}


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_diffusers(name):
    overrides, batch, frames, height, width, padding, lengths, text_len = CASES[name]
    reference, ours = build_pair({**TINY, **overrides})
    inputs = section_inputs(batch, frames, height, width, padding, lengths, text_len, seed=len(name))

    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        got = ours(**inputs)

    assert got.shape == expected.shape == (batch, CHANNELS, frames, height, width)
    assert (got - expected).abs().max() <= TOLERANCE


def test_mask_none_with_cropped_text_matches_diffusers_with_padded_text():
    """The engine's path: batch 1, text cropped to its real length, no mask at all."""
    reference, ours = build_pair(TINY, seed=1)
    inputs = section_inputs(1, 5, 6, 10, 2, [6], 12, seed=7)
    cropped = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :6], encoder_attention_mask=None)

    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        got = ours(**cropped)

    assert (got - expected).abs().max() <= TOLERANCE


def test_batched_rows_equal_their_single_runs():
    """A masked batch of 2 gives each row what it gets alone with its text cropped."""
    _, ours = build_pair(TINY, seed=2)
    inputs = section_inputs(2, 3, 6, 10, 1, [3, 8], 8, seed=11)
    with torch.no_grad():
        batched = ours(**inputs)
        for row, length in enumerate([3, 8]):
            single = {k: v if k.startswith("indices") else v[row : row + 1] for k, v in inputs.items()}
            single["encoder_hidden_states"] = single["encoder_hidden_states"][:, :length]
            single["encoder_attention_mask"] = None
            assert (ours(**single) - batched[row : row + 1]).abs().max() <= TOLERANCE


def test_state_dict_keys_and_shapes_are_diffusers():
    reference = HunyuanVideoFramepackTransformer3DModel(**TINY)
    ours = FramePackTransformer(**TINY)
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert len(mine) > 100


class RecordingTeaCache:
    """Computes the first call, then reuses the residual it remembered."""

    def __init__(self):
        self.signals, self.residual, self.calls = [], None, []

    def should_compute(self, modulated):
        self.signals.append(modulated.clone())
        return self.residual is None

    def apply_cached(self, hidden_states):
        self.calls.append("cached")
        return hidden_states + self.residual

    def remember(self, before, after):
        self.calls.append("remember")
        self.residual = after - before


def test_teacache_signal_compute_and_skip():
    reference, ours = build_pair(TINY, seed=3)
    inputs = section_inputs(1, 3, 6, 10, 1, [6], 6, seed=5)
    inputs["encoder_attention_mask"] = None  # diffusers needs a mask; ours runs without
    reference_inputs = section_inputs(1, 3, 6, 10, 1, [6], 6, seed=5)

    captured = []
    reference.transformer_blocks[0].norm1.register_forward_hook(lambda m, args, out: captured.append(out[0]))
    cache = RecordingTeaCache()
    with torch.no_grad():
        expected = reference(**reference_inputs, return_dict=False)[0]
        computed = ours(**inputs, teacache=cache)
        # Second call: the cache says skip; all blocks are replaced by the remembered residual,
        # which for identical inputs must give the same output without running a block.
        ours.transformer_blocks[0].attn.register_forward_pre_hook(lambda *a: pytest.fail("a block ran"))
        ours.single_transformer_blocks[0].register_forward_pre_hook(lambda *a: pytest.fail("a block ran"))
        skipped = ours(**inputs, teacache=cache)

    assert cache.calls == ["remember", "cached"]
    # Latent 6x10 -> 3x5 token grid. 4x: 16x6x10 padded to 16x8x16 -> 4x1x2 = 8 tokens;
    # 2x: 2x6x10 padded to 2x8x12 -> 1x2x3 = 6; 1x clean: 2 frames x 15 = 30; noisy: 3 x 15 = 45.
    assert cache.signals[0].shape == captured[0].shape == (1, 8 + 6 + 30 + 45, 32)
    assert (cache.signals[0] - captured[0]).abs().max() <= TOLERANCE
    assert (computed - expected).abs().max() <= TOLERANCE
    assert (skipped - computed).abs().max() <= TOLERANCE


def test_return_dict_and_attention_backend():
    _, ours = build_pair(TINY, seed=4)
    inputs = section_inputs(1, 2, 4, 4, 0, [4], 4, seed=1)
    with torch.no_grad():
        plain = ours(**inputs)
        wrapped = ours(**inputs, return_dict=True)
    assert isinstance(plain, torch.Tensor)
    assert torch.equal(wrapped.sample, plain)
    with pytest.raises(ValueError, match="'flash-v9' is unknown; available: sdpa"):
        Attend.named("flash-v9")
    # The choice is an argument of the forward, not model state; the default on a CPU is sdpa.
    assert not hasattr(ours, "attention_backend") and not hasattr(ours, "set_attention_backend")
    with torch.no_grad():
        assert torch.equal(ours(**inputs, attend=Attend.named("sdpa")), plain)


def test_from_config_ignores_private_keys_and_rejects_unknown_ones():
    model = FramePackTransformer.from_config({"_class_name": "HunyuanVideoTransformer3DModelPacked",
                                              "_diffusers_version": "0.33.0.dev0", **TINY})
    assert model.config == TransformerConfig(**TINY)
    with pytest.raises(ValueError, match=r"unknown transformer config keys \['num_blocks'\]"):
        FramePackTransformer.from_config({**TINY, "num_blocks": 3})
    with pytest.raises(ValueError, match=r"rope_axes_dim=\[4, 6, 8\] is not allowed"):
        FramePackTransformer.from_config({**TINY, "rope_axes_dim": [4, 6, 8]})


def test_input_errors_name_the_field():
    _, ours = build_pair(TINY, seed=5)
    inputs = section_inputs(1, 2, 4, 4, 0, [4], 4, seed=2)
    with torch.no_grad():
        expected = r"indices_latents must hold one frame index per latent frame, shape \(2,\)"
        with pytest.raises(ValueError, match=expected):
            ours(**dict(inputs, indices_latents=torch.arange(3)))
        with pytest.raises(ValueError, match="latents_history_2x needs its frame indices"):
            ours(**dict(inputs, indices_latents_history_2x=None))
        with pytest.raises(ValueError, match="guidance is required"):
            ours(**dict(inputs, guidance=None))


@pytest.mark.gpu
def test_bf16_on_gpu_is_as_close_to_fp32_as_diffusers():
    """Full head size (128, RoPE 16/56/56), realistic token counts; bf16 error judged against diffusers' own."""
    config = {**TINY, "num_attention_heads": 4, "attention_head_dim": 128, "rope_axes_dim": (16, 56, 56),
              "mlp_ratio": 4.0, "text_embed_dim": 256, "image_proj_dim": 64}
    torch.backends.cudnn.allow_tf32 = False
    reference, ours = build_pair(config, seed=6)
    reference, ours = reference.cuda(), ours.cuda()
    inputs = section_inputs(1, 9, 32, 48, 2, [20], 20, seed=3)
    inputs = dict(inputs, encoder_hidden_states=torch.randn(1, 20, 256), image_embeds=torch.randn(1, 16, 64))
    inputs = {k: v.cuda() for k, v in inputs.items()}

    def bf16(x):
        return x.bfloat16() if x.is_floating_point() and x.ndim > 1 else x

    with torch.no_grad():
        exact = reference(**inputs, return_dict=False)[0]
        assert (ours(**inputs) - exact).abs().max() <= 1e-3
        their_bf16 = reference.bfloat16()(**{k: bf16(v) for k, v in inputs.items()}, return_dict=False)[0]
        our_bf16 = ours.bfloat16()(**{k: bf16(v) for k, v in inputs.items()})

    their_error = (their_bf16.float() - exact).abs().mean()
    our_error = (our_bf16.float() - exact).abs().mean()
    assert our_error <= 1.25 * their_error


@dataclasses.dataclass(frozen=True)
class RecordingAttend(Attend):
    """Attend that records each call: ("local", tokens) or ("joint", tokens, latent tokens)."""

    calls: list = dataclasses.field(default_factory=list)

    def local(self, q, k, v, key_mask=None):
        self.calls.append(("local", q.shape[1]))
        return super().local(q, k, v, key_mask)

    def joint(self, q, k, v, n_latent, key_mask=None):
        self.calls.append(("joint", q.shape[1], n_latent))
        return Attend.local(self, q, k, v, key_mask)


def test_every_block_attention_goes_through_the_joint_seam_and_the_refiner_stays_local():
    _, ours = build_pair(TINY, seed=4)
    inputs = section_inputs(1, 2, 4, 4, 0, [6], 9, seed=1)
    attend = RecordingAttend(Attend.named("sdpa").backend)
    with torch.no_grad():
        assert torch.equal(ours(**inputs, attend=attend), ours(**inputs))
    # Latents: 8 noisy (2x2x2) + 8 clean 1x + 1 at 2x + 4 at 4x = 21 tokens; context: 5 image
    # tokens + 6 text tokens (cropped from 9).
    assert attend.calls == [("local", 6)] * 2 + [("joint", 32, 21)] * (2 + 2)


def test_no_model_function_takes_a_backend_name():
    """The bound Attend travels instead: through the forward, the refiner, both kinds of block,
    both attentions, both fused forwards and the block stack (a parallel plan's seam)."""
    from framepack_backend.models import fp8, fused, loading, transformer

    def functions(module):
        yield from ((f"{module.__name__}.{name}", f) for name, f in inspect.getmembers(module, inspect.isfunction))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                yield from ((f"{cls.__name__}.{name}", f) for name, f in vars(cls).items() if inspect.isfunction(f))

    signatures = {name: inspect.signature(f).parameters for m in (transformer, fused, fp8, loading)
                  for name, f in functions(m)}
    assert [name for name, params in signatures.items() if "backend" in params] == []
    # 14: run_block_stack (what a sequence-parallel runner wraps) and blocks_forward (what a CUDA graph captures) too.
    assert len([name for name, params in signatures.items() if "attend" in params]) == 14


def test_fp32_output_projects_the_final_norm_in_fp32_as_the_framepack_demo():
    """bf16 model: norm_out runs in bf16 as before; its output is cast to fp32 and projected by an
    fp32 proj_out, instead of rounding the projection to bf16."""
    _, ours = build_pair(TINY, seed=8)
    ours = ours.bfloat16()
    inputs = {k: v.bfloat16() if v.is_floating_point() and v.ndim > 1 else v
              for k, v in section_inputs(1, 3, 6, 10, 1, [6], 6, seed=9).items()}
    weight, bias = ours.proj_out.weight.detach().clone(), ours.proj_out.bias.detach().clone()
    normed = []
    ours.norm_out.register_forward_hook(lambda module, args, out: normed.append(out))
    with torch.no_grad():
        all_bf16 = ours(**inputs)
        ours.set_fp32_output(True)
        fp32_output = ours(**inputs)
        ours.set_fp32_output(False)
        back_off = ours(**inputs)
    grid = (3, 3, 5)
    by_hand_fp32 = ours.unpatchify(torch.nn.functional.linear(normed[1].float(), weight.float(), bias.float()), grid)
    by_hand_bf16 = ours.unpatchify(torch.nn.functional.linear(normed[0], weight, bias), grid)

    assert normed[0].dtype == normed[1].dtype == torch.bfloat16 and torch.equal(normed[0], normed[1])
    assert fp32_output.dtype == torch.float32 and all_bf16.dtype == torch.bfloat16
    assert torch.equal(fp32_output, by_hand_fp32)
    assert torch.equal(all_bf16, by_hand_bf16) and torch.equal(back_off, all_bf16)
    # On a CPU a bf16 GEMM accumulates in fp32 and rounds once, so here the option removes
    # exactly that last rounding: up to half a bf16 ulp (2^-8 relative), and not zero.
    rounding = (fp32_output - all_bf16.float()).abs()
    assert torch.equal(fp32_output.bfloat16(), all_bf16)
    assert rounding.max() > 0 and (rounding <= fp32_output.abs() * 2**-8).all()
    assert ours.proj_out.weight.dtype == torch.bfloat16 and torch.equal(ours.proj_out.weight, weight)
