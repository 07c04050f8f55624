"""The transformer's fast paths (fused Triton kernels, compiled blocks) against diffusers.

On the CPU the kernels run under the Triton interpreter, which must be chosen before
Triton is imported, so that check runs in a child process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_transformer_parity import TINY, build_pair, section_inputs

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, torch
from framepack_backend.attention import Attend
from tests.test_transformer_parity import CASES, TINY, RecordingAttend, build_pair, section_inputs
out, calls = {}, None
for name in ("tiny", "multi_section_batch1", "multi_section_masked"):
    overrides, batch, frames, height, width, padding, lengths, text_len = CASES[name]
    reference, ours = build_pair({**TINY, **overrides})
    ours.set_fused_kernels(True)
    inputs = section_inputs(batch, frames, height, width, padding, lengths, text_len, seed=len(name))
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        got = ours(**inputs)
        if name == "tiny":
            recording = RecordingAttend(Attend.named("sdpa").backend)
            ours(**inputs, attend=recording)
            calls = recording.calls
    out[name] = float((got - expected).abs().max())
print(json.dumps({"errors": out, "calls": calls}))
"""


@pytest.mark.slow
def test_fused_kernels_match_diffusers_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    errors = result["errors"]
    assert set(errors) == {"tiny", "multi_section_batch1", "multi_section_masked"}
    assert max(errors.values()) <= 1e-4, errors
    # The fused blocks reach the same seam as the eager ones (test_transformer_parity):
    # joint [21 latent | 11 context] buffers, the text refiner local.
    assert result["calls"] == [["local", 6]] * 2 + [["joint", 32, 21]] * 4


GPU_CONFIG = {**TINY, "num_attention_heads": 4, "attention_head_dim": 128, "rope_axes_dim": (16, 56, 56),
              "mlp_ratio": 4.0, "text_embed_dim": 256, "image_proj_dim": 64}


def gpu_inputs():
    inputs = section_inputs(1, 9, 32, 48, 2, [20], 20, seed=3)
    inputs = dict(inputs, encoder_hidden_states=torch.randn(1, 20, 256), image_embeds=torch.randn(1, 16, 64))
    return {k: v.cuda() for k, v in inputs.items()}


def bf16(inputs):
    return {k: v.bfloat16() if v.is_floating_point() and v.ndim > 1 else v for k, v in inputs.items()}


@pytest.mark.gpu
def test_fused_kernels_bf16_are_as_close_to_fp32_as_diffusers():
    torch.backends.cuda.matmul.allow_tf32 = False
    reference, ours = build_pair(GPU_CONFIG, seed=6)
    reference, ours = reference.cuda(), ours.cuda()
    inputs = gpu_inputs()
    with torch.no_grad():
        exact = reference(**inputs, return_dict=False)[0]
        their_bf16 = reference.bfloat16()(**bf16(inputs), return_dict=False)[0]
        ours = ours.bfloat16()
        ours.set_fused_kernels(True)
        our_bf16 = ours(**bf16(inputs))
    their_error = float((their_bf16.float() - exact).abs().mean())
    our_error = float((our_bf16.float() - exact).abs().mean())
    assert our_error <= 1.25 * their_error, (our_error, their_error)


def test_fp8_quantization_replaces_block_linears_and_keeps_modulation():
    _, ours = build_pair(TINY)
    n_linear = sum(isinstance(m, torch.nn.Linear) for b in ours.blocks() for m in b.modules())
    replaced = ours.quantize_fp8()
    from framepack_backend.models.fp8 import Fp8Linear, quantize_rows

    assert replaced == sum(isinstance(m, Fp8Linear) for b in ours.blocks() for m in b.modules())
    # Left in bf16: the AdaLN projections, one per dual-stream stream (2 per block) and one per single block.
    assert n_linear - replaced == 2 * TINY["num_layers"] + TINY["num_single_layers"]
    w = torch.randn(7, 32)
    values, scale = quantize_rows(w)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (7, 1)
    assert ((values.float() * scale - w).abs() / w.abs().amax(1, keepdim=True)).max() < 0.07


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("fused_kernels", [False, True])
def test_fp8_forward_stays_close_to_bf16(fused_kernels):
    """Both FP8 paths: quantization in Fp8Linear (eager blocks), and quantized once per
    shared input with GELU and the [attention | MLP] concatenation fused (fused blocks)."""
    _, ours = build_pair(GPU_CONFIG, seed=6)
    ours = ours.cuda().bfloat16()
    ours.set_fused_kernels(fused_kernels)
    inputs = bf16(gpu_inputs())
    with torch.no_grad():
        reference = ours(**inputs).float()
        ours.quantize_fp8()
        quantized = ours(**inputs).float()
    rel = float((quantized - reference).norm() / reference.norm())
    assert 0 < rel < 0.1, rel


def epilogue_case(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, 96, generator=g)
    mlp = torch.randn(2, 37, 160, generator=g)
    up = torch.nn.Linear(96, 160)
    out = torch.nn.Linear(96 + 160, 96)
    return [t.to(device, dtype) for t in (x, mlp)] + [m.to(device, dtype) for m in (up, out)]


def test_gemm_epilogue_helpers_fall_back_to_the_plain_formula_on_the_cpu():
    from framepack_backend.models.fused import linear_gelu, linear_of_concat

    x, mlp, up, out = epilogue_case("cpu", torch.float32)
    with torch.no_grad():
        assert torch.equal(linear_gelu(up, x), torch.nn.functional.gelu(up(x), approximate="tanh"))
        assert torch.equal(linear_of_concat(out, x, mlp), out(torch.cat([x, mlp], dim=-1)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_epilogue_helpers_match_fp32_like_the_plain_bf16_path(dtype):
    """GELU in cuBLASLt's epilogue and the split output projection (one extra rounding of
    the partial sum) stay within the dtype's noise of the fp32 formula."""
    from framepack_backend.models.fused import linear_gelu, linear_of_concat

    torch.backends.cuda.matmul.allow_tf32 = False
    x, mlp, up, out = epilogue_case("cuda", torch.float32, seed=1)
    lx, lmlp, lup, lout = epilogue_case("cuda", dtype, seed=1)
    with torch.no_grad():
        gelu_exact = torch.nn.functional.gelu(up(x), approximate="tanh")
        gelu_plain = torch.nn.functional.gelu(lup(lx), approximate="tanh").float()
        gelu_fused = linear_gelu(lup, lx).float()
        cat_exact = out(torch.cat([x, mlp], dim=-1))
        cat_plain = lout(torch.cat([lx, lmlp], dim=-1)).float()
        cat_fused = linear_of_concat(lout, lx, lmlp).float()
    assert gelu_fused.shape == gelu_exact.shape and cat_fused.shape == cat_exact.shape
    assert (gelu_fused - gelu_exact).abs().mean() <= 1.25 * (gelu_plain - gelu_exact).abs().mean()
    assert (cat_fused - cat_exact).abs().mean() <= 1.5 * (cat_plain - cat_exact).abs().mean()


def test_fp8_layer_takes_a_shared_quantized_input_and_checks_its_width():
    from framepack_backend.models.fp8 import Fp8Linear, quantize_activation

    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    fp8 = Fp8Linear(layer)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        direct = fp8(x)
        shared = fp8(quantize_activation(x))
        exact = layer(x)
    assert direct.shape == (2, 5, 16) and torch.equal(direct, shared)
    assert float((direct - exact).norm() / exact.norm()) < 0.05
    with pytest.raises(ValueError, match="input has 24 features; this layer takes 32"):
        fp8(quantize_activation(torch.randn(3, 24)))


FP8_CHILD = """
import json, torch
from tests.test_transformer_parity import CASES, TINY, build_pair, section_inputs
overrides, batch, frames, height, width, padding, lengths, text_len = CASES["multi_section_batch1"]
_, ours = build_pair({**TINY, **overrides})
inputs = section_inputs(batch, frames, height, width, padding, lengths, text_len, seed=5)
with torch.no_grad():
    exact = ours(**inputs)
    ours.quantize_fp8()
    eager_fp8 = ours(**inputs)
    ours.set_fused_kernels(True)
    fused_fp8 = ours(**inputs)
rel = lambda a, b: float((a - b).norm() / b.norm())
print(json.dumps({"fused_vs_eager": rel(fused_fp8, eager_fp8), "fused_vs_exact": rel(fused_fp8, exact),
                  "eager_vs_exact": rel(eager_fp8, exact)}))
"""


@pytest.mark.slow
def test_fused_fp8_blocks_match_the_eager_fp8_blocks_under_the_interpreter():
    """The fused path quantizes shared inputs once and applies GELU inside the quantizer;
    the eager path quantizes in every layer. Same FP8 arithmetic, so the two agree, and
    both are as close to the unquantized model."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", FP8_CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < errors["eager_vs_exact"] < 0.1, errors
    assert errors["fused_vs_exact"] < 1.5 * errors["eager_vs_exact"], errors
    # float32 model on the CPU: the two paths differ only in summation order (measured 4e-7);
    # GELU applied twice or the [attention | MLP] halves swapped would show as ~1e-1.
    assert errors["fused_vs_eager"] < 1e-3, errors
