"""Where one transformer forward spends its GPU time: kernels grouped by kind.

Full 13B config, random weights (×0.05), bf16, latent 80×80, window 9 — the shapes of
benchmarks/transformer_forward.py. One forward per path under torch.profiler after a
warm-up; kernels are grouped into attention, GEMM, our Triton kernels and the rest
(elementwise, copies, reductions). Also reports GPU busy time against wall time, which
shows whether the host keeps the GPU fed.

    python benchmarks/profile_forward.py [--paths fused,eager,fp8-fused] [--attention cudnn-fp8] [--top 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from transformer_forward import FULL_CONFIG, make_inputs, random_model  # noqa: E402

from framepack_backend.attention import Attend  # noqa: E402
from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402

PATHS = ("eager", "fused", "fp8-fused")  # fp8 last: quantizing replaces the layers
KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "attn")),
    ("fp8 quantize", ("_quantize", "_amax", "_dequantize")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "scaled_mm", "sm90", "matmul")),
    ("our triton kernels", ("_adaln_", "_qk_rmsnorm", "_gated_residual", "_teacache", "_abs_diff", "_relative_l1")),
    ("layer/rms norm", ("layer_norm", "rms_norm", "layernorm")),
    ("copy/cat", ("copy", "cat", "concat")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "elementwise/other"


def profile_forward(model, inputs) -> dict:
    for _ in range(2):
        model(**inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model(**inputs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name].append(event.device_time_total / 1e3)  # ms
    by_kind: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "launches": 0})
    for name, times in kernels.items():
        entry = by_kind[kind_of(name)]
        entry["ms"] += sum(times)
        entry["launches"] += len(times)
    busy = sum(sum(t) for t in kernels.values())
    top = sorted(((sum(t), len(t), name) for name, t in kernels.items()), reverse=True)
    return dict(wall_ms=wall * 1e3, gpu_busy_ms=busy, launches=sum(len(t) for t in kernels.values()),
                by_kind=dict(by_kind), top=[dict(ms=ms, launches=n, kernel=name[:160]) for ms, n, name in top])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="eager,fused", help=f"comma-separated from {', '.join(PATHS)}")
    parser.add_argument("--attention", default="auto",
                        help="attention backend, as the `attention` setting takes it (auto: the engine's choice)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--weight-scale", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    wanted = args.paths.split(",")
    if not set(wanted) <= set(PATHS):
        sys.exit(f"--paths {args.paths!r}: expected names from {', '.join(PATHS)}")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/profile_forward.py needs a CUDA GPU")
    device = torch.device("cuda")
    model = random_model(FramePackTransformer, FULL_CONFIG, device, torch.bfloat16, args.weight_scale)
    inputs = dict(make_inputs(device, torch.bfloat16),
                  attend=Attend.for_setting(args.attention, device, torch.bfloat16))
    print(f"attention: {inputs['attend'].name}")
    results = {}
    with torch.inference_mode():
        for path in (p for p in PATHS if p in wanted):
            if path == "fp8-fused":
                model.quantize_fp8()
            model.set_fused_kernels(path != "eager")
            result = results[path] = profile_forward(model, inputs)
            print(f"\n{path}: wall {result['wall_ms']:.1f} ms, GPU busy {result['gpu_busy_ms']:.1f} ms, "
                  f"{result['launches']} kernel launches")
            for kind, entry in sorted(result["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
                print(f"  {kind:22s} {entry['ms']:8.1f} ms  {entry['launches']:5d} launches")
            for row in result["top"][: args.top]:
                print(f"    {row['ms']:8.1f} ms {row['launches']:5d}x  {row['kernel'][:110]}")
    save_result(args.out, "profile_forward", "profile_forward", attention=inputs["attend"].name, paths=results)


if __name__ == "__main__":
    main()
