"""How far sequence parallelism could scale one forward, modelled from one GPU's measurements.

Ulysses splits the latent tokens over P ranks for everything but attention, and the 24
heads over P ranks for attention (framepack_backend/attention.py explains the split). On
one GPU this script measures what one rank of a P-GPU group would compute, and adds the
all-to-all traffic at an assumed interconnect bandwidth:

- attention: the backend on the whole joint sequence with 24/P heads, timed per P;
- everything else (GEMMs, norms, RoPE, gates): the forward with attention replaced by a
  no-op, scaled by the measured time of the blocks' GEMMs at the per-rank token count
  (latents/P plus the replicated text and image tokens) over their time at P = 1;
- communication: per block, three all-to-alls of the latent q, k, v and one of the
  output, each moving (P-1)/P of a rank's (latents/P × 3072) bf16 tensor, plus an
  all-gather of the context output's heads, at `--bandwidth-gbs` (default 350 GB/s: what
  NCCL's all-to-all reaches on 8 NVLink-4 H100s, below the 450 GB/s per direction of the link).

Communication is not overlapped with compute, so the model errs low. The result is a
model, not a run on several GPUs: each row says so (`measured_gpus` = 1).

    python benchmarks/sp_scaling_model.py [--degrees 1 2 4 8] [--bandwidth-gbs 350]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformer_forward import FULL_CONFIG, make_inputs

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack_backend.attention import Attend, choose_backend  # noqa: E402
from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402


class NoAttention(Attend):
    """The joint attention replaced by its query: the forward without attention's cost.

    Records the joint sequence length and the latent share of it on the first call."""

    shapes: dict = {}

    def joint(self, q, k, v, n_latent, key_mask=None):
        NoAttention.shapes.setdefault("joint", (q.shape[1], n_latent))
        return q


def gpu_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def block_gemms(m_latent: int, m_context: int, hidden: int, mlp: int, device, dtype):
    """The per-forward GEMM shapes of the 20 dual- and 40 single-stream blocks, as (m, k, n, count)."""
    dual = [(hidden, 3 * hidden), (hidden, hidden), (hidden, mlp), (mlp, hidden)]
    single = [(hidden, 3 * hidden + mlp), (hidden + mlp, hidden)]
    shapes = [(m, k, n, FULL_CONFIG["num_layers"]) for m in (m_latent, m_context) for k, n in dual]
    shapes += [(m_latent + m_context, k, n, FULL_CONFIG["num_single_layers"]) for k, n in single]
    return shapes


def gemm_seconds(shapes, device, dtype, repeats: int) -> float:
    total = 0.0
    for m, k, n, count in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        total += count * gpu_time(lambda: F.linear(x, w), repeats)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--bandwidth-gbs", type=float, default=350.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/sp_scaling_model.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, head_dim = FULL_CONFIG["num_attention_heads"], FULL_CONFIG["attention_head_dim"]
    hidden = heads * head_dim
    mlp = int(hidden * FULL_CONFIG["mlp_ratio"])
    blocks = FULL_CONFIG["num_layers"] + FULL_CONFIG["num_single_layers"]

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = FramePackTransformer(**FULL_CONFIG).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.mul_(0.05)
    model.set_fused_kernels(True)
    inputs = make_inputs(device, dtype)
    backend = choose_backend(device, dtype)
    attend = Attend(backend)
    with torch.inference_mode():
        whole_s = gpu_time(lambda: model(**inputs, attend=attend), args.repeats)
        rest_s = gpu_time(lambda: model(**inputs, attend=NoAttention(backend)), args.repeats)
        seq, n_latent = NoAttention.shapes["joint"]
        n_context = seq - n_latent
        gemm_1 = gemm_seconds(block_gemms(n_latent, n_context, hidden, mlp, device, dtype), device, dtype,
                              args.repeats)
        rows = []
        for p in args.degrees:
            if heads % p:
                print(f"skip P={p}: {heads} heads do not divide")
                continue
            q, k, v = (torch.randn(1, seq, heads // p, head_dim, device=device, dtype=dtype) for _ in range(3))
            attention_s = blocks * gpu_time(lambda: attend.local(q, k, v), args.repeats)
            local_latents = -(-n_latent // p)
            gemm_p = gemm_seconds(block_gemms(local_latents, n_context, hidden, mlp, device, dtype), device,
                                  dtype, args.repeats)
            other_s = rest_s * gemm_p / gemm_1
            moved = (p - 1) / p * 2 * hidden  # bytes per token leaving a rank, bf16
            comm_bytes = blocks * (4 * local_latents * moved + n_context * moved)
            comm_s = comm_bytes / (args.bandwidth_gbs * 1e9) if p > 1 else 0.0
            step_s = attention_s + other_s + comm_s
            rows.append(dict(degree=p, measured_gpus=1, modelled=True, attention_s=attention_s, other_s=other_s,
                             comm_s=comm_s, comm_bytes_per_rank=comm_bytes, step_s=step_s))
    base = rows[0]["step_s"]
    targets = {2: 1.9, 4: 3.6, 8: 6.0}
    print(f"\n{torch.cuda.get_device_name()}: one forward {whole_s:.4f} s measured, {rest_s:.4f} s of it without "
          f"attention; joint sequence {seq} = {n_latent} latent + {n_context} context tokens; {backend.name}")
    header = ("P", "attention s", "other s", "comm s", "step s", "speed-up", "target")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(header, (3, 12, 9, 8, 8, 9, 7))))
    for row in rows:
        row["speedup"] = base / row["step_s"]
        row["target"] = targets.get(row["degree"])
        print(f"{row['degree']:3d} {row['attention_s']:12.4f} {row['other_s']:9.4f} {row['comm_s']:8.4f} "
              f"{row['step_s']:8.4f} {row['speedup']:9.2f} {row['target'] or '':>7}")
    save_result(args.out, "sp_scaling_model", "sp_scaling_model", measured_forward_s=whole_s,
                forward_without_attention_s=rest_s, joint_tokens=seq, latent_tokens=n_latent,
                context_tokens=n_context, attention_backend=backend.name, bandwidth_gbs=args.bandwidth_gbs,
                rows=rows)


if __name__ == "__main__":
    main()
