"""Memory modes: the mode choice, the block-streaming schedule, streamed = resident outputs, offload phases."""

import dataclasses
import gc

import numpy as np
import pytest
import torch

from framepack_backend.memory import (
    Acquire,
    BlockStreamer,
    ComponentWeights,
    DecodePlan,
    MemoryFootprint,
    Prefetch,
    Release,
    Restart,
    RingSchedule,
    StreamPlan,
    available_host_bytes,
    choose_memory_mode,
    memory_needed,
    peak_memory,
    plan_decode,
    plan_stream,
    streamable_blocks,
)
from framepack_backend.memory.footprint import (
    ENCODE_BYTES_PER_PIXEL,
    GIB,
    SAMPLING_HIDDEN_STATES,
    TEXT_WORK_BYTES,
    VAE_TILE_PIXELS,
    decode_work_bytes,
    sampling_tokens,
)
from framepack_backend.memory.modes import stream_sampling_bytes
from framepack_backend.models.transformer import FramePackTransformer, TransformerConfig
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SettingsError
from framepack_backend.teacache import TeaCache

request = GenerationRequest.parse  # image, prompt, **settings

# ----------------------------------------------------------------- mode choice

# Parameter counts of the public models (counted from their configs on the meta device):
# HunyuanVideo's Llama-3-8B text encoder (32 layers), CLIP-L text, SigLIP so400m, the
# HunyuanVideo VAE, and the FramePack transformer (20 dual- then 40 single-stream blocks).
LLAMA, LLAMA_LAYER, CLIP, SIGLIP, VAE = 7_504_924_672, 218_112_000, 123_060_480, 428_225_600, 246_478_803
TRANSFORMER, DUAL_BLOCK, SINGLE_BLOCK = 12_874_314_816, 339_831_296, 141_591_808
FULL_TRANSFORMER = TransformerConfig(
    num_layers=20, num_single_layers=40, has_image_proj=True, has_clean_x_embedder=True
)


def full_model_at_640() -> MemoryFootprint:
    """The real model (fp16 encoders, bf16 transformer) at the 640 bucket, window 9."""
    tokens = sampling_tokens(FULL_TRANSFORMER, 640, 640, 9)
    return MemoryFootprint(
        component_bytes={"text_encoder": 2 * LLAMA, "text_encoder_2": 2 * CLIP, "image_encoder": 2 * SIGLIP,
                         "vae": 2 * VAE, "transformer": 2 * TRANSFORMER},
        block_bytes={"text_encoder": (2 * LLAMA_LAYER,) * 32,
                     "transformer": (2 * DUAL_BLOCK,) * 20 + (2 * SINGLE_BLOCK,) * 40},
        work_bytes={"text": TEXT_WORK_BYTES, "image": ENCODE_BYTES_PER_PIXEL * 640 * 640,
                    "sampling": SAMPLING_HIDDEN_STATES * tokens * FULL_TRANSFORMER.inner_dim * 2,
                    "decode": decode_work_bytes(640, 640, 9, tiled=False)},
        tiled_work_bytes={"image": ENCODE_BYTES_PER_PIXEL * VAE_TILE_PIXELS,
                          "decode": decode_work_bytes(640, 640, 9, tiled=True)},
    )


def test_sampling_tokens_at_the_640_bucket_match_the_measured_sequence():
    # 18,400 latent tokens (noisy + 1x/2x/4x context, shared/GPU.md) + 729 image + 256 text slots.
    assert sampling_tokens(FULL_TRANSFORMER, 640, 640, 9) == 18_400 + 729 + 256


@pytest.mark.parametrize(
    "budget_gib, preserve_gb, expected",
    [
        (6, 0, "stream"),
        (8, 0, "stream"),
        (12, 0, "stream"),
        (24, 0, "stream"),
        (32, 0, "offload"),  # the transformer alone (24 GiB) + activations fits; everything at once does not
        (80, 0, "resident"),
        (80, 6, "resident"),  # the default preservation still leaves 74 GiB
        (80, 20, "offload"),
        (30, 6, "stream"),
    ],
)
def test_auto_picks_the_fastest_mode_that_fits(budget_gib, preserve_gb, expected):
    footprint = full_model_at_640()
    mode = choose_memory_mode("auto", budget_gib * GIB, preserve_gb, footprint)
    assert mode == expected
    budget = budget_gib * GIB - preserve_gb * GIB
    faster = ("resident", "offload", "stream")[: ("resident", "offload", "stream").index(mode)]
    assert all(memory_needed(m, footprint) > budget for m in faster)
    if mode != "stream":
        assert memory_needed(mode, footprint) <= budget


def test_the_decode_runs_whole_when_it_fits_tiled_when_only_that_fits_and_nowhere_below():
    f = full_model_at_640()
    whole, tiles = decode_work_bytes(640, 640, 9, tiled=False), decode_work_bytes(640, 640, 9, tiled=True)
    vae = f.component_bytes["vae"]
    # offload: the VAE's weights beside the decode; resident: every weight stays on the GPU
    assert plan_decode("offload", f, vae + whole, True, whole, tiles) == DecodePlan(
        False, True, vae + whole, vae + whole, vae + whole)
    assert plan_decode("offload", f, vae + whole - 1, True, whole, tiles).tiled
    assert plan_decode("resident", f, vae + whole, True, whole, tiles) == DecodePlan(
        True, False, f.weights + tiles, f.weights + whole, vae + whole)
    refused = plan_decode("offload", f, vae + tiles - 1, True, whole, tiles)
    assert (refused.tiled, refused.fits, refused.needed_bytes) == (True, False, vae + tiles)
    # a CPU: the weights are already out of MemAvailable
    assert not plan_decode("resident", f, whole, False, whole, tiles).tiled
    # stream mode always tiles; unknown memory (None) checks nothing
    assert plan_decode("stream", f, 10 * whole, True, whole, tiles).tiled
    assert plan_decode("resident", f, None, False, whole, tiles) == DecodePlan(False, True, whole, whole, None)
    # the untiled estimate at 640 is the measured 22.6–23 GiB; tiles need a fraction
    assert 22 * GIB < whole < 25 * GIB and tiles < 5 * GIB


def test_a_job_s_loras_count_in_its_sampling_and_decode_phases_in_each_mode():
    plain = full_model_at_640()
    loras = {"resident": 3 * GIB, "offload": 2 * GIB, "stream": GIB}  # lora/footprint.py's per mode
    with_loras = dataclasses.replace(plain, lora_bytes=loras)
    for mode in ("resident", "offload"):  # their peaks are in the sampling or the decode phase
        assert memory_needed(mode, with_loras) == memory_needed(mode, plain) + loras[mode]
    just_resident = memory_needed("resident", plain)
    assert choose_memory_mode("auto", just_resident, 0, plain) == "resident"
    assert choose_memory_mode("auto", just_resident, 0, with_loras) == "offload"
    budget = 12 * GIB  # streaming: the LoRAs take the room of some resident blocks
    assert plan_stream(budget, with_loras).resident_blocks < plan_stream(budget, plain).resident_blocks
    assert stream_sampling_bytes(with_loras, plan_stream(budget, with_loras)) <= budget
    whole, tiles = decode_work_bytes(640, 640, 9, tiled=False), decode_work_bytes(640, 640, 9, tiled=True)
    vae = plain.component_bytes["vae"]
    assert not plan_decode("offload", plain, vae + whole, True, whole, tiles).tiled
    assert plan_decode("offload", with_loras, vae + whole, True, whole, tiles).tiled
    assert plan_decode("offload", with_loras, vae + whole + 2 * GIB, True, whole, tiles) == DecodePlan(
        False, True, vae + whole + 2 * GIB, vae + whole + 2 * GIB, vae + whole + 2 * GIB)
    # on a CPU the LoRAs are allocated after MemAvailable was read, so they count there too
    assert plan_decode("resident", with_loras, None, False, whole, tiles).needed_bytes == whole + 3 * GIB


def test_available_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   23000000 kB\n")
    assert available_host_bytes(meminfo) == 23_000_000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert available_host_bytes(meminfo) is None
    assert available_host_bytes(tmp_path / "missing") is None


def test_stream_mode_fits_a_6_gib_card_with_the_whole_job():
    assert memory_needed("stream", full_model_at_640()) <= 6 * GIB


def test_an_explicit_mode_overrides_the_choice_and_bad_values_name_the_field():
    footprint = full_model_at_640()
    assert choose_memory_mode("resident", 6 * GIB, 6.0, footprint) == "resident"
    assert choose_memory_mode("stream", 80 * GIB, 0.0, footprint) == "stream"
    # Options and overrides were checked when parsed: a bad value here is the engine's bug, not the client's.
    with pytest.raises(ValueError, match="memory_mode='fast'.*'auto', 'resident', 'offload', 'stream'") as caught:
        choose_memory_mode("fast", 80 * GIB, 0.0, footprint)
    assert not isinstance(caught.value, SettingsError)
    with pytest.raises(ValueError, match="gpu_memory_preservation=-1") as caught:
        choose_memory_mode("auto", 80 * GIB, -1.0, footprint)
    assert not isinstance(caught.value, SettingsError)


def test_larger_budgets_keep_more_blocks_resident_and_each_plan_is_the_largest_that_fits():
    footprint = full_model_at_640()
    blocks = len(footprint.block_bytes["transformer"])
    previous = -1
    for budget_gib in (6, 8, 12, 24):
        budget = budget_gib * GIB
        plan = plan_stream(budget, footprint)
        assert plan.slots == 3
        assert stream_sampling_bytes(footprint, plan) <= budget
        if plan.resident_blocks < blocks:
            assert stream_sampling_bytes(footprint, StreamPlan(plan.slots, plan.resident_blocks + 1)) > budget
        assert plan.resident_blocks > previous
        previous = plan.resident_blocks
    assert plan_stream(2 * GIB, footprint) == StreamPlan(slots=2, resident_blocks=0)  # nothing fits: smallest ring


# ------------------------------------------------------------- streaming schedule


def test_ring_schedule_prefetches_ahead_and_refills_a_slot_only_after_its_reader():
    schedule = RingSchedule(blocks=3, slots=2)
    steps = []
    for block in [0, 1, 2, 0, 1]:  # a forward of three blocks, then the start of the next
        steps.append(schedule.enter(block))
        steps.append(schedule.exit(block))
    assert steps == [
        [Restart(None), Prefetch(0, 0, None), Prefetch(1, 1, None), Acquire(0, 0)],
        [Release(0, 0)],
        [Prefetch(2, 0, after=0), Acquire(1, 1)],
        [Release(1, 1)],
        [Prefetch(0, 1, after=1), Acquire(2, 0)],  # the end of a forward prefetches the next one's start
        [Release(2, 0)],
        [Prefetch(1, 0, after=2), Acquire(0, 1)],
        [Release(0, 1)],
        [Prefetch(2, 1, after=0), Acquire(1, 0)],
        [Release(1, 0)],
    ]


def test_ring_schedule_reentry_is_free_and_out_of_order_blocks_restart_the_ring():
    schedule = RingSchedule(blocks=4, slots=3)
    schedule.enter(0)
    assert schedule.enter(0) == []  # a sub-module of the acquired block asks again
    # An error cut the forward short: the next one starts at block 0 while block 0 is still held.
    assert schedule.enter(2)[0] == Restart(abandoned=0)
    assert schedule.current == 2
    with pytest.raises(RuntimeError, match="block 1 finished but block 2"):
        schedule.exit(1)
    with pytest.raises(ValueError, match="block=4"):
        schedule.enter(4)
    assert RingSchedule(blocks=2, slots=5).slots == 2


# ---------------------------------------------------------- a tiny model, streamed

TINY = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=3,
    num_single_layers=4, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=24, pooled_projection_dim=12,
    rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=20, has_clean_x_embedder=True,
)


def tiny_transformer(seed: int = 0) -> FramePackTransformer:
    torch.manual_seed(seed)
    model = FramePackTransformer(**TINY).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # no weight at a neutral value (norm scales are ones)
    return model


def tiny_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    start, noisy, clean_1x, history_2x, history_4x = torch.arange(1 + 2 + 1 + 2 + 16).split([1, 2, 1, 2, 16])
    return dict(
        hidden_states=rand(1, 4, 2, 4, 6), timestep=torch.tensor([700.0]), encoder_hidden_states=rand(1, 5, 24),
        encoder_attention_mask=None, pooled_projections=rand(1, 12), image_embeds=rand(1, 3, 20),
        indices_latents=noisy, guidance=torch.tensor([10000.0]), latents_clean=rand(1, 4, 2, 4, 6),
        indices_latents_clean=torch.cat([start, clean_1x]), latents_history_2x=rand(1, 4, 2, 4, 6),
        indices_latents_history_2x=history_2x, latents_history_4x=rand(1, 4, 16, 4, 6),
        indices_latents_history_4x=history_4x,
    )


def log_compute(blocks, log):
    """Hooks that log when each block's compute begins and ends (registered after the streamer's)."""
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=index: log.append(("compute", i))))
        # prepend: the end of compute is logged before the streamer's own post-hook releases the slot.
        handles.append(block.register_forward_hook(lambda m, a, o, i=index: log.append(("done", i)), prepend=True))
    return handles


@pytest.mark.parametrize("slots", [2, 3])
def test_streamed_forwards_follow_the_ring_schedule_and_equal_resident_bit_for_bit(slots):
    model = tiny_transformer()
    inputs = [tiny_inputs(seed) for seed in (1, 2)]
    with torch.inference_mode():
        expected = [model(**x) for x in inputs]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    weights = ComponentWeights(model, "cpu", streamable_blocks(model))
    blocks = streamable_blocks(model)
    log: list = []
    with BlockStreamer(weights.blocks, "cpu", slots=slots, trace=log):
        handles = log_compute(blocks, log)
        with torch.inference_mode():
            got = [model(**x) for x in inputs]
        for h in handles:
            h.remove()

    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    n = len(blocks)
    computes = [i for i, e in enumerate(log) if isinstance(e, tuple) and e[0] == "compute"]
    assert [log[i][1] for i in computes] == list(range(n)) * 2
    for position in computes:
        k = log[position][1]
        before = log[:position]
        assert isinstance(before[-1], Acquire) and before[-1].block == k  # the compute waits for its own copy
        # Block k+1 (cyclically: the next forward's first block) is copied in since its last compute.
        following = (k + 1) % n
        prefetched = [i for i, e in enumerate(before) if isinstance(e, Prefetch) and e.block == following]
        last_done = max([i for i, e in enumerate(before) if e == ("done", following)], default=-1)
        assert prefetched and prefetched[-1] > last_done
    for position, event in enumerate(log):
        if isinstance(event, Prefetch) and event.after is not None:
            # A slot is refilled only after the compute that read it finished and released it.
            earlier = log[:position]
            assert ("done", event.after) in earlier and Release(event.after, event.slot) in earlier
            last_done = max(i for i, e in enumerate(earlier) if e == ("done", event.after))
            assert Release(event.after, event.slot) in earlier[last_done:]
    held = most = 0
    for event in log:
        held += isinstance(event, Prefetch) - isinstance(event, Release)
        most = max(most, held)
    assert most == slots  # the ring is full while streaming, never over
    assert sum(isinstance(e, Restart) for e in log) == 1  # only the very first block starts the ring
    # Afterwards every block reads its host copy again, unchanged.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    host = [(b.host.data_ptr(), b.host.data_ptr() + b.nbytes) for b in weights.blocks]
    for (lo, hi), block in zip(host, blocks):
        assert all(lo <= p.data_ptr() < hi for p in block.parameters())


def test_teacache_reading_the_first_block_before_it_runs_streams_too():
    """The TeaCache signal calls the first block's norm1 directly; its sub-module hook fetches the block."""
    model = tiny_transformer(seed=3)
    inputs = tiny_inputs(4)

    def run_steps():
        cache = TeaCache(0.5, steps=4)
        outs = []
        for step in range(4):
            cache.begin_step(step)
            x = dict(inputs, hidden_states=inputs["hidden_states"] * (1 + 0.001 * step))
            outs.append(model(**x, teacache=cache))
        return outs, cache.skipped_steps

    with torch.inference_mode():
        expected, skipped = run_steps()
    assert skipped > 0  # the streamed run must go through skipped steps too
    weights = ComponentWeights(model, "cpu", streamable_blocks(model))
    with weights.streamed(slots=2), torch.inference_mode():
        got, skipped_streamed = run_steps()
    assert skipped_streamed == skipped
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_forward_cut_short_by_an_error_restarts_the_ring_and_the_next_one_is_exact():
    model = tiny_transformer(seed=8)
    inputs = tiny_inputs(9)
    with torch.inference_mode():
        expected = model(**inputs)
    weights = ComponentWeights(model, "cpu", streamable_blocks(model))
    failing = model.single_transformer_blocks[1]

    def fail(module, args):
        raise RuntimeError("out of memory (simulated)")

    log: list = []
    with BlockStreamer(weights.blocks, "cpu", slots=3, trace=log), torch.inference_mode():
        handle = failing.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="simulated"):
            model(**inputs)
        handle.remove()
        got = model(**inputs)
    assert torch.equal(got, expected)
    failed_block = len(model.transformer_blocks) + 1
    assert [e for e in log if isinstance(e, Restart)] == [Restart(None), Restart(abandoned=failed_block)]


def test_resident_blocks_stay_placed_and_only_the_rest_stream():
    model = tiny_transformer(seed=5)
    inputs = tiny_inputs(6)
    with torch.inference_mode():
        expected = model(**inputs)
    weights = ComponentWeights(model, "cpu", streamable_blocks(model))
    log: list = []
    streamer = BlockStreamer(weights.blocks, "cpu", slots=2, resident_blocks=3, trace=log)
    with streamer, torch.inference_mode():
        got = model(**inputs)
    assert torch.equal(got, expected)
    assert {e.block for e in log if isinstance(e, Acquire)} == set(range(len(weights.blocks) - 3))
    assert streamer.slot_bytes == max(b.nbytes for b in weights.blocks[3:])


# ----------------------------------------------------------------- offload


def reads_host_copies(weights: ComponentWeights, modules) -> list[bool]:
    """For each parameter of `modules`: does it read its host copy (not a device copy)?"""
    host = {t.data_ptr() for t in weights.rest.host} | {v.data_ptr() for b in weights.blocks for v in b.host_views}
    return [p.data_ptr() in host for m in modules for p in m.parameters()]


def test_placing_swaps_in_device_copies_and_evicting_restores_the_host_values():
    model = tiny_transformer(seed=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # On a CPU the "device" copy is a second CPU copy: where each tensor points tells them apart.
    weights = ComponentWeights(model, "cpu", streamable_blocks(model))
    blocks = streamable_blocks(model)
    outside = [m for m in model.children() if m not in (model.transformer_blocks, model.single_transformer_blocks)]
    assert all(reads_host_copies(weights, [model]))
    with weights.placed():
        assert not any(reads_host_copies(weights, [model])) and weights.on_device
    assert all(reads_host_copies(weights, [model])) and not weights.on_device
    with weights.streamed(slots=2):
        assert not any(reads_host_copies(weights, outside))
        assert all(reads_host_copies(weights, blocks))  # blocks wait in host memory until they run
    assert all(reads_host_copies(weights, [model]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_bundle):
    return Pipeline.from_pretrained(tiny_bundle, device="cpu")


FAST = {"resolution": 128, "steps": 2, "seconds": 2, "teacache": False, "preview": False}  # two sections
# What runs, and what must be on the device then: the VAE encodes beside SigLIP and decodes alone.
PHASE_OF = {
    "text_encoder": {"text_encoder", "text_encoder_2"},
    "text_encoder_2": {"text_encoder", "text_encoder_2"},
    "image_encoder": {"image_encoder", "vae"},
    "vae.encoder": {"image_encoder", "vae"},
    "transformer": {"transformer"},
    "vae.decoder": {"vae"},
}


def generate_recording_placement(pipeline, image, mode):
    """Run a job; record, each time a model runs, which components are on the device."""
    seen = []
    handles = []
    for name in PHASE_OF:
        module = pipeline.components
        for part in name.split("."):
            module = getattr(module, part)
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=name: seen.append((name, pipeline.memory.placed()))
        ))
    try:
        result = list(pipeline.generate(request(image, "a robot waves", **{**FAST, "memory_mode": mode})))[-1]
    finally:
        for h in handles:
            h.remove()
    return result, seen


def runs(seen) -> list[str]:
    """The order in which the models ran, a model's back-to-back calls counted once."""
    names = [name for name, _ in seen]
    return [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]


@pytest.mark.slow
def test_offload_and_stream_jobs_equal_resident_and_move_each_component_only_for_its_phase(tiny_pipeline, image):
    resident, _ = generate_recording_placement(tiny_pipeline, image, "auto")  # auto on a CPU: resident
    memory = resident.timings["memory"]
    assert {k: memory[k] for k in ("mode", "peak_allocated_bytes", "peak_reserved_bytes")} == {
        "mode": "resident", "peak_allocated_bytes": None, "peak_reserved_bytes": None}
    assert memory["decode"]["tiled"] is False  # the whole decode fits this machine's RAM at 144×112
    for mode in ("offload", "stream"):
        result, seen = generate_recording_placement(tiny_pipeline, image, mode)
        assert np.array_equal(result.frames, resident.frames), mode
        assert result.settings["memory_mode"] == mode == result.timings["memory"]["mode"]
        assert runs(seen) == ["text_encoder", "text_encoder_2", "vae.encoder", "image_encoder",
                              "transformer", "vae.decoder", "transformer", "vae.decoder"]
        assert all(placed == PHASE_OF[name] for name, placed in seen), (mode, seen)
        assert tiny_pipeline.memory.placed() == set()
    # And back to resident: the weights survived the moves.
    again = list(tiny_pipeline.generate(request(image, "a robot waves", **{**FAST, "memory_mode": "resident"})))[-1]
    assert np.array_equal(again.frames, resident.frames)


def test_peak_memory_is_none_without_a_gpu():
    assert peak_memory(torch.device("cpu")) == {"peak_allocated_bytes": None, "peak_reserved_bytes": None}


# ----------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_streamed_forward_on_the_gpu_equals_resident_with_less_memory():
    config = dict(TINY, num_attention_heads=8, attention_head_dim=64, rope_axes_dim=(16, 24, 24),
                  num_layers=6, num_single_layers=12, mlp_ratio=4.0)
    gc.collect()
    start = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FramePackTransformer(**config).to(torch.bfloat16).eval().requires_grad_(False)
    inputs = {
        k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.cuda()) if isinstance(v, torch.Tensor) else v
        for k, v in tiny_inputs(1).items()
    }
    with torch.inference_mode():
        expected = model(**inputs)
    weights = ComponentWeights(model, "cuda", streamable_blocks(model))
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # What is allocated now (inputs, the expected output, what earlier tests left) is not the
    # streamed forward's: only the growth above it counts.
    before = torch.cuda.memory_allocated()
    block_bytes = sum(b.nbytes for b in weights.blocks)
    # The model's weights left the GPU for host memory (the margin: cuBLAS workspaces, inputs).
    assert before - start < block_bytes // 2
    with weights.streamed(slots=2) as streamer, torch.inference_mode():
        got = [model(**inputs) for _ in range(3)]
        torch.cuda.synchronize()
    assert all(torch.equal(g, expected) for g in got)
    growth = torch.cuda.max_memory_allocated() - before
    assert growth < weights.rest.nbytes + 2 * streamer.slot_bytes + block_bytes // 2


def test_the_fp32_output_projection_stays_fp32_in_every_memory_mode(tiny_bundle, image):
    """A bf16 transformer gets the FramePack demo's fp32 proj_out by default; the memory manager's
    host copies keep each tensor's dtype, so offload and stream run it in fp32 too."""
    pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu", dtype=torch.bfloat16)
    transformer = pipeline.components.transformer
    seen = []
    transformer.proj_out.register_forward_pre_hook(
        lambda m, args: seen.append((m.weight.dtype, m.bias.dtype, args[0].dtype))
    )
    frames = {}
    for mode in ("resident", "offload", "stream"):
        seen.clear()
        request = GenerationRequest.parse(image, "a robot waves", **{**FAST, "steps": 1, "memory_mode": mode})
        result = list(pipeline.generate(request))[-1]
        assert result.timings["memory"]["mode"] == mode
        assert len(seen) == 2 and set(seen) == {(torch.float32, torch.float32, torch.float32)}, (mode, seen)
        assert transformer.proj_out.weight.dtype == torch.float32  # between jobs too (host copy)
        assert transformer.norm_out.linear.weight.dtype == transformer.x_embedder.proj.weight.dtype == torch.bfloat16
        frames[mode] = result.frames
    assert np.array_equal(frames["offload"], frames["resident"])
    assert np.array_equal(frames["stream"], frames["resident"])

    plain = Pipeline.from_pretrained(tiny_bundle, device="cpu", dtype=torch.bfloat16, fp32_output=False)
    assert plain.components.transformer.proj_out.weight.dtype == torch.bfloat16
