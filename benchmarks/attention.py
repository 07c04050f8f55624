"""Attention alone at the 640 bucket: each backend, each memory layout, TFLOP/s.

The blocks hand attention (batch, seq, heads, head_dim) tensors; SDPA-style kernels
want (batch, heads, seq, head_dim). This times both: the transposed view the engine
passes, and the same values stored heads-first, plus a sequence padded to a multiple
of 128 — to show what a layout change or padding would buy before building it.

    python benchmarks/attention.py [--seq 19229] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack_backend.attention import attention, available_backends  # noqa: E402


def time_call(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=19229, help="joint tokens (640 bucket, window 9, ~100 text)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    rows = []
    padded = -(-args.seq // 128) * 128
    for seq in (args.seq, padded):
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (1, seq, args.heads, args.head_dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        heads_first = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
        flops = 4 * seq * seq * args.heads * args.head_dim
        reference = attention(q, k, v, "sdpa").float()
        for backend in available_backends():
            for layout, (lq, lk, lv) in (("seq-first", (q, k, v)), ("heads-first", heads_first)):
                out = attention(lq, lk, lv, backend)
                err = float((out.float() - reference).norm() / reference.norm())
                s = time_call(lambda: attention(lq, lk, lv, backend), args.repeats)
                rows.append(dict(backend=backend, layout=layout, seq=seq, s=s, tflops=flops / s / 1e12, rel_error=err))
                print(f"{backend:8s} {layout:11s} seq {seq:6d}: {s * 1e3:7.2f} ms  {flops / s / 1e12:6.1f} TFLOP/s  "
                      f"rel err vs sdpa {err:.1e}", flush=True)
    gpu = torch.cuda.get_device_name()
    record = dict(benchmark="attention", gpu=gpu, command=" ".join(sys.argv),
                  versions=dict(torch=torch.__version__, python=platform.python_version(),
                                cudnn=torch.backends.cudnn.version()), rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
