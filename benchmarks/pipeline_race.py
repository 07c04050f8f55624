"""Whole pipeline, ours against diffusers' HunyuanVideoFramepackPipeline: seconds per frame, same run.

One process, one set of random weights: the text encoders, SigLIP and the VAE are the same
objects, and diffusers' transformer wraps our transformer's tensors (no copy). Both get the
same image (the sample, resized and cropped to our bucket once, so both see the same pixels),
prompt, seed, frames and steps per section, with cfg 1 and distilled guidance 10 as the
FramePack demo. Each side's time is its whole call: text and image encoding, every section's
sampling and VAE decode, up to the frames in host memory; diffusers decodes with its own VAE
path (each section's `vae.decode` and its soft append; the VAE untiled, as its pipeline leaves
it). A warm-up generation on each side first: the same video at `--warmup-steps` per section.

    python benchmarks/pipeline_race.py [--runs off] [--seconds 5] [--steps 25] [--resolution 640]
    python benchmarks/pipeline_race.py --runs magcache,teacache    # the caches' pairings
    python benchmarks/pipeline_race.py --fused-qkv --cuda-graphs   # ours with the opt-in exact speed options
    python benchmarks/pipeline_race.py --runs magcache --fp8 --attention cudnn-fp8   # ours' fastest opt-in options
    python benchmarks/pipeline_race.py --tiny    # the tiny random bundle, fp32 on the CPU: checks the script

Full size (the default) builds the public configurations on the GPU (benchmarks/generation.py)
in bf16 and needs CUDA. On an H200, by the issue's s/frame figures: about 5.5 minutes for
`--runs off` (imports, building and warm-up about 2, ours 1.5, diffusers 2), 2 to 3 more per
cache pairing.

What is the same on both sides, and what is each side's own:
- Steps: the same count per section, one transformer forward each (cfg 1). The samplers
  differ: ours is the demo's UniPC, diffusers' pipeline steps its FlowMatchEulerDiscreteScheduler
  (here with dynamic shifting, so the shift its pipeline computes, capped at log 7, gives the
  demo's sigmas). Equal step counts are the contract, not equal latents.
- Frames: diffusers' `num_frames` makes ceil(num_frames / 33) sections at window 9, ours'
  `seconds` round(seconds · 30 / 36); diffusers is asked for sections × 33 frames, so both make
  the same sections and the same frames (5 s: 4 sections, 145 frames). Each run records its frames.
- Text: ours crops the prompt to its tokens, diffusers pads to 256 and masks.

Pairings (`--runs`), ours | diffusers:
- `off`: no step cache | no cache hook.
- `teacache`: TeaCache 0.15 | First Block Cache at diffusers' default threshold (0.05).
  diffusers 0.42 has no TeaCache hook; First Block Cache is its cache that, like TeaCache,
  decides each step from the first block. Both read activations, and random weights do not
  change them the way trained ones do: the skipped forwards (recorded) are not a real model's.
- `magcache`: MagCache at our defaults | diffusers' MagCache hook given the authors' FramePack
  magnitude ratios (framepack_backend/magcache.py) and the same threshold, max skips and
  retention. The hook counts forwards and starts over every `steps` of them: once per
  section with cfg 1, as ours. It has no per-step 0.06 bound and rounds the retention
  differently from the authors' port; each side runs its own implementation as shipped.
Both hooks apply to this transformer (its blocks are the HunyuanVideo ones diffusers'
hook registry knows) but keep their state per cache context, and diffusers' FramePack
pipeline opens none (its other pipelines open one per denoiser call and CFG branch): First
Block Cache then fails with "No cache context is set". The race opens one context around
the pipeline call; with cfg 1 there is one branch, so that is the context it would open.
The record's `pairing_notes` repeat this.

Before timing, one transformer forward of each side on the same inputs checks that the
weights are shared (`forward_rel_error`: bf16 noise on the GPU, ~1e-6 in fp32).
Ratios are diffusers' seconds per frame over ours (above 1: ours is faster), one run each.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generation import PROMPT, build_components, generate_once, peak_gib, synchronize  # noqa: E402
from step_caches import STEP_CACHES  # noqa: E402
from transformer_forward import make_inputs, relative_error, transformer_sharing_weights  # noqa: E402

from framepack_backend import planner  # noqa: E402
from framepack_backend.attention import BACKEND_NAMES  # noqa: E402
from framepack_backend.buckets import bucket_for, resize_and_center_crop  # noqa: E402
from framepack_backend.components import Components, load_components  # noqa: E402
from framepack_backend.conditioning import PROMPT_TEMPLATE, prompt_prefix_length  # noqa: E402
from framepack_backend.magcache import MAGNITUDE_RATIOS  # noqa: E402
from framepack_backend.pipeline import Pipeline, configure_transformer  # noqa: E402
from framepack_backend.settings import EngineOptions, SamplingSettings  # noqa: E402
from framepack_backend.testing.tiny_bundle import write_tiny_bundle  # noqa: E402
from framepack_backend.vae_fast import accelerate_vae, configure_vae  # noqa: E402
from framepack_backend.variants import SamplingVariant  # noqa: E402
from framepack_server.demo import SAMPLE_IMAGE  # noqa: E402

PAIRINGS = tuple(STEP_CACHES)  # each names our cache and its diffusers counterpart
PAIRING_NOTES = {
    "off": "no step cache on either side",
    "teacache": "ours TeaCache 0.15; diffusers 0.42 has no TeaCache hook, so its First Block Cache (default "
                "threshold), also decided from the first block; both read activations, which random weights do "
                "not move as trained ones do",
    "magcache": "ours MagCache at the authors' defaults; diffusers' MagCache hook with the authors' FramePack ratios "
                "and the same threshold, max skips and retention (no per-step 0.06 bound, its own retention rounding)",
    "cache_context": "diffusers' FramePack pipeline opens no cache context, which its cache hooks need; the race "
                     "opens one around the pipeline call (cfg 1: one branch)",
}
DISTILLED_GUIDANCE = 10.0  # the FramePack demo's, and our default (SamplingSettings.gs)


def peer_num_frames(sections: int, window: int) -> int:
    """What diffusers' pipeline is asked for to make `sections` sections: it makes
    ceil(num_frames / (4·(window − 1) + 1)) of them."""
    return sections * (planner.VAE_TIME_STRIDE * (window - 1) + 1)


def diffusers_cache(pairing: str, steps: int):
    """diffusers' cache hook config for a pairing (None: no hook), from its own hooks module."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    if pairing == "teacache":
        return FirstBlockCacheConfig()
    if pairing == "magcache":
        ours = SamplingSettings()
        return MagCacheConfig(
            threshold=ours.magcache_threshold, max_skip_steps=ours.magcache_max_skips,
            retention_ratio=ours.magcache_retention, num_inference_steps=steps,
            mag_ratios=list(MAGNITUDE_RATIOS[SamplingVariant.INVERTED]),
        )
    return None


def diffusers_pipeline(components: Components, transformer):
    """diffusers' FramePack pipeline on our components (the same objects) and a transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline

    # Dynamic shifting: the pipeline's mu (capped at log 7) sets the shift, as the demo's schedule.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=components.text_encoder, tokenizer=components.tokenizer, transformer=transformer,
        vae=components.vae, scheduler=scheduler, text_encoder_2=components.text_encoder_2,
        tokenizer_2=components.tokenizer_2, image_encoder=components.image_encoder,
        feature_extractor=components.feature_extractor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ForwardCounter:
    """Counts the forwards that ran the block stack: a pre-hook on the last block's norm,
    which a cache hook's skipped forward never reaches."""

    def __init__(self, transformer):
        self.count = 0
        self._handle = transformer.single_transformer_blocks[-1].norm.register_forward_pre_hook(self._hit)

    def _hit(self, module, args) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


def generate_diffusers(pipe, pixels: np.ndarray, sections: int, window: int, steps: int, seed: int,
                       device: torch.device) -> dict:
    from PIL import Image

    # Our template, and its prefix length for this tokenizer (diffusers' 95 is the real Llama tokenizer's).
    template = {"template": PROMPT_TEMPLATE, "crop_start": prompt_prefix_length(pipe.tokenizer)}
    height, width = pixels.shape[:2]
    counter = ForwardCounter(pipe.transformer)
    try:
        synchronize(device)
        start = time.perf_counter()
        video = pipe(
            image=Image.fromarray(pixels), prompt=PROMPT, height=height, width=width,
            num_frames=peer_num_frames(sections, window), latent_window_size=window, num_inference_steps=steps,
            true_cfg_scale=1.0, guidance_scale=DISTILLED_GUIDANCE, prompt_template=template,
            generator=torch.Generator(device).manual_seed(seed), output_type="np",
        ).frames[0]
        synchronize(device)
        total = time.perf_counter() - start
    finally:
        counter.close()
    frames = video.shape[0]
    return dict(frames=frames, width=video.shape[2], height=video.shape[1], total_s=total,
                s_per_frame=total / frames, computed_forwards=counter.count,
                skipped_forwards=sections * steps - counter.count, peak_gib=peak_gib(device))


def check_shared_weights(ours, peer, config: dict, latent_hw: tuple[int, int], window: int,
                         device: torch.device, dtype: torch.dtype) -> float:
    """Relative error of our forward against diffusers' on the same inputs."""
    inputs = make_inputs(device, dtype, latent_hw=latent_hw, window=window, config=config)
    with torch.inference_mode():
        expected = peer(**inputs, return_dict=False)[0]
        got = ours(**inputs, return_dict=False)
    got = got[0] if isinstance(got, (tuple, list)) else got
    return relative_error(got, expected)


def race(components: Components, device: torch.device, dtype: torch.dtype, image: np.ndarray, pairings: list[str],
         seconds: float, steps: int, resolution: int, warmup_steps: int, options: EngineOptions) -> dict:
    """Warm up both sides, then run each pairing (ours, then diffusers); the record's numbers."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    config = {k: v for k, v in components.transformer.config.to_dict().items() if not k.startswith("_")}
    # Before our options touch the weights: the fp32 output projection then replaces only our tensor.
    peer = transformer_sharing_weights(HunyuanVideoFramepackTransformer3DModel, config, components.transformer)
    options = configure_transformer(components.transformer, device, options)
    options = configure_vae(components.vae, device, options)
    pipeline = Pipeline(components, device, dtype, Path("<random weights>"), options)
    pipe = diffusers_pipeline(components, peer)

    height, width = bucket_for(*image.shape[:2], resolution=resolution)
    pixels = resize_and_center_crop(image, width, height)
    window, seed = SamplingSettings().window, SamplingSettings().seed
    sections = len(planner.plan_sections(seconds, window, SamplingVariant.INVERTED))

    # The VAE is one module on both sides: ours decodes with the engine's option, diffusers' with its own forward.
    def ours(settings: dict) -> dict:
        accelerate_vae(components.vae, bool(options.fast_vae_decode))
        return generate_once(pipeline, pixels, settings)

    def theirs(steps_now: int) -> dict:
        accelerate_vae(components.vae, False)
        return generate_diffusers(pipe, pixels, sections, window, steps_now, seed, device)

    rel_error = check_shared_weights(components.transformer, peer, config, (height // 8, width // 8), window,
                                     device, dtype)
    print(f"our forward vs diffusers' on the same inputs: relative error {rel_error:.2e}", flush=True)

    ours_settings = {"seconds": seconds, "steps": steps, "resolution": resolution, "seed": seed,
                     "gs": DISTILLED_GUIDANCE, "cfg": 1.0, "memory_mode": "resident"}
    t0 = time.perf_counter()
    # The whole video at fewer steps: every section's shapes (the decodes differ) meet their
    # kernels, algorithm choices and allocations before the timed runs.
    ours({**ours_settings, **STEP_CACHES["off"], "steps": warmup_steps})
    theirs(warmup_steps)
    warmup_s = time.perf_counter() - t0
    print(f"warm-up ({sections} sections of {warmup_steps} steps each side): {warmup_s:.1f} s", flush=True)

    runs, pairs = [], []
    for pairing in pairings:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mine = ours({**ours_settings, **STEP_CACHES[pairing]})
        ours_run = dict(side="ours", pairing=pairing, cache=describe_ours(pairing), frames=mine["frames"],
                        width=mine["width"], height=mine["height"], total_s=mine["total_s"],
                        s_per_frame=mine["s_per_frame"], computed_forwards=mine["timings"]["computed_steps"],
                        skipped_forwards=mine["timings"]["skipped_steps"], first_section_s=mine["first_section_s"],
                        peak_gib=mine["peak_gib"], timings=mine["timings"])
        print_run(ours_run)
        cache = diffusers_cache(pairing, steps)
        if cache is not None:
            peer.enable_cache(cache)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # The hooks keep their state per cache context, which diffusers' FramePack pipeline
            # never opens (its other pipelines open one per denoiser call and CFG branch);
            # with cfg 1 there is one branch, so one context around the call is the same.
            with peer.cache_context("cond") if cache is not None else contextlib.nullcontext():
                peer_numbers = theirs(steps)
        finally:
            if cache is not None:
                peer.disable_cache()
        peer_run = dict(side="diffusers", pairing=pairing, cache=describe_diffusers(cache), **peer_numbers)
        print_run(peer_run)
        runs += [ours_run, peer_run]
        pairs.append(dict(pairing=pairing, ours_s_per_frame=ours_run["s_per_frame"],
                          diffusers_s_per_frame=peer_run["s_per_frame"],
                          ratio=peer_run["s_per_frame"] / ours_run["s_per_frame"],
                          same_frames=ours_run["frames"] == peer_run["frames"]))
    return dict(seconds=seconds, steps=steps, resolution=resolution, width=width, height=height, window=window,
                sections=sections, seed=seed, prompt=PROMPT, distilled_guidance=DISTILLED_GUIDANCE, cfg=1.0,
                diffusers_num_frames=peer_num_frames(sections, window), forward_rel_error=rel_error,
                warmup_s=warmup_s, engine_options=options.to_dict(), pairing_notes=PAIRING_NOTES, runs=runs,
                pairs=pairs)


def describe_ours(pairing: str) -> str:
    defaults = SamplingSettings()
    return {"off": "none", "teacache": f"TeaCache {STEP_CACHES['teacache']['teacache_threshold']}",
            "magcache": f"MagCache threshold {defaults.magcache_threshold} max skips {defaults.magcache_max_skips} "
                        f"retention {defaults.magcache_retention}"}[pairing]


def describe_diffusers(cache) -> str:
    if cache is None:
        return "none"
    if type(cache).__name__ == "MagCacheConfig":
        return (f"MagCache (diffusers) threshold {cache.threshold} max skips {cache.max_skip_steps} "
                f"retention {cache.retention_ratio}, FramePack ratios")
    return f"First Block Cache (diffusers) threshold {cache.threshold}"


def print_run(run: dict) -> None:
    print(f"{run['side']:9s} {run['cache']:60s} {run['frames']} frames {run['width']}x{run['height']} "
          f"in {run['total_s']:7.1f} s = {run['s_per_frame']:.3f} s/frame, forwards {run['computed_forwards']} "
          f"computed {run['skipped_forwards']} skipped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random bundle in fp32 on the CPU")
    parser.add_argument("--runs", default="off",
                        help=f"comma-separated pairings, each run by ours then diffusers: {', '.join(PAIRINGS)}")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=640, help="bucket resolution (640: 704x544 here)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--no-kernels", action="store_true", help="our eager blocks instead of the fused kernels")
    parser.add_argument("--fused-qkv", action="store_true", help="ours with q/k/v as one GEMM (EngineOptions)")
    parser.add_argument("--cuda-graphs", action="store_true", help="ours with the blocks replayed from CUDA graphs")
    parser.add_argument("--fp8", action="store_true", help="ours with FP8 linear layers (EngineOptions)")
    parser.add_argument("--attention", default="auto", choices=("auto", *BACKEND_NAMES),
                        help="our attention backend (EngineOptions; default: the fastest exact one here)")
    parser.add_argument("--fast-vae-decode", action=argparse.BooleanOptionalAction,
                        help="ours with the VAE decode speed-up (default: the engine's, on for CUDA with Triton)")
    parser.add_argument("--weight-scale", type=float, default=0.05, help="full size: transformer weights ×this")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    pairings = args.runs.split(",")
    if not pairings or not set(pairings) <= set(PAIRINGS):
        sys.exit(f"--runs {args.runs!r}: expected pairings from {', '.join(PAIRINGS)}")
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/pipeline_race.py needs a CUDA GPU for the full-size models (or --tiny for the CPU)")
    if args.tiny and args.cuda_graphs:
        sys.exit("--cuda-graphs replays GPU work: not with --tiny, which runs on the CPU")
    import diffusers
    from PIL import Image

    t0 = time.perf_counter()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        bundle = write_tiny_bundle(Path(tempfile.mkdtemp()) / "tiny")
        components = load_components(bundle, device, dtype, encoder_dtype=dtype)
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        components = build_components(device, args.weight_scale)
    build_s = time.perf_counter() - t0
    print(f"built {'tiny' if args.tiny else 'full-size'} random components in {build_s:.1f} s", flush=True)
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    fused_kernels = None if device.type == "cpu" else not args.no_kernels
    record = race(components, device, dtype, image, pairings, args.seconds, args.steps, args.resolution,
                  args.warmup_steps, EngineOptions(fused_kernels=fused_kernels, fused_qkv=args.fused_qkv,
                                                   cuda_graphs=args.cuda_graphs, fp8=args.fp8,
                                                   attention=args.attention,
                                                   fast_vae_decode=args.fast_vae_decode))

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name}, {'tiny' if args.tiny else 'full'} config, {record['seconds']} s video "
          f"({record['sections']} sections), {record['steps']} steps, {record['width']}x{record['height']}")
    print(f"{'pairing':10s} {'ours s/frame':>13s} {'diffusers s/frame':>18s} {'ratio':>7s}  frames")
    for pair, (ours, theirs) in zip(record["pairs"], zip(record["runs"][::2], record["runs"][1::2])):
        print(f"{pair['pairing']:10s} {pair['ours_s_per_frame']:13.3f} {pair['diffusers_s_per_frame']:18.3f} "
              f"{pair['ratio']:7.2f}  {ours['frames']} / {theirs['frames']}")
    save_result(args.out, "pipeline_race", "pipeline_race", versions=dict(diffusers=diffusers.__version__),
                config="tiny" if args.tiny else "full", dtype=str(dtype).removeprefix("torch."), build_s=build_s,
                **record)


if __name__ == "__main__":
    main()
