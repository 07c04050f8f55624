"""FP8 GEMMs at the transformer blocks' shapes: row-wise scales (ours) against one scale per tensor, and bf16.

Our FP8 linears (framepack_backend/models/fp8.py) call `torch._scaled_mm` with one scale per
activation row and one per weight channel, so an outlier token does not flatten the rest.
cuBLAS has other kernels for one scale per tensor. This script times both, and the bf16
GEMM, at each linear shape of one forward, sums them over the forward's layer counts, and
reports the error each costs against float32 on the ordinary tokens of activations that also
hold a few outlier tokens (as real hidden states do): with one scale per tensor the outliers
set the scale and push ordinary values toward e4m3's subnormals, so a faster scaling's
accuracy cost stands beside its speed.

    python benchmarks/fp8_gemm.py [--tokens 19229] [--repeats 20]
    python benchmarks/fp8_gemm.py --tiny    # small shapes on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformer_forward import FULL_CONFIG  # noqa: E402

from framepack_backend.models.fp8 import quantize_rows  # noqa: E402
from framepack_kernels.fp8_tensor import quantize_fp8_tensor_reference  # noqa: E402

OUTLIER_ROWS = 0.01  # share of tokens scaled up by --outlier-gain


def block_linears(config: dict) -> list[tuple[str, int, int, int]]:
    """(name, in features, out features, layers per forward) of the blocks' FP8 linears, image stream."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(dim * config["mlp_ratio"])
    dual, single = config["num_layers"], config["num_single_layers"]
    return [
        ("q, k, v, out (dual); q, k, v (single)", dim, dim, 4 * dual + 3 * single),
        ("MLP up (dual), MLP (single)", dim, mlp, dual + single),
        ("MLP down (dual)", mlp, dim, dual),
        ("output [attention | MLP] (single)", dim + mlp, dim, single),
    ]


def operands(tokens: int, k: int, n: int, outlier_gain: float, device, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """The GEMMs to compare (each a closure) and the mask of ordinary (not outlier) rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    outliers = torch.randperm(tokens, generator=g)[: max(1, int(tokens * OUTLIER_ROWS))]
    x[outliers] *= outlier_gain
    ordinary = torch.ones(tokens, dtype=torch.bool)
    ordinary[outliers] = False
    w = torch.randn(n, k, generator=g) * k**-0.5
    bias = torch.randn(n, generator=g) * 0.1
    x, w, bias = (t.to(device) for t in (x, w, bias))
    xb, wb, bb = (t.bfloat16() for t in (x, w, bias))
    x_rows, x_row_scale = quantize_rows(xb)
    w_rows, w_row_scale = quantize_rows(wb)
    # One scale per tensor, as the FP8 attention quantizes q, k and v; [0] is the descale.
    x_tensor, x_tensor_scales = quantize_fp8_tensor_reference(xb)
    w_tensor, w_tensor_scales = quantize_fp8_tensor_reference(wb)
    return dict(
        exact=lambda: torch.addmm(bias, x, w.t()),
        bf16=lambda: torch.addmm(bb, xb, wb.t()),
        fp8_rowwise=lambda: torch._scaled_mm(x_rows, w_rows.t(), scale_a=x_row_scale, scale_b=w_row_scale.t(),
                                             bias=bb, out_dtype=torch.bfloat16),
        fp8_tensorwise=lambda: torch._scaled_mm(x_tensor, w_tensor.t(), scale_a=x_tensor_scales[0],
                                                scale_b=w_tensor_scales[0], bias=bb, out_dtype=torch.bfloat16),
    ), ordinary.to(device)


def seconds(run, repeats: int, device: torch.device) -> float:
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def measure(config: dict, tokens: int, outlier_gain: float, repeats: int, device: torch.device) -> list[dict]:
    rows = []
    for name, k, n, layers in block_linears(config):
        runs, ordinary = operands(tokens, k, n, outlier_gain, device)
        exact = runs.pop("exact")()[ordinary]
        flop = 2 * tokens * k * n
        row = dict(linear=name, tokens=tokens, in_features=k, out_features=n, layers_per_forward=layers)
        for kind, run in runs.items():
            with torch.inference_mode():
                s = seconds(run, repeats, device)
                error = float((run()[ordinary].float() - exact).norm() / exact.norm())
            row[kind] = dict(ms=s * 1e3, tflops=flop / s / 1e12, rel_error=error)
        rows.append(row)
        print(f"{name:40s} {k:5d}->{n:5d} ×{layers:3d}: "
              + ", ".join(f"{kind} {row[kind]['tflops']:7.1f} TFLOP/s err {row[kind]['rel_error']:.1e}"
                          for kind in runs), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=19229, help="rows (640 bucket, window 9, ~100 text tokens)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--outlier-gain", type=float, default=1000.0, help="outlier tokens' scale over the rest")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.tiny:
        device = torch.device("cpu")
        config = dict(FULL_CONFIG, num_attention_heads=2, attention_head_dim=32)
        tokens, repeats = 512, 2
    else:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            sys.exit("benchmarks/fp8_gemm.py needs a GPU with FP8 tensor cores (or --tiny for the CPU)")
        device, config, tokens, repeats = torch.device("cuda"), FULL_CONFIG, args.tokens, args.repeats
    rows = measure(config, tokens, args.outlier_gain, repeats, device)
    forward = {kind: sum(row[kind]["ms"] * row["layers_per_forward"] for row in rows)
               for kind in ("bf16", "fp8_rowwise", "fp8_tensorwise")}
    print("one forward's block GEMMs (image stream): "
          + ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in forward.items()))
    save_result(args.out, "fp8_gemm", "fp8_gemm", config="tiny" if args.tiny else "full", tokens=tokens,
                outlier_rows=OUTLIER_ROWS, outlier_gain=args.outlier_gain, error_on="ordinary rows", rows=rows,
                forward_ms=forward)


if __name__ == "__main__":
    main()
