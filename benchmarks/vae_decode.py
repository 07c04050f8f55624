"""HunyuanVideo VAE decode (full config, random weights, fp16): diffusers' decode vs ours, same latents, same run.

Ours is diffusers' module with `framepack_backend.vae_fast.accelerate_vae` applied
(channels_last_3d activations, GroupNorm+SiLU written into each causal conv's padded
input). Two decodes a job makes at the default window 9 and 704×544: a section of 10
latent frames (37 video frames) and the last inverted section's decode with its
cross-fade overlap, 2·9+1 = 19 latent frames (73 frames). Each is decoded by diffusers
and by ours (first call, then the best of `--repeats`), optionally ours with cuDNN
autotuning too, and once in fp32 without TF32, the values both fp16 decodes approximate:
the fp16 noise is the stock decode's own error against it.

    python benchmarks/vae_decode.py [--latent-frames 10 19] [--height 544] [--width 704] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_decode(vae, latents) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        video = vae.decode(latents).sample
    torch.cuda.synchronize()
    return time.perf_counter() - start, video


def timings(vae, latents, repeats: int) -> tuple[dict, torch.Tensor]:
    first, video = timed_decode(vae, latents)
    best = min(timed_decode(vae, latents)[0] for _ in range(repeats))
    return dict(first_s=first, s=best, peak_gib=torch.cuda.max_memory_allocated() / 2**30), video


def top_kernels(vae, latents, rows: int = 15) -> list[dict]:
    """The GPU kernels of one decode by total device time (where a decode's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        vae.decode(latents)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:rows]
    return [dict(name=e.key[:120], ms=e.device_time_total / 1e3, calls=e.count) for e in events]


def errors(video: torch.Tensor, reference: torch.Tensor) -> dict:
    error = (video.float() - reference).abs()
    return dict(max=float(error.max()), mean=float(error.mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-frames", type=int, nargs="+", default=[10, 19],
                        help="latent frames per decode (10: a section; 19: the last section with its overlap)")
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--repeats", type=int, default=2, help="timed decodes after the first (best is kept)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="skip ours with cuDNN autotuning")
    parser.add_argument("--no-reference", action="store_true", help="skip the fp32 decode (no errors vs fp32)")
    parser.add_argument("--profile", action="store_true", help="also record each decode's top GPU kernels")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/vae_decode.py needs a CUDA GPU")
    from diffusers import AutoencoderKLHunyuanVideo

    from framepack_backend.vae_fast import accelerate_vae

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae32 = AutoencoderKLHunyuanVideo().eval()
    stock = copy.deepcopy(vae32).half()
    fast = accelerate_vae(copy.deepcopy(stock))
    results = {}
    for frames in args.latent_frames:
        latents = torch.randn(1, 16, frames, args.height // 8, args.width // 8, device="cuda")
        row: dict = {}
        torch.cuda.reset_peak_memory_stats()
        row["stock"], stock_video = timings(stock, latents.half(), args.repeats)
        torch.cuda.reset_peak_memory_stats()
        row["fast"], fast_video = timings(fast, latents.half(), args.repeats)
        row["speedup"] = row["stock"]["s"] / row["fast"]["s"]
        row["fast_vs_stock"] = errors(fast_video, stock_video.float())
        if not args.no_cudnn_benchmark:
            with torch.backends.cudnn.flags(enabled=True, benchmark=True):
                torch.cuda.reset_peak_memory_stats()
                row["fast_cudnn_benchmark"], tuned_video = timings(fast, latents.half(), args.repeats)
            row["speedup_cudnn_benchmark"] = row["stock"]["s"] / row["fast_cudnn_benchmark"]["s"]
            row["fast_cudnn_benchmark_vs_stock"] = errors(tuned_video, stock_video.float())
            del tuned_video
        if not args.no_reference:
            with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                reference = vae32.decode(latents).sample
            row["stock_vs_fp32"] = errors(stock_video, reference)
            row["fast_vs_fp32"] = errors(fast_video, reference)
            del reference
        if args.profile:
            for name, vae in (("stock", stock), ("fast", fast)):
                row[f"{name}_top_kernels"] = top_kernels(vae, latents.half())
                print(f"{frames} latent frames, {name}: " + "; ".join(
                    f"{k['name'][:60]} {k['ms']:.1f} ms ×{k['calls']}" for k in row[f"{name}_top_kernels"][:8]))
        row["video_frames"] = fast_video.shape[2]
        del stock_video, fast_video
        results[f"latent_frames_{frames}"] = row
        line = (f"{frames} latent frames ({row['video_frames']} video frames) at {args.width}x{args.height}: "
                f"diffusers {row['stock']['s']:.3f} s, ours {row['fast']['s']:.3f} s ({row['speedup']:.2f}x)")
        if "speedup_cudnn_benchmark" in row:
            line += f", ours + cudnn.benchmark {row['fast_cudnn_benchmark']['s']:.3f} s " \
                    f"({row['speedup_cudnn_benchmark']:.2f}x)"
        line += f"; max |ours - diffusers| {row['fast_vs_stock']['max']:.2e}"
        if "stock_vs_fp32" in row:
            stock_error, fast_error = row["stock_vs_fp32"], row["fast_vs_fp32"]
            line += (f"; vs fp32: diffusers max {stock_error['max']:.2e} mean {stock_error['mean']:.2e},"
                     f" ours max {fast_error['max']:.2e} mean {fast_error['mean']:.2e}")
        print(line, flush=True)
    save_result(args.out, "vae_decode", "vae_decode", versions=dict(diffusers=__import__("diffusers").__version__),
                height=args.height, width=args.width, dtype="float16", **results)


if __name__ == "__main__":
    main()
