"""One transformer forward at the 640 bucket, full 13B config: ours vs diffusers, same run.

Same process, same weights (one random state dict shared by both models), same inputs.
Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/transformer_forward.py [--config full|small] [--repeats 5] [--no-compile]

Beside diffusers eager (and its blocks compiled, unless --no-compile), ours: eager, fused
kernels, + CUDA graphs (the blocks replayed, capture time reported), + q/k/v as one GEMM,
FP8 with the same variants; each against diffusers as a ratio. Ours is not compiled: with
the fused kernels inductor found nothing left to fuse (0.908 s compiled against 0.896 eager
on an H200), so the engine has no compile path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack_backend.attention import Attend, available_backends  # noqa: E402
from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402

FULL_CONFIG = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), image_condition_type=None, has_image_proj=True, image_proj_dim=1152,
    has_clean_x_embedder=True,
)
# A quick configuration for trying the script itself (same shapes, fewer blocks).
SMALL_CONFIG = dict(FULL_CONFIG, num_layers=2, num_single_layers=4)


def random_model(model_class, config: dict, device, dtype, weight_scale: float) -> torch.nn.Module:
    """`model_class(**config)` built on `device` in `dtype` from seed 0, every weight ×weight_scale, for inference."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(**config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    return model.eval().requires_grad_(False)


def transformer_sharing_weights(model_class, config: dict, source: torch.nn.Module) -> torch.nn.Module:
    """A `model_class` transformer (ours or diffusers') holding `source`'s weights, not a copy.

    Both classes take the same config and state-dict keys (SPEC: safetensors keys identical),
    so the new model is built without memory and its parameters wrap `source`'s storage:
    one 13B state dict serves both sides of a race. Converting a parameter of one model
    later (e.g. our fp32 output projection) replaces only that model's tensor.
    """
    with torch.device("meta"):
        model = model_class(**config)
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def make_inputs(device, dtype, latent_hw=(80, 80), window=9, text_tokens=100, seed=0, config=FULL_CONFIG):
    """One last-section forward's inputs; the feature sizes are `config`'s."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = latent_hw
    channels = config["in_channels"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    pad = 0  # the last section (video start): [1 | window | 1 | 2 | 16]
    idx = torch.arange(1 + pad * window + window + 1 + 2 + 16)
    start, _, latents, clean_1x, clean_2x, clean_4x = idx.split([1, pad * window, window, 1, 2, 16])
    return dict(
        hidden_states=rnd(1, channels, window, h, w),
        timestep=torch.tensor([900.0], device=device, dtype=dtype),
        encoder_hidden_states=rnd(1, text_tokens, config["text_embed_dim"]),
        encoder_attention_mask=torch.ones(1, text_tokens, dtype=torch.bool, device=device),
        pooled_projections=rnd(1, config["pooled_projection_dim"]),
        image_embeds=rnd(1, 729, config["image_proj_dim"]),
        indices_latents=latents.to(device),
        guidance=torch.tensor([10000.0], device=device, dtype=dtype),
        latents_clean=rnd(1, channels, 2, h, w),
        indices_latents_clean=torch.cat([start, clean_1x]).to(device),
        latents_history_2x=rnd(1, channels, 2, h, w),
        indices_latents_history_2x=clean_2x.to(device),
        latents_history_4x=rnd(1, channels, 16, h, w),
        indices_latents_history_4x=clean_4x.to(device),
    )


def time_forward(model, inputs, repeats, warmup=2):
    out = None
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = model(**inputs, return_dict=False)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(**inputs, return_dict=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return statistics.median(times), min(times), max(times), warmup_s, out


def relative_error(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("full", "small"), default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip diffusers with compiled blocks")
    parser.add_argument("--backends", nargs="*", help="attention backends to time eagerly (default: all available)")
    parser.add_argument("--fused-backends", nargs="*", default=["sdpa"],
                        help="attention backends to time with the fused kernels; the fastest exact one also runs "
                             "with CUDA graphs, fused q/k/v and FP8, an inexact one (cudnn-fp8) also with FP8 "
                             "linears (default: sdpa)")
    parser.add_argument("--weight-scale", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/transformer_forward.py needs a CUDA GPU")
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    dtype, device = torch.bfloat16, torch.device("cuda")
    config = FULL_CONFIG if args.config == "full" else SMALL_CONFIG
    peer = random_model(HunyuanVideoFramepackTransformer3DModel, config, device, dtype, args.weight_scale)
    ours = transformer_sharing_weights(FramePackTransformer, config, peer)
    inputs = make_inputs(device, dtype)
    rows, results = [], []

    def measure(name, model, peer_name="diffusers", peer_s=None, peer_out=None, attend=None):
        run_inputs = inputs if attend is None else dict(inputs, attend=attend)
        s, mn, mx, warm, out = time_forward(model, run_inputs, args.repeats)
        assert torch.isfinite(out).all(), f"{name}: output is not finite"
        err = None if peer_out is None else relative_error(out, peer_out)
        rows.append((name, s, mn, mx, warm, err))
        print(f"{name:34s} {s:8.4f} s  warm-up {warm:6.1f} s  rel err {err}", flush=True)
        return s, out

    with torch.inference_mode():
        peer_s, peer_out = measure("diffusers eager", peer)
        ours_runs = {}
        for backend in args.backends or available_backends():
            ours_runs[f"eager-{backend}"] = measure(f"ours eager {backend}", ours, peer_out=peer_out,
                                                    attend=Attend.named(backend))[0]
        ours.set_fused_kernels(True)
        fused_s = {}
        for backend in args.fused_backends:
            name = "fused-kernels" if backend == "sdpa" else f"fused-kernels-{backend}"
            label = "" if backend == "sdpa" else f" ({backend})"
            fused_s[backend] = ours_runs[name] = measure(f"ours fused kernels{label}", ours, peer_out=peer_out,
                                                         attend=Attend.named(backend))[0]
        # Inexact backends (FP8 attention) get their own rows; the exact options below build on the fastest exact one.
        inexact = [backend for backend in fused_s if not Attend.named(backend).backend.exact]
        fastest = min((b for b in fused_s if b not in inexact), key=fused_s.get)
        suffix, label = ("", "") if fastest == "sdpa" else (f"-{fastest}", f" ({fastest})")
        fastest_attend = Attend.named(fastest)
        # The FramePack demo's fp32 final projection (the engine's default for bf16 weights).
        ours.set_fp32_output(True)
        ours_runs[f"fused-kernels-fp32-output{suffix}"] = measure(f"ours fused kernels + fp32 output{label}", ours,
                                                                  peer_out=peer_out, attend=fastest_attend)[0]
        ours.set_fp32_output(False)
        captures = {}

        def with_graphs(name, model):
            model.enable_cuda_graphs(True)
            ours_runs[name] = measure(f"ours {name.replace('-', ' ')}", model, peer_out=peer_out,
                                      attend=fastest_attend)[0]
            captures[name] = model.block_graphs.capture_s
            print(f"  capture {captures[name]} s", flush=True)
            model.enable_cuda_graphs(False)

        with_graphs(f"fused-kernels-graphs{suffix}", ours)
        ours.fuse_qkv()  # from here on, `ours` runs q/k/v as one GEMM
        ours_runs[f"fused-kernels-qkv{suffix}"] = measure(f"ours fused kernels + qkv{label}", ours,
                                                          peer_out=peer_out, attend=fastest_attend)[0]
        with_graphs(f"fused-kernels-qkv-graphs{suffix}", ours)
        if torch.cuda.get_device_capability() >= (9, 0):
            fp8 = transformer_sharing_weights(FramePackTransformer, config, peer)
            fp8.quantize_fp8()
            fp8.set_fused_kernels(True)
            ours_runs[f"fp8-fused-kernels{suffix}"] = measure(f"ours fp8 + fused kernels{label}", fp8,
                                                              peer_out=peer_out, attend=fastest_attend)[0]
            with_graphs(f"fp8-fused-kernels-graphs{suffix}", fp8)
            for backend in inexact:
                ours_runs[f"fp8-fused-kernels-{backend}"] = measure(f"ours fp8 + fused kernels ({backend})", fp8,
                                                                    peer_out=peer_out, attend=Attend.named(backend))[0]
            fp8_qkv = transformer_sharing_weights(FramePackTransformer, config, peer)
            fp8_qkv.fuse_qkv()
            fp8_qkv.quantize_fp8()
            fp8_qkv.set_fused_kernels(True)
            ours_runs[f"fp8-fused-kernels-qkv{suffix}"] = measure(f"ours fp8 + fused kernels + qkv{label}", fp8_qkv,
                                                                  peer_out=peer_out, attend=fastest_attend)[0]
            with_graphs(f"fp8-fused-kernels-qkv-graphs{suffix}", fp8_qkv)
            del fp8_qkv
            del fp8
        peers = {"diffusers": peer_s}
        if not args.no_compile:
            for block in list(peer.transformer_blocks) + list(peer.single_transformer_blocks):
                block.compile()
            peers["diffusers-compiled"] = measure("diffusers compiled blocks", peer, peer_out=peer_out)[0]
        for ours_name, ours_s in ours_runs.items():
            for peer_name, p_s in peers.items():
                results.append(dict(ours=ours_name, peer=peer_name, ours_s=ours_s, peer_s=p_s, ratio=p_s / ours_s))

    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}, config={args.config}, bf16, latent 80x80, window 9")
    print(f"{'model':32s} {'median s':>9s} {'min':>7s} {'max':>7s} {'warm-up s':>9s} {'rel err':>9s}")
    for name, s, mn, mx, warm, err in rows:
        print(f"{name:32s} {s:9.4f} {mn:7.4f} {mx:7.4f} {warm:9.2f} {'' if err is None else f'{err:9.2e}'}")
    save_result(
        args.out, f"transformer_forward_{args.config}", "transformer_forward", config=args.config,
        versions=dict(diffusers=__import__("diffusers").__version__),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30, graph_capture_s=captures,
        rows=[dict(model=r[0], median_s=r[1], min_s=r[2], max_s=r[3], warmup_s=r[4], rel_error=r[5]) for r in rows],
        pairs=results,
    )


if __name__ == "__main__":
    main()
