"""Several GPUs: one forward's cost at sequence-parallel degree 1 against today's path,
seconds per step with 1..G ranks, and videos per hour with 1..G GPU groups behind the
server's one queue. Runs with one GPU.

    python benchmarks/multi_gpu.py overhead [--config full|small] [--repeats 20]
    python benchmarks/multi_gpu.py scaling  [--config full|small] [--repeats 5] [--degrees 1 2 4 8]
    python benchmarks/multi_gpu.py scaling --cpu --degrees 1 2   # tries the script: small model, gloo
    python benchmarks/multi_gpu.py throughput --model-dir DIR [--group-counts 1 2 4 8] [--clients C] [--jobs J]
                                              [--seconds 5] [--steps 25]
    python benchmarks/multi_gpu.py throughput --cpu   # tries it: the tiny model, 1 and 2 CPU groups

`overhead`: one process, one GPU, the same random weights and inputs at the 640 bucket:
the plain forward and the sequence-parallel forward at degree 1 (an NCCL group of one
rank: the split plan, the shards and the block runner run; the exchanges of a group of one
are the identity and are skipped), alternated so clocks and caches treat both alike. The
target is at most 1 % overhead. The exchanges' own cost shows in `scaling` at degree >= 2.

`scaling`: for each degree P dividing the 24 heads and at most the GPU count, P processes
(one GPU each, NCCL) run the same forward together; a sampling step with cfg = 1 (the
default) is one forward, so the median forward time is the seconds per step.

`throughput`: for each group count N in 1..G (G = the visible GPUs), the real server with
N groups (`framepack-server --groups N`) behind its one job queue, a fixed number of
concurrent clients (default 2N) and jobs (default 4N) after one warm-up job per group:
videos per hour, median latency, speed-up against one group and efficiency (speed-up per
group; the target is at least 0.95), and the queue metrics read once mid-run to show every
group was busy (benchmarks/queue_throughput.py). The model directory is the real one or
benchmarks/full_bundle.py's random weights; without --seconds/--steps a job uses the
server's defaults (the demo's).

Every row carries the GPU count; JSON goes under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
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
# Trying `throughput` on the CPU: two CPU groups, one-section jobs of the tiny model.
CPU_GROUP_COUNTS = (1, 2)
CPU_JOB = {"resolution": 128, "steps": 4, "seconds": 1.2}


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
    """Videos per hour with 1..G groups behind the server's one queue, each group count in turn."""
    # The client side (tritonclient) is needed by this mode only; `overhead` and `scaling` run without it.
    import tempfile

    from PIL import Image
    from queue_throughput import default_clients, default_jobs, measure_groups, throughput_rows

    from framepack_backend.testing.tiny_bundle import write_tiny_bundle
    from framepack_server.demo import SAMPLE_IMAGE

    gpus = gpu_count(args)
    counts = args.group_counts or (CPU_GROUP_COUNTS if args.cpu else range(1, gpus + 1))
    if not args.cpu and max(counts) > gpus:
        sys.exit(f"--group-counts {max(counts)}: only {gpus} GPU(s) are visible")
    settings = job_settings(args)
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    log_dir = Path(args.out)
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "tiny" if args.cpu else args.model_dir
        if args.cpu:
            write_tiny_bundle(model_dir)
        runs = []
        for groups in counts:
            clients = args.clients or default_clients(groups)
            jobs = args.jobs or default_jobs(groups)
            run = measure_groups(model_dir, groups, clients, jobs, settings, image, "cpu" if args.cpu else "auto",
                                 log_dir, args.startup_timeout)
            runs.append(run)
            row = throughput_rows(runs, gpus)[-1]
            print(f"{groups} group(s), {clients} clients, {jobs} jobs: {row['videos_per_hour']:.1f} videos/h, "
                  f"median latency {row['latency_median_s']:.1f} s, speed-up {row['speedup'] or float('nan'):.2f}x, "
                  f"efficiency {row['efficiency'] or float('nan'):.2f}; mid-run {row['mid_run_waiting_jobs']} waiting, "
                  f"{row['mid_run_busy_groups']} of {groups} busy", flush=True)
    return throughput_rows(runs, gpus)


def job_settings(args) -> dict:
    """throughput: what every job asks for; the rest is the server's defaults."""
    given = {key: value for key, value in (("seconds", args.seconds), ("steps", args.steps)) if value is not None}
    return {**(CPU_JOB if args.cpu else {}), **given}


def gpu_count(args) -> int:
    return 0 if args.cpu else torch.cuda.device_count()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("overhead", "scaling", "throughput"))
    parser.add_argument("--config", choices=("full", "small"), default="full")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="overhead: plain/split alternations")
    parser.add_argument("--degrees", type=int, nargs="*", help="scaling: the degrees to run (default: 1..G)")
    parser.add_argument("--group-counts", type=int, nargs="*",
                        help="throughput: the group counts to run (default: 1..G; with --cpu: 1 2)")
    parser.add_argument("--clients", type=int, help="throughput: concurrent clients (default: 2x the groups)")
    parser.add_argument("--jobs", type=int, help="throughput: timed jobs per group count (default: 4x the groups)")
    parser.add_argument("--model-dir", type=Path, help="throughput: the model directory (benchmarks/full_bundle.py)")
    parser.add_argument("--seconds", type=float, help="throughput: video length per job (default: the server's)")
    parser.add_argument("--steps", type=int, help="throughput: sampling steps per section (default: the server's)")
    parser.add_argument("--startup-timeout", type=float, default=1800, help="throughput: seconds to load the groups")
    parser.add_argument("--cpu", action="store_true",
                        help="try the script on the CPU (small model, gloo; throughput: the tiny model)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("benchmarks/multi_gpu.py needs a CUDA GPU (or --cpu to try it)")
    if args.mode == "throughput" and not args.cpu and args.model_dir is None:
        sys.exit("benchmarks/multi_gpu.py throughput needs --model-dir (benchmarks/full_bundle.py makes one)")
    args.config_dict = CPU_CONFIG if args.cpu else FULL_CONFIG if args.config == "full" else SMALL_CONFIG
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if args.mode == "throughput":
        from queue_throughput import EFFICIENCY_TARGET

        rows = videos_per_hour(args)
        save_result(args.out, "multi_gpu_throughput", "multi_gpu throughput", rows=rows,
                    model_dir="tiny (tried, not measured)" if args.cpu else str(args.model_dir),
                    settings=job_settings(args),
                    efficiency_target=EFFICIENCY_TARGET)
        return
    rows = overhead(args) if args.mode == "overhead" else scaling(args)
    save_result(args.out, f"multi_gpu_{args.mode}", f"multi_gpu {args.mode}", rows=rows,
                config="cpu (tried, not measured)" if args.cpu else args.config)


if __name__ == "__main__":
    main()
