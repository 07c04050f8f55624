"""LoRA per request on the tiny model, fp32 on the CPU: the formula per layer, strengths,
several LoRAs, every key convention against the PEFT file, bad files and names, and the
base model untouched after a LoRA job (resident and stream)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framepack_backend.events import GenerationResult, StepProgress
from framepack_backend.lora.apply import FORMS, job_loras, lora_targets, loras_applied
from framepack_backend.lora.choices import LoraChoice, parse_lora_choices
from framepack_backend.lora.folder import LoraFolder
from framepack_backend.lora.formats import LoraFileError, read_lora
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SettingsError
from framepack_backend.testing.lora_files import (
    diffusers_factors,
    hunyuan_factors,
    save_diffusers,
    save_hunyuan,
    save_kohya,
)
from tests.test_transformer_parity import TINY, build_pair, section_inputs

DIM = TINY["num_attention_heads"] * TINY["attention_head_dim"]
MLP = int(DIM * TINY["mlp_ratio"])
RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2


def original(seed: int):
    return hunyuan_factors(DIM, MLP, TINY["num_layers"], TINY["num_single_layers"], RANK, seed=seed)


@pytest.fixture(scope="module")
def model():
    return build_pair(TINY, seed=1)[1]


@pytest.fixture(scope="module")
def inputs():
    return section_inputs(1, 3, 8, 8, 1, [7], 7, seed=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The same factors in every convention, plus a second LoRA and broken files."""
    path = tmp_path_factory.mktemp("loras")
    first, second = original(seed=10), original(seed=11)
    save_diffusers(path / "peft.safetensors", diffusers_factors(first, DIM), alpha=ALPHA)
    save_diffusers(path / "peft_scale1.safetensors", diffusers_factors(first, DIM))
    save_diffusers(path / "second.safetensors", diffusers_factors(second, DIM))
    save_hunyuan(path / "hunyuan.safetensors", first)
    save_kohya(path / "kohya.safetensors", diffusers_factors(first, DIM), alpha=ALPHA)
    save_kohya(path / "kohya_hunyuan.safetensors", first, alpha=ALPHA)
    a, b = torch.randn(RANK, DIM), torch.randn(DIM, RANK)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
               "transformer.transformer_blocks.0.attn.to_q.dora_scale": b[:, 0].clone()},
              str(path / "unknown_key.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(DIM + 1, RANK)},
              str(path / "bad_shape.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
               "lora_unet_transformer_blocks_0_attn_to_k.lora_down.weight": a.clone(),
               "lora_unet_transformer_blocks_0_attn_to_k.lora_up.weight": b.clone()}, str(path / "mixed.safetensors"))
    save_file({"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": b}, str(path / "no_such_layer.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a}, str(path / "half.safetensors"))
    (path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    (path / "pickle.pt").write_bytes(b"not allowed")
    return LoraFolder(path)


def forward(model, inputs, loras=(), folder=None):
    choices = [LoraChoice(name, strength) for name, strength in loras]
    with torch.inference_mode(), job_loras(model, folder, choices, torch.device("cpu"), torch.float32):
        return model(**inputs)


def test_strength_zero_is_bit_identical_and_the_model_is_unchanged_after(model, inputs, folder):
    before = forward(model, inputs)
    with_lora = forward(model, inputs, [("peft", 0.7)], folder)
    assert not torch.equal(with_lora, before)
    lora = folder.load("peft", lora_targets(model))
    with torch.inference_mode(), loras_applied(model, [(lora, 0.7)], torch.device("cpu"), torch.float32, "unmerged"):
        unmerged = model(**inputs)
    assert float((unmerged - with_lora).abs().max()) <= 1e-5  # the two forms agree
    assert torch.equal(forward(model, inputs, [("peft", 0.0)], folder), before)
    assert torch.equal(forward(model, inputs), before)  # hooks gone, weights never written
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("strength", [1.0, -0.5])
def test_every_adapted_layer_computes_w_x_plus_s_alpha_over_r_b_a_x(model, folder, strength, form):
    targets = lora_targets(model)
    lora = folder.load("peft", targets)
    factors = diffusers_factors(original(seed=10), DIM)
    assert set(lora.layers) == set(factors) and len(factors) == 14 * 2 + 6 * 2  # every linear of the blocks
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    weights = {name: module.weight.clone() for name, module in modules.items() if name in factors}
    with torch.inference_mode(), loras_applied(model, [(lora, strength)], torch.device("cpu"), torch.float32,
                                               form) as n:
        assert n.layers == len(factors)
        for name, (a, b) in factors.items():
            layer = modules[name]
            x = torch.randn(2, 5, layer.in_features, generator=g)
            expected = (x.double() @ weights[name].double().t() + layer.bias.double()  # W before the LoRA
                        + strength * (ALPHA / RANK) * (x.double() @ a.double().t()) @ b.double().t())
            worst = max(worst, float((layer(x).double() - expected).abs().max()))
    assert worst <= 1e-5, worst
    assert all(torch.equal(modules[name].weight, weight) for name, weight in weights.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("fail_at", ["block", "merge"])
def test_an_error_while_merged_once_restores_every_weight_bit_for_bit(model, folder, monkeypatch, fail_at):
    """An error inside the job, or while merging the 6th layer: every layer merged so far is undone."""
    from framepack_backend.lora import apply

    lora = folder.load("peft", lora_targets(model))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    merges = []

    def failing_merge(*args):
        if fail_at == "merge" and len(merges) == 5:
            raise RuntimeError("out of memory")
        merges.append(apply_merge(*args))
        return merges[-1]

    apply_merge = apply.MergedInPlace
    monkeypatch.setattr(apply, "MergedInPlace", failing_merge)
    with pytest.raises(RuntimeError, match="out of memory"):
        with loras_applied(model, [(lora, 2.0)], torch.device("cpu"), torch.float32, "merged_once") as adapted:
            assert adapted.merged_elements == sum(p.numel() for name, p in model.named_parameters()
                                                  if name.removesuffix(".weight") in lora.layers)
            assert 0 < adapted.kept_elements < adapted.merged_elements / 2  # a large change here: ~18 %
            assert adapted.kept_bytes == adapted.kept_elements * (4 + 4)  # int32 index, fp32 value
            raise RuntimeError("out of memory")
    assert len(merges) == (5 if fail_at == "merge" else len(lora.layers))
    assert all(torch.equal(p.view(torch.int32), before[name].view(torch.int32)) for name, p in model.named_parameters())


def test_two_loras_add_up(model, folder):
    targets = lora_targets(model)
    layer = dict(model.named_modules())["single_transformer_blocks.1.proj_out"]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base = layer(x)
        deltas = []
        for name, s in (("peft", 0.6), ("second", -1.3)):
            with loras_applied(model, [(folder.load(name, targets), s)], torch.device("cpu"), torch.float32):
                deltas.append(layer(x) - base)
        both = [(folder.load("peft", targets), 0.6), (folder.load("second", targets), -1.3)]
        with loras_applied(model, both, torch.device("cpu"), torch.float32):
            together = layer(x) - base
    assert float((together - deltas[0] - deltas[1]).abs().max()) <= 1e-5


@pytest.mark.parametrize("name, reference", [
    ("kohya", "peft"),  # musubi-tuner FramePack: our module names, flattened, alpha
    ("kohya_hunyuan", "peft"),  # musubi-tuner HunyuanVideo: original names, fused q/k/v and linear1, alpha
    ("hunyuan", "peft_scale1"),  # original layout, no alpha
])
def test_each_key_convention_gives_the_peft_file_s_result(model, inputs, folder, name, reference):
    targets = lora_targets(model)
    got, expected = folder.load(name, targets), folder.load(reference, targets)
    assert got.format == {"kohya_hunyuan": "kohya"}.get(name, name) and expected.format == "diffusers"
    assert set(got.layers) == set(expected.layers)
    for module in got.layers:
        assert torch.equal(got.layers[module].down, expected.layers[module].down), module
        assert float((got.layers[module].up - expected.layers[module].up).abs().max()) <= 1e-6, module
    difference = forward(model, inputs, [(name, 0.8)], folder) - forward(model, inputs, [(reference, 0.8)], folder)
    assert float(difference.abs().max()) <= 1e-5


@pytest.mark.parametrize("name, key, reason", [
    ("unknown_key", "transformer.transformer_blocks.0.attn.to_q.dora_scale", "not a LoRA key"),
    ("bad_shape", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "up (B)"),
    ("mixed", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "one convention"),
    ("no_such_layer", "transformer.transformer_blocks.9.attn.to_q.lora_A.weight", "not a linear layer"),
    ("half", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "half of a pair"),
    ("garbage", None, "not a readable safetensors file"),
])
def test_a_file_the_model_cannot_use_is_refused_naming_the_file_and_the_first_bad_key(model, folder, name, key,
                                                                                     reason):
    with pytest.raises(LoraFileError) as error:
        read_lora(folder.path / f"{name}.safetensors", name, lora_targets(model))
    assert error.value.file == f"{name}.safetensors" and error.value.key == key and reason in error.value.reason
    with pytest.raises(SettingsError) as refused:  # through the job's entry: the request's fault
        forward(model, {}, [(name, 1.0)], folder)
    assert refused.value.field == "loras" and f"{name}.safetensors" in str(refused.value)
    assert all(not m._forward_hooks for m in model.modules())


def test_mixed_is_reported_at_the_first_key_of_the_other_convention(folder):
    with pytest.raises(LoraFileError) as error:
        read_lora(folder.path / "mixed.safetensors", "mixed", {})
    # sorted keys: the kohya key sorts first, so the PEFT key is the odd one
    assert "lora_unet_" not in error.value.key and "kohya" in error.value.reason


def test_names_are_checked_against_the_folder_and_never_paths(folder, image=np.zeros((64, 64, 3), np.uint8)):
    assert parse_lora_choices("peft:0.5, second", folder) == (LoraChoice("peft", 0.5), LoraChoice("second", 1.0))
    assert parse_lora_choices("peft.safetensors:-2", folder) == (LoraChoice("peft", -2.0),)
    request = GenerationRequest.parse(image, "p", loras_available=folder, loras="kohya:0.25")
    assert request.loras == (LoraChoice("kohya", 0.25),)
    assert GenerationRequest.parse(image, "p").loras == ()
    bad = ["../peft", "sub/peft", "/etc/passwd", "..", ".hidden", "a\\b", "missing", "peft:3", "peft:nan",
           "peft:x", "peft,peft", "pickle", ",".join(["peft"] * 9)]
    for value in bad:
        with pytest.raises(SettingsError) as error:
            GenerationRequest.parse(image, "p", loras_available=folder, loras=value)
        assert error.value.field == "loras", value
    with pytest.raises(SettingsError, match="without a LoRA folder"):
        GenerationRequest.parse(image, "p", loras="peft")


def test_describe_lists_name_size_rank_and_format(folder):
    listing = {entry["name"]: entry for entry in folder.describe()}
    assert "pickle" not in listing
    assert {k: listing["kohya_hunyuan"][k] for k in ("format", "rank")} == {"format": "kohya", "rank": RANK}
    assert listing["hunyuan"]["format"] == "hunyuan" and listing["peft"]["format"] == "diffusers"
    assert listing["peft"]["size_bytes"] == (folder.path / "peft.safetensors").stat().st_size
    assert listing["garbage"]["format"] == "unreadable"
    json.dumps(listing)


def test_the_cache_is_bounded_by_bytes_least_recently_used_out(model, folder):
    targets = lora_targets(model)
    one = folder.load("peft", targets).nbytes
    small = LoraFolder(folder.path, cache_bytes=2 * one)
    first = small.load("peft", targets)
    assert small.load("peft", targets) is first  # cached: not parsed again
    small.load("second", targets)
    small.load("peft", targets)  # peft is now the most recent
    small.load("kohya", targets)
    assert small.cached_names() == ["peft", "kohya"]


# ------------------------------------------------------------------ the pipeline, end to end on the CPU


@pytest.fixture(scope="module")
def pipeline(tiny_bundle, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("pipeline_loras")
    dim = 32  # the tiny bundle's transformer: 2 heads × 16
    factors = hunyuan_factors(dim, 4 * dim, 2, 2, rank=4, seed=5, std=0.5)
    save_diffusers(lora_dir / "style.safetensors", diffusers_factors(factors, dim))
    return Pipeline.from_pretrained(tiny_bundle, device="cpu", loras=LoraFolder(lora_dir))


@pytest.mark.parametrize("memory_mode", ["resident", "stream"])
def test_a_job_after_a_lora_job_is_bit_identical_to_one_before(pipeline, image, memory_mode):
    def frames(loras=""):
        request = GenerationRequest.parse(image, "a robot waves", loras_available=pipeline.loras, loras=loras,
                                          resolution=128, steps=3, seconds=1, memory_mode=memory_mode)
        result = list(pipeline.generate(request))[-1]
        assert isinstance(result, GenerationResult) and result.settings["memory_mode"] == memory_mode
        last_settings.clear()
        last_settings.update(result.settings)
        return result.frames

    last_settings: dict = {}

    before = frames()
    with_lora = frames("style:1.5")
    assert last_settings["loras"] == "style:1.5"
    assert np.abs(with_lora.astype(int) - before.astype(int)).max() > 0
    assert np.array_equal(frames("style:0"), before)
    assert np.array_equal(frames(), before)


@pytest.mark.parametrize("memory_mode, form", [("resident", "merged_once"), ("stream", "merged")])
def test_a_resident_job_merges_once_and_a_cancelled_job_restores_every_weight_bit_for_bit(pipeline, image,
                                                                                          memory_mode, form):
    """Mid-job, after the first step: resident weights hold W + Δ with no hooks left on the
    layers (the fused paths stay on), streamed ones are untouched with a per-call swap on
    every adapted layer. Closing the job there (a cancel) leaves every parameter as it was."""
    transformer = pipeline.components.transformer
    request = GenerationRequest.parse(image, "a robot waves", loras_available=pipeline.loras, loras="style:1.5",
                                      resolution=128, steps=3, seconds=1, memory_mode=memory_mode)
    list(pipeline.generate(dataclasses.replace(request, loras=())))  # place the weights for this mode
    before = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    adapted = set(pipeline.loras.load("style", lora_targets(transformer)).layers)
    events = pipeline.generate(request)
    next(event for event in events if isinstance(event, StepProgress))
    changed = {name.removesuffix(".weight") for name, p in transformer.named_parameters()
               if not torch.equal(p, before[name])}
    hooked = {name for name, m in transformer.named_modules() if m._forward_pre_hooks}
    if form == "merged_once":
        assert changed == adapted and not hooked & adapted
    else:
        assert not changed and adapted <= hooked  # (stream also hooks its blocks, to copy them in)
    events.close()
    assert all(torch.equal(p.view(torch.int32), before[name].view(torch.int32))
               for name, p in transformer.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in transformer.modules())


HOPPER = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                            reason="needs a Hopper GPU (row-wise scaled FP8 GEMM)")


@pytest.mark.parametrize("device, fused_kernels", [
    ("cpu", False),  # torch's CPU FP8 GEMM takes row-wise scales too
    pytest.param("cuda", False, marks=[pytest.mark.gpu, HOPPER]),
    pytest.param("cuda", True, marks=[pytest.mark.gpu, HOPPER]),
])
def test_fp8_layers_take_the_low_rank_path_and_are_unchanged_after(tmp_path, device, fused_kernels):
    """FP8 blocks (eager, and fused on the GPU): with the LoRA, the FP8 model is as close to
    the bf16 model with the LoRA as the FP8 base is to the bf16 base (the LoRA adds no error
    of its own), and a forward after the LoRA is bit-identical to one before.

    The LoRA's change alone is not compared: it is about 15 % of the output here, so the FP8
    base's own 4–5 % error is about a quarter of it whether or not the LoRA path is exact."""
    from tests.test_transformer_fast_paths import GPU_CONFIG, bf16, gpu_inputs

    dim = GPU_CONFIG["num_attention_heads"] * GPU_CONFIG["attention_head_dim"]
    factors = hunyuan_factors(dim, int(dim * GPU_CONFIG["mlp_ratio"]), GPU_CONFIG["num_layers"],
                              GPU_CONFIG["num_single_layers"], rank=8, seed=4, std=0.05)
    save_diffusers(tmp_path / "gpu.safetensors", diffusers_factors(factors, dim))
    model = build_pair(GPU_CONFIG, seed=6)[1].to(device).bfloat16()
    model.set_fused_kernels(fused_kernels)
    if device == "cuda":
        inputs = bf16(gpu_inputs())
    else:  # fewer tokens: the CPU's GEMMs are slow
        inputs = section_inputs(1, 3, 16, 16, 2, [20], 20, seed=3)
        inputs = bf16(dict(inputs, encoder_hidden_states=torch.randn(1, 20, 256), image_embeds=torch.randn(1, 16, 64)))
    lora = [(LoraFolder(tmp_path).load("gpu", lora_targets(model)), 1.0)]
    device = torch.device(device)
    with torch.no_grad():
        bf16_base, bf16_with = _with_and_without(model, inputs, lora, device)
        model.quantize_fp8()
        fp8_base, fp8_with = _with_and_without(model, inputs, lora, device)
        after = model(**inputs).float()
    assert torch.equal(fp8_base, after)
    base_error = _relative(fp8_base, bf16_base)
    # A LoRA missing from the FP8 layers would leave an error near its whole change.
    assert _relative(bf16_with, bf16_base) > 2 * base_error
    assert _relative(fp8_with, bf16_with) <= 1.25 * base_error, (_relative(fp8_with, bf16_with), base_error)


@pytest.mark.gpu
@pytest.mark.parametrize("fast_path", ["eager", "fused_kernels", "cuda_graphs"])
def test_on_the_gpu_the_merge_once_agrees_with_the_per_call_merge_and_is_undone_bit_for_bit(tmp_path, fast_path):
    """bf16 on the GPU with the resident fast paths (the fused GEMM epilogues, which the merged
    layers keep; CUDA graphs captured before the merge, which replay the merged weights in
    place): merged_once differs from the per-call merge only by the rounding of W + B·A (far
    below the LoRA's change), and the forward after it is bit-identical to the one before."""
    from tests.test_transformer_fast_paths import GPU_CONFIG, bf16, gpu_inputs

    dim = GPU_CONFIG["num_attention_heads"] * GPU_CONFIG["attention_head_dim"]
    factors = hunyuan_factors(dim, int(dim * GPU_CONFIG["mlp_ratio"]), GPU_CONFIG["num_layers"],
                              GPU_CONFIG["num_single_layers"], rank=8, seed=4, std=0.05)
    save_diffusers(tmp_path / "gpu.safetensors", diffusers_factors(factors, dim))
    model = build_pair(GPU_CONFIG, seed=6)[1].cuda().bfloat16()
    model.set_fused_kernels(fast_path != "eager")
    inputs = bf16(gpu_inputs())
    lora = [(LoraFolder(tmp_path).load("gpu", lora_targets(model)), 1.0)]
    device = torch.device("cuda")
    with torch.no_grad():
        per_call_base, per_call = _with_and_without(model, inputs, lora, device)
        model.enable_cuda_graphs(fast_path == "cuda_graphs")
        base = model(**inputs).float()  # captures the graph, on the base weights
        with loras_applied(model, lora, device, torch.bfloat16, "merged_once") as adapted:
            assert adapted.kept_elements > 0
            once = model(**inputs).float()
        after = model(**inputs).float()
    assert torch.equal(after, base)
    change = _relative(per_call, per_call_base)
    assert change > 0.05
    assert _relative(once, per_call) < 0.1 * change, (_relative(once, per_call), change)


def _with_and_without(model, inputs, loras, device):
    base = model(**inputs).float()
    with loras_applied(model, loras, device, torch.bfloat16):
        return base, model(**inputs).float()


def _relative(got, expected):
    return float((got - expected).norm() / expected.norm())


def test_the_instance_reads_its_lora_folder_from_the_launcher(tmp_path):
    from framepack_server.instance import InstanceConfig, InstanceConfigError, InstanceOverrides
    from tests.test_server_jobs import triton_args

    args = triton_args(model_dir=str(tmp_path), lora_dir="")
    assert InstanceConfig.from_triton(args, {}).lora_dir is None
    env = InstanceOverrides(lora_dir=str(tmp_path)).environment()
    assert env == {"FRAMEPACK_LORA_DIR": str(tmp_path)}
    assert InstanceConfig.from_triton(args, env).lora_dir == tmp_path
    with pytest.raises(InstanceConfigError, match="lora_dir"):
        InstanceConfig.from_triton(args, {"FRAMEPACK_LORA_DIR": str(tmp_path / "missing")})


def test_the_web_ui_offers_a_slider_per_lora_and_sends_those_not_at_zero(tmp_path):
    import gradio as gr

    from client.webui import build_app, lora_parameter
    from framepack_server.protocol import describe_response
    from framepack_wire import event_from_json

    assert lora_parameter({"a": 0, "b": 0.5, "c": -1.25}) == "b:0.5,c:-1.25"
    assert lora_parameter({"a": 0.0}) == ""
    listing = [{"name": "style", "size_bytes": 10, "rank": 32, "format": "kohya"}]
    description = event_from_json(describe_response(listing).event)
    assert description.loras == listing
    app = build_app("localhost:1", description, tmp_path)
    sliders = [block for block in app.blocks.values() if isinstance(block, gr.Slider) and block.label == "style"]
    assert len(sliders) == 1 and (sliders[0].minimum, sliders[0].maximum, sliders[0].value) == (-2, 2, 0)
