"""Attention alone at the 640 bucket: each backend, each memory layout, TFLOP/s.

The blocks hand attention (batch, seq, heads, head_dim) tensors; SDPA-style kernels
want (batch, heads, seq, head_dim). This times both: the transposed view the engine
passes, and the same values stored heads-first, plus a sequence padded to a multiple
of 128, padding only the queries or only the keys, and an exact two-pass split of the
keys merged by log-sum-exp — to show what a layout change or alignment would buy
before building it.

    python benchmarks/attention.py [--seq 19229] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.attention

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack_backend.attention import Attend, available_backends  # noqa: E402


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


def cudnn_with_lse(q, k, v):
    """cuDNN attention on (batch, heads, seq, head_dim) tensors, with its log-sum-exp."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    return out, lse.reshape(*q.shape[:3], 1).float()


def split_keys_attention(q, k, v, block: int = 128):
    """Exact attention as two passes over the keys, [aligned part | remainder], merged by
    their log-sum-exp: a way to run the fast aligned kernel on an unaligned length."""
    split = k.shape[2] // block * block
    o1, l1 = cudnn_with_lse(q, k[:, :, :split], v[:, :, :split])
    o2, l2 = cudnn_with_lse(q, k[:, :, split:], v[:, :, split:])
    lse = torch.logaddexp(l1, l2)
    return (o1 * (l1 - lse).exp() + o2 * (l2 - lse).exp()).to(q.dtype)


def padded(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(*t.shape[:2], length - t.shape[2], t.shape[3])], dim=2)


def alignment_rows(seq: int, heads: int, head_dim: int, repeats: int) -> list[dict]:
    """Heads-first cuDNN at `seq`: padding queries only or keys only (timing), and the exact
    split-keys merge (timing and error)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    aligned = -(-seq // 128) * 128
    flops = 4 * seq * seq * heads * head_dim
    def cudnn():  # a fresh context each time: sdpa_kernel's is single-use
        return torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION])

    with cudnn():
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    variants = {
        "as is": lambda: sdpa(q, k, v),
        "queries padded": lambda: sdpa(padded(q, aligned), k, v),
        "keys padded (inexact)": lambda: sdpa(q, padded(k, aligned), padded(v, aligned)),
        "split keys + merge (exact)": lambda: split_keys_attention(q, k, v),
    }
    rows = []
    for name, fn in variants.items():
        with cudnn():  # as the engine's `sdpa` backend: cuDNN first
            out = fn()[:, :, :seq].float()
            err = float((out - reference).norm() / reference.norm())
            s = time_call(fn, repeats)
        rows.append(dict(backend="sdpa (cuDNN)", layout=f"heads-first, {name}", seq=seq, s=s, tflops=flops / s / 1e12,
                         rel_error=err))
        print(f"cuDNN heads-first {name:27s} seq {seq}: {s * 1e3:7.2f} ms  {flops / s / 1e12:6.1f} TFLOP/s (real "
              f"work)  rel err {err:.1e}", flush=True)
    return rows


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
        reference = Attend.named("sdpa").local(q, k, v).float()
        for backend in available_backends():
            attend = Attend.named(backend)
            for layout, (lq, lk, lv) in (("seq-first", (q, k, v)), ("heads-first", heads_first)):
                out = attend.local(lq, lk, lv)
                err = float((out.float() - reference).norm() / reference.norm())
                s = time_call(lambda: attend.local(lq, lk, lv), args.repeats)
                rows.append(dict(backend=backend, layout=layout, seq=seq, s=s, tflops=flops / s / 1e12, rel_error=err))
                print(f"{backend:8s} {layout:11s} seq {seq:6d}: {s * 1e3:7.2f} ms  {flops / s / 1e12:6.1f} TFLOP/s  "
                      f"rel err vs sdpa {err:.1e}", flush=True)
    rows += alignment_rows(args.seq, args.heads, args.head_dim, args.repeats)
    save_result(args.out, "attention", "attention", rows=rows)


if __name__ == "__main__":
    main()
