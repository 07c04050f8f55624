"""HunyuanVideo VAE decode of one section (fp16, random weights): cuDNN autotuning on vs off.

The VAE is diffusers' `AutoencoderKLHunyuanVideo`; its 3-D convolutions run through
cuDNN, whose algorithm choice `torch.backends.cudnn.benchmark` can autotune per shape.
A server decodes the same bucket shapes job after job, so a one-time tuning cost could
pay back. This measures both settings on the same latents and the output difference.

    python benchmarks/vae_decode.py [--latent-frames 10] [--height 544] [--width 704]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]


def timed_decode(vae, latents) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        video = vae.decode(latents).sample
    torch.cuda.synchronize()
    return time.perf_counter() - start, video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-frames", type=int, default=10, help="a section's latents (10 -> 37 frames)")
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/vae_decode.py needs a CUDA GPU")
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLHunyuanVideo().to(torch.float16).eval()
    latents = torch.randn(1, 16, args.latent_frames, args.height // 8, args.width // 8, device="cuda",
                          dtype=torch.float16)
    results = {}
    outputs = {}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        first, _ = timed_decode(vae, latents)
        second, outputs[benchmark] = timed_decode(vae, latents)
        third, _ = timed_decode(vae, latents)
        results[f"cudnn_benchmark_{str(benchmark).lower()}"] = dict(first_s=first, s=min(second, third))
        print(f"cudnn.benchmark={benchmark}: first decode {first:.2f} s, then {min(second, third):.2f} s", flush=True)
    diff = float((outputs[True].float() - outputs[False].float()).abs().max())
    frames = outputs[True].shape[2]
    print(f"{frames} frames; max |difference| between the two settings: {diff:.2e}")
    save_result(args.out, "vae_decode", "vae_decode", versions=dict(diffusers=__import__("diffusers").__version__),
                frames=frames, max_abs_difference=diff, **results)


if __name__ == "__main__":
    main()
