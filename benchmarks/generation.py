"""One whole generation at full model size (random weights): seconds per video frame.

Text encoding (Llama 8B + CLIP-L), SigLIP, VAE encode, the 13B transformer for every
section and step, and VAE decode, through `Pipeline.generate`, with the step cache off,
TeaCache 0.15 or MagCache at its authors' defaults (benchmarks/step_caches.py).
The weights are random (no downloads here), built directly on the GPU in the public
models' full configurations; the tokenizers are the tiny bundle's (token ids only
select rows of the embedding table, so their vocabulary size does not change the cost).

    python benchmarks/generation.py [--seconds 5] [--steps 25] [--runs exact-off,exact-magcache,fp8-teacache]
        [--no-kernels] [--fused-qkv] [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_caches import STEP_CACHES  # noqa: E402
from transformer_forward import FULL_CONFIG  # noqa: E402

from framepack_backend.components import Components  # noqa: E402
from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402
from framepack_backend.pipeline import Pipeline, configure_transformer  # noqa: E402
from framepack_backend.request import GenerationRequest  # noqa: E402
from framepack_backend.settings import EngineOptions  # noqa: E402
from framepack_backend.testing.tiny_bundle import write_tiny_bundle  # noqa: E402
from framepack_backend.vae_fast import configure_vae  # noqa: E402
from framepack_server.demo import SAMPLE_IMAGE  # noqa: E402

from results_file import save_result  # noqa: E402


def build_components(device: torch.device, weight_scale: float) -> Components:
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        LlamaConfig,
        LlamaModel,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    tiny = write_tiny_bundle(Path(tempfile.mkdtemp()) / "tiny")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device(device):
        llama = LlamaModel(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128320,
                                       max_position_embeddings=8192, rope_theta=500000.0))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, vocab_size=49408, projection_dim=768))
        siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304,
                                                      num_hidden_layers=27, num_attention_heads=16,
                                                      image_size=384, patch_size=14))
        vae = AutoencoderKLHunyuanVideo()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        transformer = FramePackTransformer(**FULL_CONFIG)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(weight_scale)
    for model in (llama, clip, siglip, vae, transformer):
        model.eval().requires_grad_(False)
    return Components(
        tokenizer=PreTrainedTokenizerFast.from_pretrained(tiny / "tokenizer"),
        text_encoder=llama,
        tokenizer_2=CLIPTokenizer.from_pretrained(tiny / "tokenizer_2"),
        text_encoder_2=clip,
        vae=vae,
        feature_extractor=SiglipImageProcessor(size={"height": 384, "width": 384}),
        image_encoder=siglip,
        transformer=transformer,
    )


# precision-step cache; exact runs first, since quantizing to FP8 cannot be undone
RUNS = tuple(f"{precision}-{cache}" for precision in ("exact", "fp8") for cache in STEP_CACHES)
PROMPT = "a character dances in the rain"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock interval covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def generate_once(pipeline: Pipeline, image: np.ndarray, settings: dict) -> dict:
    synchronize(pipeline.device)
    start = time.perf_counter()
    first_section_s = result = None
    for event in pipeline.generate(GenerationRequest.parse(image, PROMPT, **settings)):
        name = type(event).__name__
        if name == "SectionFinished" and first_section_s is None:
            first_section_s = time.perf_counter() - start
        if name == "GenerationResult":
            result = event
    synchronize(pipeline.device)
    total = time.perf_counter() - start
    frames = result.frames.shape[0]
    return dict(frames=frames, width=result.width, height=result.height, total_s=total,
                s_per_frame=total / frames, first_section_s=first_section_s, timings=result.timings,
                peak_gib=peak_gib(pipeline.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--no-kernels", action="store_true", help="eager blocks instead of the fused kernels")
    parser.add_argument("--fused-qkv", action="store_true", help="q/k/v as one GEMM (EngineOptions.fused_qkv)")
    parser.add_argument("--cuda-graphs", action="store_true", help="blocks replayed from CUDA graphs")
    parser.add_argument("--fast-vae-decode", action=argparse.BooleanOptionalAction,
                        help="the engine's VAE decode speed-up (default: the engine's, on for CUDA with Triton)")
    parser.add_argument("--weight-scale", type=float, default=0.05)
    parser.add_argument("--runs", default="exact-off,exact-teacache",
                        help=f"comma-separated, in this order of choice: {', '.join(RUNS)} (fp8 runs come last: "
                             "quantizing is irreversible)")
    parser.add_argument("--blend-latents", type=int, nargs="*", default=[None],
                        help="latents re-decoded for the cross-fade, one run each (default: the engine's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    wanted = args.runs.split(",")
    if not set(wanted) <= set(RUNS):
        sys.exit(f"--runs {args.runs!r}: expected names from {', '.join(RUNS)}")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/generation.py needs a CUDA GPU")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    components = build_components(device, args.weight_scale)
    # The engine's options (Pipeline.from_pretrained): fused kernels unless --no-kernels, fp32 output,
    # the fast VAE decode unless --no-fast-vae-decode.
    options = configure_transformer(components.transformer, device, EngineOptions(
        fused_kernels=not args.no_kernels, fused_qkv=args.fused_qkv, cuda_graphs=args.cuda_graphs,
        fast_vae_decode=args.fast_vae_decode))
    options = configure_vae(components.vae, device, options)
    pipeline = Pipeline(components, device, torch.bfloat16, Path("<random full-size weights>"), options)
    print(f"built full-size random components in {time.perf_counter() - t0:.1f} s", flush=True)
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    runs = []
    for name in (r for r in RUNS if r in wanted):
        precision, cache = name.split("-")
        if precision == "fp8" and not any(r["precision"] == "fp8" for r in runs):
            components.transformer.quantize_fp8()
        for blend in args.blend_latents:
            settings = {"seconds": args.seconds, "steps": args.steps, "memory_mode": "resident", "preview": True,
                        **STEP_CACHES[cache]}
            if blend is not None:
                settings["blend_latents"] = blend
            run = dict(precision=precision, cache=cache, blend_latents=blend,
                       **generate_once(pipeline, image, settings))
            runs.append(run)
            print(json.dumps(run, default=str), flush=True)

    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}: {args.seconds} s video, {args.steps} steps, fused kernels {not args.no_kernels}")
    for run in runs:
        print(f"{run['precision']:5s} cache {run['cache']:8s} "
              f"blend {run['blend_latents'] or 'default'}: {run['frames']} frames "
              f"{run['width']}x{run['height']} in {run['total_s']:.1f} s = {run['s_per_frame']:.3f} s/frame")
    save_result(args.out, "generation", "generation", fused_kernels=not args.no_kernels, fused_qkv=args.fused_qkv,
                cuda_graphs=args.cuda_graphs, fast_vae_decode=options.fast_vae_decode, runs=runs)

if __name__ == "__main__":
    main()
