"""The device bytes a job's LoRAs hold (lora/footprint.py): the relative change without
forming Δ, the undo's kept bytes bounded, every form's count against what applying the
LoRAs allocates, and the pipeline handing the counts to the memory planner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framepack_backend.lora.apply import FORMS, job_loras, lora_targets, loras_applied
from framepack_backend.lora.folder import LoraFolder
from framepack_backend.lora.footprint import (
    device_bytes,
    kept_bytes_estimate,
    layer_factors,
    relative_change,
    stacked,
)
from framepack_backend.lora.merge import MergedInPlace, delta
from framepack_backend.memory.modes import FASTEST_FIRST
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.testing.lora_files import diffusers_factors, hunyuan_factors, save_diffusers
from tests.test_transformer_parity import TINY, build_pair

DIM = TINY["num_attention_heads"] * TINY["attention_head_dim"]


def layer_with_change(dtype: torch.dtype, relative: float, seed: int = 3, shape=(384, 256), rank: int = 16):
    """A linear layer with weights like a model's and factors whose Δ is `relative` · RMS(W)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0], bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape, generator=g) * 0.02)
    down, up = torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g)
    up *= relative * layer.weight.detach().float().pow(2).mean().sqrt() / delta(down, up).pow(2).mean().sqrt()
    return layer, down, up


@pytest.mark.parametrize("relative", [0.003, 0.02, 0.3])
def test_the_relative_change_equals_rms_of_the_formed_delta_over_rms_w(relative):
    layer, down, up = layer_with_change(torch.float32, relative)  # 384 rows: all of them read
    formed = float(delta(down, up).pow(2).mean().sqrt() / layer.weight.detach().double().pow(2).mean().sqrt())
    assert relative_change(layer, down, up) == pytest.approx(formed, rel=1e-9)
    assert formed == pytest.approx(relative, rel=1e-5)


def test_on_a_tall_weight_rms_w_comes_from_some_rows_and_stays_close():
    layer, down, up = layer_with_change(torch.bfloat16, 0.02, shape=(8192, 64))  # every 32nd row read
    assert relative_change(layer, down, up) == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relative", [0.01, 0.02, 0.05, 0.2])
def test_the_kept_bytes_estimate_is_above_the_merge_s_and_within_three_times_it(dtype, relative):
    layer, down, up = layer_with_change(dtype, relative)
    bound = kept_bytes_estimate(layer, down, up)
    with torch.no_grad():
        merged = MergedInPlace(layer.weight, down, up)
        merged.undo()
    assert merged.kept_bytes <= bound <= 3 * merged.kept_bytes


@pytest.fixture(scope="module")
def model():
    return build_pair(TINY, seed=1)[1]


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    """Two LoRAs, one on every linear layer of the blocks and one on fewer; small changes."""
    path = tmp_path_factory.mktemp("footprint_loras")
    mlp = int(DIM * TINY["mlp_ratio"])
    for name, seed, blocks in (("all", 1, (TINY["num_layers"], TINY["num_single_layers"])), ("some", 2, (1, 0))):
        factors = hunyuan_factors(DIM, mlp, *blocks, rank=4, seed=seed, std=0.02)
        save_diffusers(path / f"{name}.safetensors", diffusers_factors(factors, DIM))
    folder = LoraFolder(path)
    return [(folder.load("all", lora_targets(model)), 0.8), (folder.load("some", lora_targets(model)), -1.5)]


def test_each_form_counts_at_least_what_applying_the_loras_holds(model, loras):
    counted = device_bytes(model, loras)
    assert set(counted) == set(FORMS)
    per_layer = layer_factors(loras)
    factor_bytes = sum(d.numel() * 4 + u.numel() * 4 for parts in per_layer.values() for d, u, _ in parts)
    largest = max(model.get_submodule(name).weight.numel() for name in per_layer)  # fp32 weights
    assert counted["unmerged"] == factor_bytes
    assert counted["merged"] == factor_bytes + 4 * largest  # W + B·A of the largest layer while it runs
    with torch.inference_mode(), loras_applied(model, loras, torch.device("cpu"), torch.float32,
                                                "merged_once") as adapted:
        held = factor_bytes + adapted.kept_bytes
    merging = largest * (2 * 8 + 2 * 4 + 1)  # Δ and W + Δ in fp64, two fp32 copies, booleans
    assert 0 < adapted.kept_bytes and held <= counted["merged_once"] - merging <= held + 3 * adapted.kept_bytes
    # the stacking is the one the applied layers use: strengths on the up columns
    name = next(iter(loras[1][0].layers))
    down, up = stacked(per_layer[name])
    first, second = loras[0][0].layers[name], loras[1][0].layers[name]
    assert torch.equal(down, torch.cat([first.down, second.down]))
    assert torch.equal(up, torch.cat([first.up * 0.8, second.up * -1.5], dim=1))


def test_no_loras_hold_nothing(model):
    with job_loras(model, None, [], torch.device("cpu"), torch.float32) as none:
        assert (none.layers, none.bytes_held(True), none.bytes_held(False)) == (0, 0, 0)


def test_a_lora_job_hands_its_bytes_per_mode_to_the_memory_planner(tiny_bundle, tmp_path, image, monkeypatch):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    dim = 32  # the tiny bundle's transformer: 2 heads × 16
    save_diffusers(lora_dir / "style.safetensors",
                   diffusers_factors(hunyuan_factors(dim, 4 * dim, 2, 2, rank=4, seed=5, std=0.05), dim))
    pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu", loras=LoraFolder(lora_dir))
    planned = []
    prepare = pipeline.memory.prepare
    monkeypatch.setattr(pipeline.memory, "prepare",
                        lambda *args, **kwargs: planned.append(kwargs["lora_bytes"]) or prepare(*args, **kwargs))
    for loras in ("", "style:1.2"):
        request = GenerationRequest.parse(image, "a robot waves", loras_available=pipeline.loras, loras=loras,
                                          resolution=128, steps=1, seconds=1)
        list(pipeline.generate(request))
    transformer = pipeline.components.transformer
    counted = device_bytes(transformer, [(pipeline.loras.load("style", lora_targets(transformer)), 1.2)])
    assert planned[0] == dict.fromkeys(FASTEST_FIRST, 0)
    assert planned[1] == {"resident": counted["merged_once"], "offload": counted["merged"],
                          "stream": counted["merged"]}
    assert 0 < counted["merged"] < counted["merged_once"]

