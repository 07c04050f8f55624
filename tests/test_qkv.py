"""q/k/v as one GEMM (models/qkv.py): same outputs as the separate projections, public keys kept."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framepack_backend.models.qkv import FUSED_PROJECTIONS
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import EngineOptions
from tests.test_transformer_fast_paths import GPU_CONFIG, bf16, gpu_inputs
from tests.test_transformer_parity import CASES, TINY, build_pair, section_inputs

ROOT = Path(__file__).resolve().parents[1]


def inputs_of(case: str, seed: int = 1) -> dict:
    _, batch, frames, height, width, padding, lengths, text_len = CASES[case]
    return section_inputs(batch, frames, height, width, padding, lengths, text_len, seed=seed)


@pytest.mark.parametrize("case", ["tiny", "multi_section_masked"])
def test_fused_projections_give_the_same_output(case):
    _, ours = build_pair(TINY, seed=2)
    inputs = inputs_of(case)
    with torch.no_grad():
        before = ours(**inputs)
        fused = ours.fuse_qkv()
        after = ours(**inputs)
    # One latent and one context triple per dual-stream block, one triple per single-stream block.
    assert fused == 2 * TINY["num_layers"] + TINY["num_single_layers"]
    attn = ours.transformer_blocks[0].attn
    assert set(FUSED_PROJECTIONS) <= set(attn._modules) and "to_q" not in attn._modules
    assert attn.to_qkv.weight.shape == (3 * 32, 32)
    assert (after - before).abs().max() < 1e-5 * before.abs().max()


def test_state_dict_keeps_the_public_keys_and_loads_them():
    _, ours = build_pair(TINY, seed=2)
    public = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.fuse_qkv()
    seen = ours.state_dict()
    assert list(sorted(seen)) == list(sorted(public))
    assert all(torch.equal(seen[k], public[k]) for k in public)

    # A fused model loads another checkpoint by its public keys and then computes like it.
    _, other = build_pair(TINY, seed=5)
    ours.load_state_dict(other.state_dict(), strict=True)
    inputs = inputs_of("tiny")
    with torch.no_grad():
        assert (ours(**inputs) - other(**inputs)).abs().max() < 1e-5
    assert torch.equal(ours.single_transformer_blocks[1].attn.to_qkv.weight[32:64],
                       other.single_transformer_blocks[1].attn.to_k.weight)


def test_pipeline_option_makes_the_same_video(tiny_bundle, image):
    settings = {"resolution": 128, "steps": 2, "seconds": 0.5, "teacache": False, "preview": False}
    videos = []
    for fused_qkv in (False, True):
        pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu", options=EngineOptions(fused_qkv=fused_qkv))
        result = list(pipeline.generate(GenerationRequest.parse(image, "a robot waves", **settings)))[-1]
        assert result.settings["fused_qkv"] is fused_qkv
        videos.append(result.frames.astype(int))
    assert videos[0].shape == videos[1].shape
    assert abs(videos[0] - videos[1]).max() <= 1  # fp32 GEMM tiling may round a pixel differently


CHILD = """
import json, torch
from tests.test_transformer_parity import TINY, build_pair
from tests.test_qkv import inputs_of
reference, ours = build_pair(TINY, seed=3)
ours.set_fused_kernels(True)
inputs = inputs_of("multi_section_batch1")
with torch.no_grad():
    expected = reference(**inputs, return_dict=False)[0]
    ours.fuse_qkv()
    got = ours(**inputs)
print(json.dumps(float((got - expected).abs().max() / expected.abs().max())))
"""


@pytest.mark.slow
def test_fused_kernel_blocks_read_the_fused_projections_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_fused_projections_match_within_bf16_rounding(fp8):
    if fp8 and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 needs a Hopper GPU")
    torch.manual_seed(0)
    _, separate = build_pair(GPU_CONFIG, seed=6)
    _, fused = build_pair(GPU_CONFIG, seed=6)
    separate, fused = separate.cuda().bfloat16(), fused.cuda().bfloat16()
    fused.fuse_qkv()
    for model in (separate, fused):
        model.set_fused_kernels(True)
        if fp8:
            model.quantize_fp8()
    inputs = bf16(gpu_inputs())
    with torch.no_grad():
        a, b = separate(**inputs).float(), fused(**inputs).float()
    rel = float((a - b).norm() / a.norm())
    print(f"fused q/k/v vs separate, fp8={fp8}: relative error {rel:.2e}")
    assert torch.isfinite(b).all() and rel < 2e-2, rel
