"""Memory modes on the full 13B transformer: peak GPU memory and s/step per mode, same run, same weights.

One random state dict (×0.05, bf16) serves every row. Rows: resident; stream under a
simulated 6 GiB card (torch.cuda.set_per_process_memory_fraction), as the engine plans
it and with every block streamed; diffusers' leaf-level group offloading with CUDA
streams under the same cap; a budget sweep (the mode and stream plan the engine picks
for 6/8/12/24 GiB, and its s/step); constant cost over 1/4/16 sections of the real
section loop (planner context, UniPC, history) with 2 steps each; and the phases of a
whole job (random full-size Llama, CLIP, SigLIP, VAE) in stream mode under 6 GiB.
One step is one transformer forward (cfg 1) at the 640 bucket (latent 80×80), window 9.

    python benchmarks/memory.py [--repeats 3] [--sections 1,4,16] [--skip-peer] [--skip-job] [--fused-kernels]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from transformer_forward import FULL_CONFIG, make_inputs, random_model, time_forward  # noqa: E402

from framepack_backend import planner  # noqa: E402
from framepack_backend.memory import (  # noqa: E402
    ComponentWeights,
    MemoryManager,
    StreamPlan,
    choose_memory_mode,
    job_footprint,
    memory_needed,
    peak_memory,
    plan_stream,
    reset_peak_memory,
    streamable_blocks,
)
from framepack_backend.memory.footprint import GIB  # noqa: E402
from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402
from framepack_backend.sampler import iterate_unipc  # noqa: E402
from framepack_backend.schedule import schedule_for  # noqa: E402

LATENT_HW, WINDOW, HEIGHT, WIDTH = (80, 80), 9, 640, 640
SMALL_CARD_GIB = 6
BUDGETS_GIB = (6, 8, 12, 24)
SECTION_STEPS = 2
PROMPT_TOKENS = 351  # the template prefix (95) + 256 prompt tokens: the most Llama ever reads
# The public encoders' configurations (HunyuanVideo's Llama-3-8B and CLIP-L, flux_redux's SigLIP so400m).
LLAMA = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768)
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cap_memory(gib_limit: float | None) -> None:
    """Let this process's allocator hold at most `gib_limit` GiB (None: the whole card)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib_limit is None else min(1.0, gib_limit * GIB / total))


@contextmanager
def measured(device: torch.device = torch.device("cuda")):
    """Peak allocated/reserved GiB of the `with` block (read it from the yielded dict afterwards)."""
    synchronize(device)
    reset_peak_memory(device)
    result: dict = {}
    yield result
    synchronize(device)
    peak = peak_memory(device)
    result.update(peak_gib=gib(peak["peak_allocated_bytes"]), peak_reserved_gib=gib(peak["peak_reserved_bytes"]))


def time_steps(model, inputs: dict, repeats: int, warmup: int = 1) -> tuple[dict, torch.Tensor]:
    """s/step (median, min, max) of `repeats` forwards after `warmup`."""
    median, low, high, _, out = time_forward(model, inputs, repeats, warmup)
    return dict(s_per_step=median, min_s=low, max_s=high), out


def difference(out: torch.Tensor, reference: torch.Tensor) -> dict:
    out = out.float().cpu()
    return dict(max_abs_diff=float((out - reference).abs().max()), finite=bool(torch.isfinite(out).all()))


def run_row(name: str, context, model, inputs, repeats, reference=None, **extra) -> tuple[dict, torch.Tensor | None]:
    """One measured mode: enter `context` (placing weights counts towards the peak), time the forwards.

    Returns the record and the last output (None when the mode ran out of memory).
    """
    progress(f"{name}: measuring")
    row, out = dict(mode=name, **extra), None
    try:
        with measured() as peak:
            with context:
                timing, out = time_steps(model, inputs, repeats)
        row.update(timing, **peak)
        if reference is not None:
            row.update(difference(out, reference))
    except torch.OutOfMemoryError as error:
        row.update(error=f"out of memory: {str(error).splitlines()[0]}")
    progress(f"{name}: {row}")
    return row, out


def copy_only_seconds(weights: ComponentWeights, repeats: int = 2) -> float:
    """Time to copy every block host → GPU once with nothing else running: the cost streaming must hide."""
    slot = torch.empty(max(b.nbytes for b in weights.blocks), dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for block in weights.blocks:
            slot[: block.nbytes].copy_(block.host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def build_encoders(device: str) -> SimpleNamespace:
    """Random full-size text encoders, image encoder and VAE in fp16 (meta: sizes only)."""
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            encoders = SimpleNamespace(
                text_encoder=LlamaModel(LlamaConfig(**LLAMA)),
                text_encoder_2=CLIPTextModel(CLIPTextConfig(**CLIP)),
                image_encoder=SiglipVisionModel(SiglipVisionConfig(**SIGLIP)),
                vae=AutoencoderKLHunyuanVideo(),
            )
    finally:
        torch.set_default_dtype(torch.float32)
    for module in vars(encoders).values():
        module.eval().requires_grad_(False)
    return encoders


def section_loop(
    model, weights, plan: StreamPlan, sections: int, dtype, device: torch.device, seed: int = 0
) -> list[float]:
    """The pipeline's section loop with the transformer only; returns seconds per section.

    Each section enters the sampling phase afresh (as the pipeline does around its VAE
    decode), builds its context from the growing history, and runs UniPC.
    """
    g = torch.Generator().manual_seed(seed)
    lh, lw = LATENT_HW
    start_latent = torch.randn(1, 16, 1, lh, lw, generator=g)
    text = torch.randn(1, 100, 4096, generator=g).to(device, dtype)
    pooled = torch.randn(1, 768, generator=g).to(device, dtype)
    image_embeds = torch.randn(1, 729, 1152, generator=g).to(device, dtype)
    guidance = torch.full((1,), 10000.0, device=device, dtype=dtype)
    seconds = sections * WINDOW * planner.VAE_TIME_STRIDE / planner.FPS
    plans = planner.plan_sections(seconds, WINDOW, "inverted")
    assert len(plans) == sections, (len(plans), sections)
    sigmas = schedule_for(SECTION_STEPS, WINDOW, lh, lw)
    history = planner.initial_history(start_latent, "inverted")
    times = []
    for section in plans:
        synchronize(device)
        t = time.perf_counter()
        noise = torch.randn(1, 16, WINDOW, lh, lw, generator=g)
        clean, latents_2x, latents_4x = planner.context_from_history(history, start_latent, "inverted")
        context = dict(
            encoder_hidden_states=text, encoder_attention_mask=None, pooled_projections=pooled,
            image_embeds=image_embeds, guidance=guidance,
            indices_latents=section.indices_latents.to(device),
            latents_clean=clean.to(device, dtype), indices_latents_clean=section.indices_clean.to(device),
            latents_history_2x=latents_2x.to(device, dtype), indices_latents_history_2x=section.indices_2x.to(device),
            latents_history_4x=latents_4x.to(device, dtype), indices_latents_history_4x=section.indices_4x.to(device),
        )

        def flow(x, sigma, step_index):
            timestep = torch.full((1,), sigma * 1000.0, device=device, dtype=dtype)
            return model(hidden_states=x.to(dtype), timestep=timestep, **context).float()

        x0 = None
        with weights.streamed(plan.slots, plan.resident_blocks):
            for _, x0 in iterate_unipc(flow, noise.to(device), sigmas):
                pass
        history = planner.append_section(history, x0.cpu(), start_latent, section.is_last, "inverted")
        synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def job_phases(manager: MemoryManager, encoders: SimpleNamespace, transformer, inputs: dict) -> list[dict]:
    """Each phase of one job (one section) in the manager's mode, with its peak and time."""
    device = manager.device
    g = torch.Generator().manual_seed(1)
    work = {
        "text": lambda: (
            encoders.text_encoder(input_ids=torch.randint(0, LLAMA["vocab_size"], (1, PROMPT_TOKENS), generator=g)
                                  .to(device), output_hidden_states=True),
            encoders.text_encoder_2(input_ids=torch.randint(0, CLIP["vocab_size"], (1, 77), generator=g).to(device)),
        ),
        "image": lambda: (
            encoders.image_encoder(pixel_values=torch.randn(1, 3, 384, 384, generator=g).to(device, torch.float16)),
            encoders.vae.encode(torch.randn(1, 3, 1, HEIGHT, WIDTH, generator=g).to(device, torch.float16)),
        ),
        "sampling": lambda: [transformer(**inputs) for _ in range(SECTION_STEPS)],
        # The most one section decodes: the new window and the previous one, plus the start latent.
        "decode": lambda: encoders.vae.decode(
            torch.randn(1, 16, 2 * WINDOW + 1, *LATENT_HW, generator=g).to(device, torch.float16)
        ),
    }
    rows = []
    for phase, run in work.items():
        progress(f"job phase {phase}")
        row = dict(phase=phase)
        try:
            with measured(device) as peak:
                t = time.perf_counter()
                with manager.phase(phase):
                    run()
                synchronize(device)
                row["seconds"] = time.perf_counter() - t
            row.update(peak)
        except torch.OutOfMemoryError as error:
            row.update(error=f"out of memory: {str(error).splitlines()[0]}")
        progress(f"job phase {phase}: {row}")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="1,4,16", help="section counts for the constant-cost run")
    parser.add_argument("--weight-scale", type=float, default=0.05)
    parser.add_argument("--skip-peer", action="store_true", help="no diffusers group-offloading row")
    parser.add_argument("--skip-job", action="store_true", help="no whole-job phases (random encoders and VAE)")
    parser.add_argument("--fused-kernels", action="store_true", help="our blocks on the Triton kernels (every row)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/memory.py needs a CUDA GPU: it measures GPU memory and copy/compute overlap")
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    from diffusers.hooks import apply_group_offloading

    dtype, device = torch.bfloat16, torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    record = dict(
        benchmark="memory", gpu=gpu, command=" ".join([Path(sys.executable).name, *sys.argv]),
        versions=dict(torch=torch.__version__, python=platform.python_version(),
                      diffusers=__import__("diffusers").__version__),
        shape=dict(latent=list(LATENT_HW), window=WINDOW, pixels=[HEIGHT, WIDTH], dtype="bf16",
                   weight_scale=args.weight_scale, small_card_gib=SMALL_CARD_GIB, fused_kernels=args.fused_kernels),
        modes=[],
    )
    started = time.perf_counter()

    progress(f"{gpu}: building the full transformer (random weights ×{args.weight_scale}, bf16) on the GPU")
    peer = random_model(HunyuanVideoFramepackTransformer3DModel, FULL_CONFIG, device, dtype, args.weight_scale)
    with torch.device("meta"):
        ours = FramePackTransformer(**FULL_CONFIG)
    ours.load_state_dict(peer.state_dict(), strict=True, assign=True)  # the same tensors
    ours.eval().requires_grad_(False)
    if args.fused_kernels:
        ours.set_fused_kernels(True)
    inputs = make_inputs(device, dtype, latent_hw=LATENT_HW, window=WINDOW)

    footprint = job_footprint(SimpleNamespace(**vars(build_encoders("meta")), transformer=ours), HEIGHT, WIDTH, WINDOW)
    record["estimates_gib"] = {m: gib(memory_needed(m, footprint)) for m in ("resident", "offload", "stream")}

    with torch.inference_mode():
        resident, out = run_row("resident", nullcontext(), ours, inputs, args.repeats)
        reference = out.float().cpu()
        record["modes"].append(resident)

        progress("copying the weights to pinned host memory")
        t = time.perf_counter()
        weights = ComponentWeights(ours, device, streamable_blocks(ours))
        host_tensors = dict(ours.named_parameters())
        for name, p in peer.named_parameters():
            p.data = host_tensors[name].data  # the peer reads the same host copies
        del out
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        record["host_copy_s"] = time.perf_counter() - t
        record["host_bytes_gib"] = gib(weights.host_bytes)
        progress(f"host copies: {gib(weights.host_bytes)} GiB in {record['host_copy_s']:.1f} s; "
                 f"GPU holds {gib(torch.cuda.memory_allocated())} GiB")

        copy_s = copy_only_seconds(weights)
        progress(f"copying all blocks once: {copy_s:.3f} s")

        cap_memory(SMALL_CARD_GIB)
        small_plan = plan_stream(SMALL_CARD_GIB * GIB, footprint)
        stream, _ = run_row(
            "stream", weights.streamed(small_plan.slots, small_plan.resident_blocks), ours, inputs, args.repeats,
            reference, cap_gib=SMALL_CARD_GIB, slots=small_plan.slots, resident_blocks=small_plan.resident_blocks,
        )
        record["modes"].append(stream)
        streamed_all, _ = run_row(
            "stream (every block streamed, 2 slots)", weights.streamed(2, 0), ours, inputs, args.repeats,
            reference, cap_gib=SMALL_CARD_GIB, slots=2, resident_blocks=0,
        )
        record["modes"].append(streamed_all)

        if not args.skip_peer:
            progress("diffusers: leaf-level group offloading with streams, same host weights")
            apply_group_offloading(peer, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=True)
            peer_row, _ = run_row("diffusers leaf-level group offload (streams)", nullcontext(), peer, inputs,
                                  args.repeats, reference, cap_gib=SMALL_CARD_GIB)
            record["modes"].append(peer_row)
        del peer

        if "s_per_step" in resident and "s_per_step" in streamed_all:
            hidden = (resident["s_per_step"] + copy_s - streamed_all["s_per_step"]) / copy_s
            record["overlap"] = dict(
                resident_s=resident["s_per_step"], copy_all_blocks_s=copy_s,
                streamed_all_s=streamed_all["s_per_step"],
                serial_estimate_s=resident["s_per_step"] + copy_s,
                hidden_copy_fraction=max(0.0, min(1.0, hidden)),
            )
        ratios = {}
        for row in record["modes"][1:]:
            if "s_per_step" in row and "s_per_step" in resident:
                ratios[row["mode"]] = row["s_per_step"] / resident["s_per_step"]
        record["ratio_to_resident"] = ratios
        progress(f"s/step relative to resident: {ratios}")

        record["budgets"] = []
        for budget_gib in BUDGETS_GIB:
            mode = choose_memory_mode("auto", budget_gib * GIB, 0.0, footprint)
            plan = plan_stream(budget_gib * GIB, footprint) if mode == "stream" else None
            cap_memory(budget_gib)
            # The transformer's share of the chosen mode: placed whole for resident/offload.
            context = weights.streamed(plan.slots, plan.resident_blocks) if plan else weights.placed()
            row, _ = run_row(
                f"budget {budget_gib} GiB: {mode}", context, ours, inputs, max(2, args.repeats - 1),
                budget_gib=budget_gib, chosen=mode, slots=plan.slots if plan else None,
                resident_blocks=plan.resident_blocks if plan else None,
            )
            record["budgets"].append(row)

        cap_memory(SMALL_CARD_GIB)
        record["sections"] = []
        progress(f"constant cost: a warm-up section, then {args.sections} sections of {SECTION_STEPS} steps")
        try:
            section_loop(ours, weights, small_plan, 1, dtype, device)
            for count in (int(n) for n in args.sections.split(",")):
                with measured() as peak:
                    times = section_loop(ours, weights, small_plan, count, dtype, device)
                row = dict(sections=count, mean_s_per_section=statistics.mean(times),
                           max_s_per_section=max(times), min_s_per_section=min(times), **peak)
                progress(f"{count} sections: {row}")
                record["sections"].append(row)
        except torch.OutOfMemoryError as error:
            record["sections"].append(dict(error=f"out of memory: {str(error).splitlines()[0]}"))
        if len(record["sections"]) > 1 and all("peak_gib" in r for r in record["sections"]):
            first, last = record["sections"][0], record["sections"][-1]
            record["constant_cost"] = dict(
                peak_ratio=last["peak_gib"] / first["peak_gib"],
                s_per_section_ratio=last["mean_s_per_section"] / first["mean_s_per_section"],
            )

        if not args.skip_job:
            cap_memory(None)
            progress("whole job: random full-size Llama-3-8B, CLIP-L, SigLIP and VAE (fp16), to host memory")
            with torch.inference_mode(False):  # module buffers must not be inference tensors
                encoders = build_encoders("cuda")
            components = SimpleNamespace(**vars(encoders), transformer=ours)
            manager = MemoryManager(components, device, host_weights={"transformer": weights})
            manager.configure("stream", small_plan)  # moves the encoders to host memory
            cap_memory(SMALL_CARD_GIB)
            record["job_phases"] = job_phases(manager, encoders, ours, inputs)
            peaks = [r["peak_reserved_gib"] for r in record["job_phases"] if "peak_reserved_gib" in r]
            record["job_peak_reserved_gib"] = max(peaks) if len(peaks) == len(record["job_phases"]) else None
            record["job_within_cap"] = record["job_peak_reserved_gib"] is not None and (
                record["job_peak_reserved_gib"] <= SMALL_CARD_GIB
            )

    record["wall_s"] = time.perf_counter() - started
    print(f"\n{gpu}: full config, bf16, latent 80x80, window 9; cap {SMALL_CARD_GIB} GiB for the offloaded rows")
    print(f"{'mode':48s} {'s/step':>8s} {'peak GiB':>9s} {'reserved':>9s} {'max |diff|':>11s}")
    for row in record["modes"] + record["budgets"]:
        if "error" in row:
            print(f"{row['mode']:48s} {row['error']}")
            continue
        diff = row.get("max_abs_diff")
        print(f"{row['mode']:48s} {row['s_per_step']:8.3f} {row['peak_gib']:9.2f} {row['peak_reserved_gib']:9.2f} "
              f"{'' if diff is None else f'{diff:11.3g}'}")
    for row in record["sections"]:
        print(row)
    for row in record.get("job_phases", []):
        print(row)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"memory_{gpu.replace(' ', '_')}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main()
