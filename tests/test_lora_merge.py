"""A LoRA merged into the weights once per job (lora/merge.py): the merge is the rounded sum
W + Δ, and the undo gives back W bit for bit (fp32 and bf16), on weights of many magnitudes,
exponent boundaries, signed zeros, subnormals, exact ties and strengths up to ±2."""

from __future__ import annotations

import pytest
import torch

from framepack_backend.lora.merge import INT_OF_WIDTH, MergedInPlace, bit_patterns, delta

DTYPES = [torch.float32, torch.bfloat16]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return bit_patterns(tensor.detach()).clone()


def below(value: float, dtype: torch.dtype) -> torch.Tensor:
    """The largest `dtype` number below a positive `value` (one bit pattern down)."""
    exact = torch.tensor([value], dtype=dtype)
    return (bits(exact) - 1).view(dtype)


def hard_weights(dtype: torch.dtype, out: int = 96, features: int = 80, seed: int = 0) -> torch.Tensor:
    """Random weights spread over 2^-24 … 2^4 in magnitude, then the hard cases in the first rows:
    ± powers of two and the numbers just below them, signed zeros and the smallest subnormals."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** torch.randint(-24, 4, (out, features), generator=g).float()
    weight = (torch.randn(out, features, generator=g) * scale).to(dtype)
    powers = [2.0**k for k in range(-12, 4)]
    special = torch.cat([
        torch.tensor(powers, dtype=dtype), -torch.tensor(powers, dtype=dtype),
        torch.cat([below(p, dtype) for p in powers]), -torch.cat([below(p, dtype) for p in powers]),
        torch.tensor([0.0, -0.0, torch.finfo(dtype).tiny, -torch.finfo(dtype).tiny], dtype=dtype),
        (torch.tensor([1, 2, 3], dtype=INT_OF_WIDTH[weight.element_size()])).view(dtype),  # subnormals
    ])
    weight.view(-1)[: special.numel()] = special
    return weight


def factors(shape: torch.Size, rank: int, relative: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (down, up) whose Δ is about `relative` in size, rows of very different scales."""
    out, features = shape
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, features, generator=g)
    up = torch.randn(out, rank, generator=g) * 2.0 ** torch.randint(-20, 2, (out, 1), generator=g).float()
    return down, up * relative / rank**0.5


def merged_and_undone(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> MergedInPlace:
    original = bits(weight)
    expected = (weight.float() + delta(down, up)).to(weight.dtype)
    merged = MergedInPlace(weight, down, up)
    assert torch.equal(bits(weight), bits(expected))  # the merge is round(W + Δ), nothing else
    merged.undo()
    assert torch.equal(bits(weight), original)
    return merged


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strength", [1.0, -1.0, 2.0, -2.0, 0.37])
@pytest.mark.parametrize("relative", [1e-3, 0.05, 1.0])
def test_the_undo_is_bit_identical_for_random_and_boundary_weights(dtype, strength, relative):
    weight = hard_weights(dtype, seed=1)
    down, up = factors(weight.shape, rank=8, relative=relative, seed=2)
    merged = merged_and_undone(weight, down, up * strength)
    kept = merged.kept.numel() / weight.numel()
    assert 0 < kept < 0.6, kept  # the correction is needed, and sparse
    assert merged.kept_at.dtype == torch.int32 and merged.kept.dtype == dtype


@pytest.mark.parametrize("dtype, relative, at_most", [
    (torch.bfloat16, 0.01, 0.02), (torch.float32, 0.01, 0.02),
    (torch.bfloat16, 0.05, 0.06), (torch.float32, 0.05, 0.06),
])
def test_the_correction_is_about_the_relative_size_of_the_change(dtype, relative, at_most):
    """Weights like a model's (one normal scale), Δ of rank 32 with ‖Δ‖ = relative · ‖W‖:
    the kept fraction is what the module docstring states."""
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(512, 512, generator=g) * 0.02).to(dtype)
    down, up = torch.randn(32, 512, generator=g), torch.randn(512, 32, generator=g)
    up *= relative * weight.float().pow(2).mean().sqrt() / delta(down, up).pow(2).mean().sqrt()
    merged = merged_and_undone(weight, down, up)
    assert relative / 4 < merged.kept.numel() / weight.numel() < at_most


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_and_binade_crossings_are_kept(dtype):
    """Δ chosen element by element (down = I makes up·down = up exactly): exact ties (half an
    ulp, rounded to even), near-ties, and steps across the powers of two 1 and 2."""
    ulp = torch.finfo(dtype).eps  # of numbers in [1, 2)
    weight = torch.tensor([[1.0, 1.0 + ulp, 1.0 + 2 * ulp, 2.0 - ulp, 2.0, -1.0, 0.5, 0.0]], dtype=dtype)
    steps = [ulp / 2, ulp / 2, -ulp / 2, ulp / 2, -ulp / 4, -ulp / 2, ulp * 0.75, ulp / 2]
    weight = weight.repeat(len(steps), 1)
    up = torch.tensor(steps).repeat_interleave(weight.shape[1]).view(len(steps), -1)
    up = up * torch.tensor([1.0, 3.0, 0.5, -1.0, 1.25, 2.0, -0.75, 1.5]).view(-1, 1)  # more ties and near-ties
    down = torch.eye(weight.shape[1])
    assert torch.equal(delta(down, up), up.double())
    merged = merged_and_undone(weight, down, up)
    assert merged.kept.numel() >= 4  # e.g. 1 + ulp/2 rounds to 1 (even): 1 − ulp/2 is not 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_zero_delta_keeps_nothing_but_signed_zeros(dtype):
    weight = hard_weights(dtype, seed=3)
    down, up = torch.zeros(4, weight.shape[1]), torch.zeros(weight.shape[0], 4)
    merged = merged_and_undone(weight, down, up)
    negative_zeros = int((bits(weight) == bits(torch.tensor(-0.0, dtype=dtype))).sum())
    assert merged.kept.numel() == negative_zeros == 1  # -0 + 0 = +0: the one element the undo must keep


def test_a_moved_weight_is_not_undone():
    weight = hard_weights(torch.float32, seed=4)
    down, up = factors(weight.shape, rank=4, relative=0.1, seed=5)
    merged = MergedInPlace(weight, down, up)
    weight.data = weight.data.clone()
    with pytest.raises(RuntimeError, match="moved before it was undone"):
        merged.undo()


def test_an_undo_that_misses_says_so_when_the_job_ends(monkeypatch):
    """Should Δ not come out the same twice, the job's end raises instead of leaving changed weights."""
    from framepack_backend.lora import apply, merge

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    original = [bits(layer.weight) for layer in model]
    merged = [MergedInPlace(layer.weight, *factors(layer.weight.shape, rank=2, relative=0.1, seed=i))
              for i, layer in enumerate(model)]
    for merge_ in merged:
        merge_.undo()
    apply._check_restored(merged)  # exact: nothing raised
    assert all(torch.equal(bits(layer.weight), o) for layer, o in zip(model, original))
    assert all(bool(m.restored) for m in merged)

    calls = []

    def drifting_delta(down, up):  # the undo's Δ differs from the merge's
        calls.append(None)
        return (up.double() @ down.double()) * (1.0 if len(calls) == 1 else 1.5)

    monkeypatch.setattr(merge, "delta", drifting_delta)
    layer = model[0]
    off = MergedInPlace(layer.weight, *factors(layer.weight.shape, rank=2, relative=0.1, seed=9))
    off.undo()
    assert not bool(off.restored)
    with pytest.raises(RuntimeError, match="not undone exactly: the base weights changed"):
        apply._check_restored(merged + [off])


def test_after_an_undo_that_misses_the_pipeline_refuses_every_job(tiny_bundle, tmp_path, image, monkeypatch):
    """The job whose undo missed fails, and so does every later one: none runs on changed weights."""
    from framepack_backend.lora import merge
    from framepack_backend.lora.apply import LoraUndoError
    from framepack_backend.lora.folder import LoraFolder
    from framepack_backend.pipeline import Pipeline
    from framepack_backend.request import GenerationRequest
    from tests.test_lora import diffusers_factors, hunyuan_factors, save_diffusers

    save_diffusers(tmp_path / "style.safetensors",
                   diffusers_factors(hunyuan_factors(32, 128, 2, 2, rank=4, seed=5, std=0.5), 32))
    pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu", loras=LoraFolder(tmp_path))

    def request(loras: str) -> GenerationRequest:
        return GenerationRequest.parse(image, "a robot waves", loras_available=pipeline.loras, loras=loras,
                                       resolution=128, steps=2, seconds=1, memory_mode="resident")

    calls: dict[int, int] = {}

    def drifting_delta(down, up):  # each layer's second Δ (the undo's) differs from its first
        key = id(up)
        calls[key] = calls.get(key, 0) + 1
        return (up.double() @ down.double()) * (1.0 if calls[key] == 1 else 1.5)

    monkeypatch.setattr(merge, "delta", drifting_delta)
    with pytest.raises(LoraUndoError, match="not undone exactly"):
        list(pipeline.generate(request("style:1")))
    with pytest.raises(RuntimeError, match="this pipeline no longer runs its model: a LoRA merged into the weights"):
        list(pipeline.generate(request("")))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_on_the_gpu_delta_is_recomputed_bit_identically_and_the_undo_is_exact(dtype):
    """The undo's premise on CUDA: the same GEMM on the same factors gives the same Δ, also
    after other work (other GEMM shapes, allocator churn), at a full-model layer size."""
    g = torch.Generator(device="cuda").manual_seed(6)
    weight = (torch.randn(3072, 12288, device="cuda", generator=g) * 0.02).to(dtype)
    down = torch.randn(32, 12288, device="cuda", generator=g) * 0.01
    up = torch.randn(3072, 32, device="cuda", generator=g) * 0.01
    first = delta(down, up)
    for shape in ((4096, 64), (333, 1000), (3072, 3072)):
        torch.randn(shape, device="cuda") @ torch.randn(shape[1], 512, device="cuda")
    assert torch.equal(bits(delta(down, up)), bits(first))
    merged = merged_and_undone(weight, down, up)
    assert 0 < merged.kept.numel() / weight.numel() < 0.5
