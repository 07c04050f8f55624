"""Sequence parallelism on the GPUs present: one forward's cost at degree 1 against today's
path, and seconds per step with 1..G ranks. Runs with one GPU.

    python benchmarks/multi_gpu.py overhead [--config full|small] [--repeats 20]
    python benchmarks/multi_gpu.py scaling  [--config full|small] [--repeats 5] [--degrees 1 2 4 8]
    python benchmarks/multi_gpu.py scaling --cpu --degrees 1 2   # tries the script: small model, gloo

`overhead`: one process, one GPU, the same random weights and inputs at the 640 bucket:
the plain forward and the sequence-parallel forward at degree 1 (an NCCL group of one
rank: the split plan, the shards and the block runner run; the exchanges of a group of one
are the identity and are skipped), alternated so clocks and caches treat both alike. The
target is at most 1 % overhead. The exchanges' own cost shows in `scaling` at degree >= 2.

`scaling`: for each degree P dividing the 24 heads and at most the GPU count, P processes
(one GPU each, NCCL) run the same forward together; a sampling step with cfg = 1 (the
default) is one forward, so the median forward time is the seconds per step.

Videos per hour with 1..G GPU groups behind one shared queue need the shared queue
(framepack_server/jobs.py, the GPU-group work); `videos_per_hour` below is the marked
place for it and records null until it exists.

Every row carries the GPU count; JSON goes under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformer_forward import FULL_CONFIG, SMALL_CONFIG, make_inputs

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framepack_backend.models.transformer import FramePackTransformer  # noqa: E402
from framepack_backend.pipeline import configure_transformer  # noqa: E402
from framepack_backend.sequence_parallel import apply_sequence_parallel, check_heads_divide  # noqa: E402
from framepack_backend.settings import EngineOptions  # noqa: E402

# Trying the script on the CPU: the small model's blocks and 24 heads, each 16 wide.
CPU_CONFIG = dict(SMALL_CONFIG, attention_head_dim=16, rope_axes_dim=(4, 6, 6))
WEIGHT_SCALE = 0.05  # keeps the random model's activations in range over 60 blocks


def build_transformer(config: dict, device: torch.device) -> FramePackTransformer:
    """Random weights from seed 0, made on `device`, so every rank holds the same model."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = FramePackTransformer(**config).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(WEIGHT_SCALE)
    configure_transformer(model, device, EngineOptions())  # the instance defaults: fused kernels, fp32 output
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_times(model, inputs, repeats: int, warmup: int = 2) -> list[float]:
    device = inputs["hidden_states"].device
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        model(**inputs)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def init_group(rank: int, world: int, port: int, cpu: bool) -> torch.device:
    init = f"tcp://127.0.0.1:{port}"
    if cpu:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        return torch.device("cpu")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, device_id=device)
    return device


def inputs_for(device: torch.device):
    # The 640 bucket on a GPU; a 128 bucket on the CPU, where the script is only tried.
    return make_inputs(device, torch.bfloat16, latent_hw=(80, 80) if device.type == "cuda" else (16, 16))


def overhead(args) -> list[dict]:
    """Plain forward vs the sequence-parallel path at degree 1, alternated, same process."""
    port = _free_port()
    device = init_group(0, 1, port, args.cpu)
    model = build_transformer(args.config_dict, device)
    inputs = inputs_for(device)
    runner = apply_sequence_parallel(model, None, 1)
    plain_s, split_s = [], []
    with torch.inference_mode():
        model.block_runner = None
        plain_out = model(**inputs)
        model.block_runner = runner
        split_out = model(**inputs)
    for _ in range(args.rounds):
        model.block_runner = None
        plain_s += forward_times(model, inputs, args.repeats, warmup=1)
        model.block_runner = runner
        split_s += forward_times(model, inputs, args.repeats, warmup=1)
    dist.destroy_process_group()
    plain, split = statistics.median(plain_s), statistics.median(split_s)
    error = float((split_out.float() - plain_out.float()).norm() / plain_out.float().norm())
    row = dict(gpus=gpu_count(args), sequence_parallel=1, plain_forward_s=plain, split_forward_s=split,
               overhead_percent=100 * (split / plain - 1), relative_error=error,
               plain_min_s=min(plain_s), split_min_s=min(split_s), samples=len(plain_s))
    print(f"plain {plain * 1e3:.1f} ms, sequence-parallel degree 1 {split * 1e3:.1f} ms: "
          f"{row['overhead_percent']:+.2f} % (relative error {error:.1e})")
    return [row]


def _scaling_rank(rank: int, world: int, port: int, args, results) -> None:
    device = init_group(rank, world, port, args.cpu)
    model = build_transformer(args.config_dict, device)
    apply_sequence_parallel(model, None, world)
    times = forward_times(model, inputs_for(device), args.repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    dist.destroy_process_group()
    if rank == 0:
        results.put(dict(seconds_per_step=statistics.median(times), min_s=min(times), peak_allocated_bytes=peak))


def scaling(args) -> list[dict]:
    gpus = gpu_count(args)
    most = gpus if not args.cpu else max(args.degrees or [1])
    degrees = [p for p in (args.degrees or range(1, gpus + 1)) if p <= most and 24 % p == 0]
    context = mp.get_context("spawn")
    rows = []
    for degree in degrees:
        check_heads_divide(args.config_dict["num_attention_heads"], degree)
        results = context.Queue()
        port = _free_port()
        processes = [context.Process(target=_scaling_rank, args=(rank, degree, port, args, results))
                     for rank in range(degree)]
        for process in processes:
            process.start()
        result = results.get()
        for process in processes:
            process.join()
        row = dict(gpus=gpus, sequence_parallel=degree, **result)
        rows.append(row)
        base = rows[0]["seconds_per_step"]
        print(f"{degree} rank(s): {row['seconds_per_step']:.3f} s/step, speed-up {base / row['seconds_per_step']:.2f}x")
    return rows


def videos_per_hour(args) -> list[dict]:
    """Videos per hour with 1..G groups behind the shared queue: to be measured once the queue exists."""
    return [dict(gpus=gpu_count(args), groups=None, videos_per_hour=None,
                 note="needs the shared job queue over GPU groups (framepack_server/jobs.py); not measured")]


def gpu_count(args) -> int:
    return 0 if args.cpu else torch.cuda.device_count()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("overhead", "scaling"))
    parser.add_argument("--config", choices=("full", "small"), default="full")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="overhead: plain/split alternations")
    parser.add_argument("--degrees", type=int, nargs="*", help="scaling: the degrees to run (default: 1..G)")
    parser.add_argument("--cpu", action="store_true", help="try the script on the CPU (small model, gloo)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("benchmarks/multi_gpu.py needs a CUDA GPU (or --cpu to try it)")
    args.config_dict = CPU_CONFIG if args.cpu else FULL_CONFIG if args.config == "full" else SMALL_CONFIG
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    rows = overhead(args) if args.mode == "overhead" else scaling(args)
    save_result(args.out, f"multi_gpu_{args.mode}", f"multi_gpu {args.mode}", rows=rows,
                config="cpu (tried, not measured)" if args.cpu else args.config,
                videos_per_hour=videos_per_hour(args))


if __name__ == "__main__":
    main()
