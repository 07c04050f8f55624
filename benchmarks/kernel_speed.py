"""Each Triton kernel vs torch at the 640-bucket block shapes, same run, same inputs.

Shapes: B=1, S=19,300 tokens (19,200 image + 100 text), C=3072, H=24, D=128, bf16.
Per kernel it times:
- ours: the Triton kernel;
- eager_reference: its float32 torch reference, eager;
- compiled_reference: `torch.compile` of that reference (inductor fuses it too);
- eager_bf16: the op chain the diffusers blocks run today (bf16 intermediates).
`peer` is the fastest of the three torch variants; ratio = peer / ours (> 1: ours
faster, as in every benchmark here). Every time is the median over repeats of CUDA-event timings of 10
back-to-back calls, after warm-up. Prints a table
and writes JSON under benchmarks/results/.

    python benchmarks/kernel_speed.py [--repeats 50] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# The repository root goes first so the local packages are the ones imported.
sys.path.insert(0, str(ROOT))

import framepack_kernels as kernels  # noqa: E402

IMAGE_TOKENS, TEXT_TOKENS, CHANNELS, HEADS, HEAD_DIM = 19_200, 100, 3072, 24, 128
TOKENS = IMAGE_TOKENS + TEXT_TOKENS
EPS = 1e-6
# TeaCache's rescale polynomial (SPEC §7), highest power first.
TEACACHE_COEFFS = [7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02]


def require_cuda() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("benchmarks/kernel_speed.py: TRITON_INTERPRET=1 is set; unset it to time compiled kernels")
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/kernel_speed.py needs a CUDA GPU (torch.cuda.is_available() is False). "
            "On CPU, check the kernels with: python -m pytest tests/test_kernels.py"
        )


# --- the op chains diffusers runs today (bf16 intermediates), written out here ------


def adaln_eager_bf16(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def qk_eager_bf16(x, weight, cos, sin, rope_tokens):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = (x * torch.rsqrt(variance + EPS)).to(weight.dtype) * weight
    image = normed[:, :rope_tokens]
    real, imag = image.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    image = (image.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)
    return torch.cat([image, normed[:, rope_tokens:]], dim=1)


def gated_residual_eager_bf16(x, y, gate):
    return x + y * gate[:, None]


def gated_residual_norm_eager_bf16(x, y, gate, shift, scale):
    residual = x + y * gate[:, None]
    return residual, adaln_eager_bf16(residual, shift, scale)


def teacache_eager_bf16(current, previous, acc, coeffs, threshold):
    rel = (current - previous).abs().mean() / previous.abs().mean()
    return kernels.teacache_accumulate_reference(acc, rel.float(), coeffs, threshold)


def teacache_ours(current, previous, acc, coeffs, threshold):
    return kernels.teacache_accumulate(acc, kernels.teacache_relative_l1(current, previous), coeffs, threshold)


def teacache_reference(current, previous, acc, coeffs, threshold):
    rel = kernels.teacache_relative_l1_reference(current, previous)
    return kernels.teacache_accumulate_reference(acc, rel, coeffs, threshold)


# --- timing -------------------------------------------------------------------------


def time_cuda(fn: Callable[[], object], repeats: int, calls: int = 10, warmup: int = 3) -> dict[str, float]:
    """Seconds per call: `calls` back-to-back calls between two events, `repeats` times.

    Back-to-back calls queue on the GPU while Python prepares the next, as they do
    inside the transformer, so the host-side cost of a call is hidden unless it
    exceeds the kernel's own time.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def max_abs_error(ours, reference) -> float:
    if isinstance(ours, tuple):
        return max(max_abs_error(o, r) for o, r in zip(ours, reference))
    return (ours.float() - reference.float()).abs().max().item()


def make_cases(device: torch.device) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x, y = rnd(1, TOKENS, CHANNELS), rnd(1, TOKENS, CHANNELS)
    emb = rnd(1, 6 * CHANNELS)  # the modulation projection; its chunks are strided views
    shift, scale, gate = emb[:, :CHANNELS], emb[:, CHANNELS : 2 * CHANNELS], emb[:, 2 * CHANNELS : 3 * CHANNELS]
    q = rnd(1, TOKENS, HEADS, HEAD_DIM)
    weight = rnd(HEAD_DIM).abs() + 0.5
    angles = torch.rand(IMAGE_TOKENS, HEAD_DIM // 2, generator=g) * 6.28
    cos = angles.cos().repeat_interleave(2, -1).to(device)
    sin = angles.sin().repeat_interleave(2, -1).to(device)
    previous = x
    current = (x.float() + 0.05 * rnd(1, TOKENS, CHANNELS, dtype=torch.float32)).to(torch.bfloat16)
    acc = torch.zeros((), device=device)
    coeffs = torch.tensor(TEACACHE_COEFFS, device=device)
    act = TOKENS * CHANNELS * 2  # bytes of one bf16 activation tensor
    return [
        dict(
            name="adaln_layernorm_modulate",
            args=(x, shift, scale),
            ours=kernels.adaln_layernorm_modulate,
            reference=kernels.adaln_layernorm_modulate_reference,
            eager_bf16=adaln_eager_bf16,
            bytes=2 * act,
        ),
        dict(
            name="qk_rmsnorm_rope",
            args=(q, weight, cos, sin, EPS, IMAGE_TOKENS),
            ours=kernels.qk_rmsnorm_rope,
            reference=kernels.qk_rmsnorm_rope_reference,
            eager_bf16=lambda x_, w, c, s, _eps, n: qk_eager_bf16(x_, w, c, s, n),
            bytes=2 * act + 2 * cos.numel() * 4,
        ),
        dict(
            name="gated_residual",
            args=(x, y, gate),
            ours=kernels.gated_residual,
            reference=kernels.gated_residual_reference,
            eager_bf16=gated_residual_eager_bf16,
            bytes=3 * act,
        ),
        dict(
            name="gated_residual_layernorm_modulate",
            args=(x, y, gate, shift, scale),
            ours=kernels.gated_residual_layernorm_modulate,
            reference=kernels.gated_residual_layernorm_modulate_reference,
            eager_bf16=gated_residual_norm_eager_bf16,
            bytes=4 * act,
        ),
        dict(
            name="teacache_relative_l1+accumulate",
            args=(current, previous, acc, coeffs, 0.15),
            ours=teacache_ours,
            reference=teacache_reference,
            eager_bf16=teacache_eager_bf16,
            bytes=2 * act,
        ),
    ]


def run_case(case: dict, repeats: int) -> dict:
    args = case["args"]
    compiled = torch.compile(case["reference"], dynamic=False)
    ours_out = case["ours"](*args)
    reference_out = case["reference"](*args)
    variants = {
        "eager_reference": lambda: case["reference"](*args),
        "compiled_reference": lambda: compiled(*args),
        "eager_bf16": lambda: case["eager_bf16"](*args),
    }
    timings, errors = {}, {}
    for name, fn in variants.items():
        try:
            timings[name] = time_cuda(fn, repeats)
        except Exception as error:  # a failed torch.compile must not cost the other numbers
            print(f"{case['name']}: {name} failed: {error!r}", file=sys.stderr)
            errors[name] = repr(error)
    ours = time_cuda(lambda: case["ours"](*args), repeats)
    peer_name = min(timings, key=lambda name: timings[name]["median_s"])
    peer_s = timings[peer_name]["median_s"]
    return {
        "ours_s": ours["median_s"],
        "ours_spread_s": [ours["min_s"], ours["max_s"]],
        "peer": peer_name,
        "peer_s": peer_s,
        "ratio": peer_s / ours["median_s"],
        "ours_GBps": case["bytes"] / ours["median_s"] / 1e9,
        "max_abs_error_vs_reference": max_abs_error(ours_out, reference_out),
        **{f"{name}_s": t["median_s"] for name, t in timings.items()},
        **{f"{name}_spread_s": [t["min_s"], t["max_s"]] for name, t in timings.items()},
        **({"errors": errors} if errors else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/kernels-<gpu>.json)")
    args = parser.parse_args()
    require_cuda()

    import triton

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    results = {}
    with torch.no_grad():
        for case in make_cases(device):
            results[case["name"]] = run_case(case, args.repeats)

    header = (
        f"{'kernel':36s} {'ours ms':>8s} {'GB/s':>6s} {'eager ms':>9s} {'compiled ms':>11s} "
        f"{'bf16 chain ms':>13s} {'ours/peer':>9s}  max err"
    )
    print(f"GPU: {gpu}\n{header}")
    for name, r in results.items():
        ms = {
            k: f"{r[k + '_s'] * 1e3:.3f}" if k + "_s" in r else "failed"
            for k in ("eager_reference", "compiled_reference", "eager_bf16")
        }
        print(
            f"{name:36s} {r['ours_s'] * 1e3:8.3f} {r['ours_GBps']:6.0f} {ms['eager_reference']:>9s} "
            f"{ms['compiled_reference']:>11s} {ms['eager_bf16']:>13s} {r['ratio']:9.3f}  "
            f"{r['max_abs_error_vs_reference']:.3g}"
        )

    report = {
        "gpu": gpu,
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "command": "python benchmarks/kernel_speed.py " + " ".join(sys.argv[1:]),
        "shapes": {"batch": 1, "tokens": TOKENS, "image_tokens": IMAGE_TOKENS, "channels": CHANNELS,
                   "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "repeats": args.repeats,
        "kernels": results,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"kernels-{gpu.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
