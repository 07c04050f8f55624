"""The Triton kernels against their pure-torch references.

Without CUDA the kernels run through Triton's interpreter on CPU tensors. Triton
decides interpreted-or-compiled when a kernel is decorated, so TRITON_INTERPRET=1
is set only while `kernels` is imported (re-imported if someone imported it
compiled before) and restored at once: nothing else in the pytest process sees it.
With CUDA the kernels are imported compiled, the interpreter class is skipped and
the CUDA class runs the same comparisons.

Tolerances, |kernel - reference| <= atol + rtol * |reference|, both computed in
float32 and rounded once to the output dtype:
- float32: 1e-5 / 1e-5 (summation order only).
- float16: 2e-3 / 2e-3 (one float16 ulp is 2^-10 relative).
- bfloat16: 1.6e-2 / 1.6e-2. Triton's interpreter converts float32 -> bfloat16 by
  truncation rather than round-to-nearest, so results may differ by one bfloat16
  ulp (2^-7 relative); the margin is twice that.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")


def _import_kernels():
    """Import `framepack_kernels`, interpreted when there is no GPU."""
    if HAS_CUDA:
        return importlib.import_module("framepack_kernels")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        package = importlib.import_module("framepack_kernels")
        import triton

        if isinstance(package.adaln_norm._adaln_layernorm_modulate_kernel, triton.runtime.JITFunction):
            for name in sorted(n for n in sys.modules if n.startswith("framepack_kernels.")):
                importlib.reload(sys.modules[name])
        # Triton imports parts of itself on the first launch and checks the variable
        # then too, so launch once while it is still set.
        one = torch.ones(1, 1, 1)
        package.gated_residual(one, one, one[0])
        return package
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


kernels = _import_kernels()
from framepack_kernels import adaln_norm, qk_norm_rope, teacache_distance  # noqa: E402  (after the interpreter choice)

INTERPRETED = not HAS_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# The FP8 norms quantize the row as stored in x.dtype. The kernel's and the reference's
# float32 sums differ in order, so an element here and there is stored one bf16 ulp
# apart, and now and then that moves its e4m3 rounding (9 of 7104 values on an H100).
STORED_ROUNDING_DIFFERS = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    tol = TOLERANCE[dtype]
    a, e = actual.float().cpu(), expected.float().cpu()
    assert torch.isfinite(a).all(), "kernel output has NaN/inf (an element left unwritten?)"
    excess = (a - e).abs() - (tol + tol * e.abs())
    assert excess.max().item() <= 0, f"max |diff| {(a - e).abs().max().item():.3g} over tolerance {tol} ({dtype})"


def rope_tables(tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (tokens, head_dim), one angle per adjacent pair like HunyuanVideo's."""
    angles = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(7)) * 2 * math.pi
    return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)


class KernelComparisons:
    """Each kernel vs its reference; subclasses choose the device."""

    device: str

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
        # Drawn on the CPU so both device classes see identical numbers.
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(self.device, dtype)

    # --- adaln_layernorm_modulate -------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(2, 37, 96), (1, 5, 3), (1, 3, 3072)])
    def test_adaln_matches_reference(self, shape, dtype):
        batch, _, channels = shape
        # Non-zero mean and scale so the variance path is exercised.
        x = self.randn(*shape, seed=1) * 3 + 0.5
        x = x.to(dtype)
        emb = self.randn(batch, 6 * channels, dtype=dtype, seed=2)
        shift, scale = emb[:, :channels], emb[:, channels : 2 * channels]  # chunk views, row stride 6C
        out = kernels.adaln_layernorm_modulate(x, shift, scale)
        assert_close(out, kernels.adaln_layernorm_modulate_reference(x, shift, scale), dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_adaln_strided_input_and_out(self, dtype):
        full = self.randn(2, 50, 96, dtype=dtype, seed=3)
        x = full[:, 5:42]  # a sequence slice: strides of the 50-token buffer
        shift, scale = self.randn(2, 96, dtype=dtype, seed=4), self.randn(2, 96, dtype=dtype, seed=5)
        out = torch.full((2, 37, 96), float("nan"), dtype=dtype, device=self.device)
        result = kernels.adaln_layernorm_modulate(x, shift, scale, out=out)
        assert result is out
        assert_close(out, kernels.adaln_layernorm_modulate_reference(x, shift, scale), dtype)

    # --- qk_rmsnorm_rope -----------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("head_dim", [6, 16, 128])
    @pytest.mark.parametrize("rope_tokens", [37, 30, 0])
    def test_qk_rope_matches_reference(self, head_dim, rope_tokens, dtype):
        batch, seq_len, heads = 2, 37, 3
        x = self.randn(batch, seq_len, heads, head_dim, dtype=dtype, seed=6) * 4
        weight = (self.randn(head_dim, seed=7).abs() + 0.5).to(dtype)
        cos, sin = (t.to(self.device) for t in rope_tables(rope_tokens, head_dim))
        out = kernels.qk_rmsnorm_rope(x, weight, cos, sin, rope_tokens=rope_tokens)
        expected = kernels.qk_rmsnorm_rope_reference(x, weight, cos, sin, rope_tokens=rope_tokens)
        assert_close(out, expected, dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_qk_heads_split_over_programs(self, dtype, monkeypatch):
        # 3 heads, 2 per program: the second program's block is half masked.
        monkeypatch.setattr(qk_norm_rope, "HEADS_PER_PROGRAM", 2)
        x = self.randn(2, 37, 3, 16, dtype=dtype, seed=36)
        weight = self.randn(16, dtype=dtype, seed=37)
        cos, sin = (t.to(self.device) for t in rope_tables(30, 16))
        out = kernels.qk_rmsnorm_rope(x, weight, cos, sin, rope_tokens=30)
        assert_close(out, kernels.qk_rmsnorm_rope_reference(x, weight, cos, sin, rope_tokens=30), dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_qk_norm_only_and_odd_head_dim(self, dtype):
        x = self.randn(2, 37, 3, 7, dtype=dtype, seed=8)
        weight = self.randn(7, dtype=dtype, seed=9)
        out = kernels.qk_rmsnorm_rope(x, weight, None, None)
        assert_close(out, kernels.qk_rmsnorm_rope_reference(x, weight, None, None), dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_qk_fused_qkv_view_into_concatenated_buffer(self, dtype):
        # q as a head view of a fused qkv projection, written into the image part of a
        # buffer that also holds the text tokens (what a double block does without cat).
        batch, image_tokens, text_tokens, heads, head_dim = 1, 29, 8, 3, 16
        qkv = self.randn(batch, image_tokens, 3 * heads * head_dim, dtype=dtype, seed=10)
        q = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))
        weight = self.randn(head_dim, dtype=dtype, seed=11)
        cos, sin = (t.to(self.device) for t in rope_tables(image_tokens, head_dim))
        joint = torch.full((batch, image_tokens + text_tokens, heads, head_dim), float("nan"),
                           dtype=dtype, device=self.device)
        kernels.qk_rmsnorm_rope(q, weight, cos, sin, out=joint[:, :image_tokens])
        assert_close(joint[:, :image_tokens], kernels.qk_rmsnorm_rope_reference(q, weight, cos, sin), dtype)
        assert torch.isnan(joint[:, image_tokens:]).all(), "wrote outside its slice"

    def test_qk_wide_token(self):
        x = self.randn(1, 3, 24, 128, dtype=torch.bfloat16, seed=12)
        weight = self.randn(128, dtype=torch.bfloat16, seed=13)
        cos, sin = (t.to(self.device) for t in rope_tables(2, 128))
        out = kernels.qk_rmsnorm_rope(x, weight, cos, sin, rope_tokens=2)
        assert_close(out, kernels.qk_rmsnorm_rope_reference(x, weight, cos, sin, rope_tokens=2), torch.bfloat16)

    # --- gated_residual ------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(2, 37, 96), (1, 5, 1100)])
    def test_gated_residual_matches_reference(self, shape, dtype):
        x = self.randn(*shape, dtype=dtype, seed=14)
        y = self.randn(*shape, dtype=dtype, seed=15)
        gate = self.randn(shape[0], shape[2], dtype=dtype, seed=16)
        out = kernels.gated_residual(x, y, gate)
        assert_close(out, kernels.gated_residual_reference(x, y, gate), dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_gated_residual_in_place(self, dtype):
        x = self.randn(2, 37, 96, dtype=dtype, seed=17)
        y = self.randn(2, 37, 96, dtype=dtype, seed=18)
        gate = self.randn(2, 3 * 96, dtype=dtype, seed=19)[:, 96:192]
        expected = kernels.gated_residual_reference(x, y, gate)
        result = kernels.gated_residual(x, y, gate, out=x)
        assert result is x
        assert_close(x, expected, dtype)

    # --- gated_residual_layernorm_modulate ------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(2, 37, 96), (1, 3, 3072)])
    def test_gated_residual_norm_matches_reference(self, shape, dtype):
        batch, _, channels = shape
        x = self.randn(*shape, dtype=dtype, seed=20)
        y = self.randn(*shape, dtype=dtype, seed=21)
        gate, shift, scale = self.randn(batch, 3 * channels, dtype=dtype, seed=22).chunk(3, dim=1)
        expected_residual, expected_modulated = kernels.gated_residual_layernorm_modulate_reference(
            x, y, gate, shift, scale
        )
        residual, modulated = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, residual_out=x)
        assert residual is x
        assert_close(residual, expected_residual, dtype)
        assert_close(modulated, expected_modulated, dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_gated_residual_norm_equals_the_two_kernels(self, dtype):
        x = self.randn(2, 37, 96, dtype=dtype, seed=23)
        y = self.randn(2, 37, 96, dtype=dtype, seed=24)
        gate, shift, scale = self.randn(2, 288, dtype=dtype, seed=25).chunk(3, dim=1)
        residual, modulated = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        two_step_residual = kernels.gated_residual(x, y, gate)
        assert torch.equal(residual, two_step_residual)
        assert_close(modulated, kernels.adaln_layernorm_modulate(two_step_residual, shift, scale), dtype)

    # --- teacache ------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(1, 37, 96), (3, 4097), (5,)])
    def test_teacache_relative_l1_matches_reference(self, shape, dtype):
        previous = self.randn(*shape, dtype=dtype, seed=26)
        current = (previous.float() + 0.1 * self.randn(*shape, seed=27)).to(dtype)
        rel = kernels.teacache_relative_l1(current, previous)
        assert rel.shape == () and rel.dtype == torch.float32 and rel.device == previous.device
        expected = kernels.teacache_relative_l1_reference(current, previous)
        assert abs(rel.item() - expected.item()) <= 1e-5 * expected.item()

    def test_teacache_relative_l1_multi_pass_final_reduction(self, monkeypatch):
        # Small blocks make the second stage loop over several chunks of partials.
        monkeypatch.setattr(teacache_distance, "PARTIAL_BLOCK", 16)
        monkeypatch.setattr(teacache_distance, "FINAL_BLOCK", 64)
        previous = self.randn(1, 37, 96, seed=28)
        current = previous + 0.3 * self.randn(1, 37, 96, seed=29)
        rel = kernels.teacache_relative_l1(current, previous)
        expected = kernels.teacache_relative_l1_reference(current, previous)
        assert abs(rel.item() - expected.item()) <= 1e-5 * expected.item()

    def test_teacache_accumulate_follows_reference_over_a_run(self):
        coeffs = torch.tensor([500.0, -300.0, 60.0, -3.0, 0.1], device=self.device)
        threshold = 0.15
        acc = torch.zeros((), device=self.device)
        acc_ref = acc.clone()
        decisions = []
        for rel_value in [0.02, 0.05, 0.08, 0.01, 0.2, 0.03, 0.04, 0.06]:
            rel = torch.tensor(rel_value, device=self.device)
            acc, should_compute = kernels.teacache_accumulate(acc, rel, coeffs, threshold)
            acc_ref, should_ref = kernels.teacache_accumulate_reference(acc_ref, rel, coeffs, threshold)
            assert should_compute.dtype == torch.bool and should_compute.shape == ()
            assert bool(should_compute) == bool(should_ref)
            assert abs(acc.item() - acc_ref.item()) <= 1e-5 * max(1.0, abs(acc_ref.item()))
            decisions.append(bool(should_compute))
        assert any(decisions) and not all(decisions), "the run must exercise both branches"

    # --- quantize_fp8_rows -----------------------------------------------------------

    def assert_fp8_matches(self, got, expected, differ_fraction=1e-3):
        (values, scale), (ref_values, ref_scale) = got, expected
        assert values.dtype == torch.float8_e4m3fn and values.shape == ref_values.shape
        assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
        assert torch.allclose(scale.cpu(), ref_scale.cpu(), rtol=1e-6, atol=0)
        v, r = values.float().cpu(), ref_values.float().cpu()
        differ = v != r
        step = torch.maximum(r.abs() / 8, torch.full_like(r, 2.0**-9))  # one e4m3 step at |r|
        if INTERPRETED:
            # Triton's interpreter converts float32 -> e4m3 with its own rounding, not the
            # GPU's round-to-nearest-even: ties go away from zero, subnormals are truncated,
            # and a round-up that should carry into the next exponent loses it (126.8
            # becomes 64, not 128). Here: one step either way, or that carry signature;
            # the CUDA class checks the real rounding.
            carried = (r.abs().log2() == r.abs().log2().round()) & (v == r / 2)
            differ &= ~carried
        else:
            # Same float32 division and GELU as the reference: at most a rare tie apart.
            assert differ.float().mean().item() <= differ_fraction, (
                f"{differ.sum().item()} of {differ.numel()} values differ"
            )
        assert (v - r).abs()[differ].le(step[differ]).all()

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(2, 37, 96), (1, 3, 5), (3, 3072)])
    @pytest.mark.parametrize("gelu", [False, True])
    def test_fp8_quantize_matches_reference(self, shape, dtype, gelu):
        x = (self.randn(*shape, seed=40) * 3).to(dtype)
        got = kernels.quantize_fp8_rows(x, gelu_a=gelu)
        self.assert_fp8_matches(got, kernels.quantize_fp8_rows_reference(x, gelu_a=gelu))
        assert got[0].shape == (math.prod(shape[:-1]), shape[-1])

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_fp8_quantize_of_a_concatenation_with_gelu_on_the_second_part(self, dtype):
        attention = self.randn(2, 37, 96, dtype=dtype, seed=41)
        mlp = (self.randn(2, 37, 1100, dtype=dtype, seed=42) * 2)  # > one 1024-wide chunk
        got = kernels.quantize_fp8_rows(attention, mlp, gelu_b=True)
        self.assert_fp8_matches(got, kernels.quantize_fp8_rows_reference(attention, mlp, gelu_b=True))
        assert got[0].shape == (74, 96 + 1100)

    def test_fp8_quantize_zero_rows_and_strided_rows(self):
        zeros = torch.zeros(3, 64, device=self.device)
        values, scale = kernels.quantize_fp8_rows(zeros)
        assert values.float().abs().max().item() == 0 and (scale > 0).all()
        full = self.randn(2, 50, 96, seed=43)
        part = full[:, 5:42]  # a sequence slice of a longer buffer
        self.assert_fp8_matches(kernels.quantize_fp8_rows(part), kernels.quantize_fp8_rows_reference(part))

    # --- the norms writing FP8 rows ---------------------------------------------------

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_adaln_fp8_equals_quantizing_the_stored_rows(self, dtype):
        full = self.randn(2, 50, 96, dtype=dtype, seed=44) * 3 + 0.5
        x = full[:, 5:42]  # a sequence slice: strides of the 50-token buffer
        shift, scale = (self.randn(2, 192, dtype=dtype, seed=45) * 2).chunk(2, dim=1)
        values, scales = kernels.adaln_layernorm_modulate_fp8(x, shift, scale)
        assert values.shape == (74, 96) and scales.shape == (74, 1)
        # The fused kernel quantizes exactly what the two-kernel path stores and re-reads.
        two_step = kernels.quantize_fp8_rows(kernels.adaln_layernorm_modulate(x, shift, scale))
        assert torch.equal(scales, two_step[1]) and torch.equal(values.float(), two_step[0].float())
        if dtype == torch.float32 or not INTERPRETED:  # the interpreter rounds to bf16 its own way
            reference = kernels.adaln_layernorm_modulate_fp8_reference(x.cpu(), shift.cpu(), scale.cpu())
            self.assert_fp8_matches((values, scales), reference, STORED_ROUNDING_DIFFERS[dtype])

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_gated_residual_norm_fp8_equals_the_unquantized_kernel_then_quantizing(self, dtype):
        x = self.randn(2, 37, 96, dtype=dtype, seed=46)
        y = self.randn(2, 37, 96, dtype=dtype, seed=47) * 4
        gate, shift, scale = self.randn(2, 288, dtype=dtype, seed=48).chunk(3, dim=1)
        residual, values, scales = kernels.gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)
        expected_residual, modulated = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        assert torch.equal(residual, expected_residual)
        expected_values, expected_scales = kernels.quantize_fp8_rows(modulated)
        assert torch.equal(scales, expected_scales) and torch.equal(values.float(), expected_values.float())
        if dtype == torch.float32 or not INTERPRETED:  # the interpreter rounds to bf16 its own way
            _, *reference = kernels.gated_residual_layernorm_modulate_fp8_reference(
                *(t.cpu() for t in (x, y, gate, shift, scale))
            )
            self.assert_fp8_matches((values, scales), tuple(reference), STORED_ROUNDING_DIFFERS[dtype])
        in_place, _, _ = kernels.gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale, residual_out=x)
        assert in_place is x and torch.equal(x, expected_residual)

    # --- quantize_fp8_tensor / dequantize_fp8_tensor -----------------------------------

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_fp8_tensor_quantize_matches_reference(self, dtype):
        x = (self.randn(2, 37, 3, 16, seed=44) * 5).to(dtype)
        got = kernels.quantize_fp8_tensor(x)
        self.assert_fp8_matches(got, kernels.quantize_fp8_tensor_reference(x))
        values, scales = got
        assert values.shape == x.shape and values.is_contiguous()
        descale, scale = scales.cpu().tolist()
        assert descale == pytest.approx(x.float().abs().max().item() / 448, rel=1e-6)
        assert scale * descale == pytest.approx(1.0, rel=1e-6)
        assert values.float().abs().max().item() == 448.0  # the largest element lands on e4m3's top

    def test_fp8_tensor_quantize_reads_a_projection_view_and_a_sequence_slice(self):
        heads, head_dim = 3, 16
        projection = self.randn(2, 21, 3 * heads * head_dim, dtype=torch.bfloat16, seed=45)
        v = projection[..., 2 * heads * head_dim:].unflatten(-1, (heads, head_dim))  # token stride 3·heads·head_dim
        joint = self.randn(2, 30, heads, head_dim, dtype=torch.bfloat16, seed=46)[:, 4:25]
        for x in (v, joint):
            self.assert_fp8_matches(kernels.quantize_fp8_tensor(x), kernels.quantize_fp8_tensor_reference(x))

    def test_fp8_tensor_dequantize_matches_reference_and_round_trips(self):
        x = (self.randn(1, 9, 2, 32, seed=47) * 0.01).to(torch.bfloat16)
        values, scales = kernels.quantize_fp8_tensor_reference(x.cpu())
        values, scales = values.to(self.device), scales.to(self.device)
        back = kernels.dequantize_fp8_tensor(values, scales[0:1], torch.bfloat16)
        expected = kernels.dequantize_fp8_tensor_reference(values, scales[0:1], torch.bfloat16)
        assert back.dtype == torch.bfloat16
        if INTERPRETED:  # the interpreter's float32 -> bfloat16 conversion may round the other way
            assert ((back.float() - expected.float()).abs() <= expected.float().abs() * 2**-7).all()
        else:
            assert torch.equal(back.cpu(), expected.cpu())
        # e4m3 keeps 3 mantissa bits: within half a step (1/16 relative) plus bf16's rounding.
        err = (back.float() - x.float()).abs().cpu()
        assert (err <= x.float().abs().cpu() / 16 + 2**-9 * scales[0].item() + 1e-6).all()

    def test_fp8_tensor_zeros_and_bad_layouts(self):
        values, scales = kernels.quantize_fp8_tensor(torch.zeros(1, 4, 2, 8, device=self.device))
        assert values.float().abs().max().item() == 0 and torch.isfinite(scales).all() and (scales > 0).all()
        heads_apart = self.randn(1, 4, 8, 2).transpose(2, 3)  # (1, 4, 2, 8) with heads 1 element apart
        with pytest.raises(ValueError, match="must be contiguous in its last dimension"):
            kernels.quantize_fp8_tensor(heads_apart)
        heads_strided = self.randn(1, 4, 2, 16)[..., :8]
        with pytest.raises(ValueError, match="must hold its heads contiguously"):
            kernels.quantize_fp8_tensor(heads_strided)
        with pytest.raises(ValueError, match="descale must be one float32 element"):
            kernels.dequantize_fp8_tensor(values, torch.ones(2, device=self.device), torch.bfloat16)

    # --- argument checks -----------------------------------------------------------

    def test_bad_arguments_name_the_field(self):
        x = self.randn(2, 37, 96)
        with pytest.raises(ValueError, match="shift"):
            kernels.adaln_layernorm_modulate(x, self.randn(2, 95), self.randn(2, 96))
        with pytest.raises(TypeError, match="x has dtype torch.int64"):
            kernels.gated_residual(x.long(), x, self.randn(2, 96))
        with pytest.raises(ValueError, match="contiguous in its last dimension"):
            kernels.gated_residual(x, x, self.randn(96, 2).t())
        q = self.randn(1, 37, 3, 16)
        cos, sin = rope_tables(37, 16)
        with pytest.raises(ValueError, match="rope_tokens is 40"):
            kernels.qk_rmsnorm_rope(q, self.randn(16), cos.to(self.device), sin.to(self.device), rope_tokens=40)
        with pytest.raises(ValueError, match="even head_dim"):
            odd = rope_tables(37, 6)[0][:, :5].contiguous().to(self.device)
            kernels.qk_rmsnorm_rope(self.randn(1, 37, 3, 5), self.randn(5), odd, odd)
        with pytest.raises(ValueError, match="previous has"):
            kernels.teacache_relative_l1(x, x[:1])
        with pytest.raises(ValueError, match="must agree in all but the last dimension"):
            kernels.quantize_fp8_rows(x, self.randn(2, 36, 8))
        with pytest.raises(ValueError, match="a must have a row dimension"):
            kernels.quantize_fp8_rows(self.randn(96))
        with pytest.raises(ValueError, match="adaln_layernorm_modulate_fp8: shift"):
            kernels.adaln_layernorm_modulate_fp8(x, self.randn(2, 95), self.randn(2, 96))
        with pytest.raises(ValueError, match="gated_residual_layernorm_modulate_fp8: gate"):
            kernels.gated_residual_layernorm_modulate_fp8(x, x, self.randn(2, 95), self.randn(2, 96), self.randn(2, 96))


# Slow: the interpreter runs every kernel over odd shapes and three dtypes (about 40 s on 2 cores).
@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="kernels were imported compiled (CUDA present); the CUDA class covers them")
class TestKernelsInterpreted(KernelComparisons):
    device = "cpu"


@pytest.mark.gpu
class TestKernelsCuda(KernelComparisons):
    device = "cuda"

    def test_teacache_decision_does_not_sync(self):
        previous = self.randn(1, 4096, 3072, dtype=torch.bfloat16, seed=30)
        current = self.randn(1, 4096, 3072, dtype=torch.bfloat16, seed=31)
        coeffs = torch.tensor([500.0, -300.0, 60.0, -3.0, 0.1], device="cuda")
        acc = torch.zeros((), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            rel = kernels.teacache_relative_l1(current, previous)
            acc, should_compute = kernels.teacache_accumulate(acc, rel, coeffs, 0.15)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected = kernels.teacache_relative_l1_reference(current, previous)
        assert abs(rel.item() - expected.item()) <= 1e-5 * expected.item()

    def test_full_size_block_shapes(self):
        # The 640-bucket shapes: ~19.3k tokens, 3072 channels, 24 heads x 128.
        x = self.randn(1, 19_300, 3072, dtype=torch.bfloat16, seed=32)
        shift = self.randn(1, 3072, dtype=torch.bfloat16, seed=33)
        scale = self.randn(1, 3072, dtype=torch.bfloat16, seed=34)
        assert_close(
            kernels.adaln_layernorm_modulate(x, shift, scale),
            kernels.adaln_layernorm_modulate_reference(x, shift, scale),
            torch.bfloat16,
        )
        q = x.unflatten(-1, (24, 128))
        weight = self.randn(128, dtype=torch.bfloat16, seed=35)
        cos, sin = (t.cuda() for t in rope_tables(19_200, 128))
        assert_close(
            kernels.qk_rmsnorm_rope(q, weight, cos, sin, rope_tokens=19_200),
            kernels.qk_rmsnorm_rope_reference(q, weight, cos, sin, rope_tokens=19_200),
            torch.bfloat16,
        )


def test_reference_rope_convention_matches_diffusers():
    """Our reference equals diffusers' RMSNorm + apply_rotary_emb (float32), image tokens first."""
    diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")
    from diffusers.models.normalization import RMSNorm

    batch, image_tokens, text_tokens, heads, head_dim = 2, 30, 7, 3, 16
    x = torch.randn(batch, image_tokens + text_tokens, heads, head_dim, generator=torch.Generator().manual_seed(40))
    norm = RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(head_dim, generator=torch.Generator().manual_seed(41)) + 0.5)
    cos, sin = rope_tables(image_tokens, head_dim)
    with torch.no_grad():
        normed = norm(x)
        rotated = diffusers_embeddings.apply_rotary_emb(normed[:, :image_tokens], (cos, sin), sequence_dim=1)
        expected = torch.cat([rotated, normed[:, image_tokens:]], dim=1)
    ours = qk_norm_rope.qk_rmsnorm_rope_reference(x, norm.weight.detach(), cos, sin, rope_tokens=image_tokens)
    assert (ours - expected).abs().max().item() < 1e-5


def test_reference_fp8_quantization_dequantizes_within_half_a_step():
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(44)) * 5
    values, scale = kernels.quantize_fp8_rows_reference(x)
    assert ((values.float() * scale - x).abs() <= x.abs() / 16 + scale * 2**-10 + 1e-6).all()
    assert torch.allclose(scale, x.abs().amax(-1, keepdim=True) / 448)


def test_reference_adaln_matches_layer_norm_module():
    x = torch.randn(2, 37, 96, generator=torch.Generator().manual_seed(42))
    shift, scale = torch.randn(2, 192, generator=torch.Generator().manual_seed(43)).chunk(2, dim=1)
    module = torch.nn.LayerNorm(96, elementwise_affine=False, eps=1e-6)
    expected = module(x) * (1 + scale[:, None]) + shift[:, None]
    assert (adaln_norm.adaln_layernorm_modulate_reference(x, shift, scale) - expected).abs().max().item() < 1e-5


def test_interpreter_setting_does_not_leak():
    assert os.environ.get("TRITON_INTERPRET") == TRITON_INTERPRET_BEFORE
