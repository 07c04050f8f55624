"""A whole generation through the Triton server and the gRPC client: seconds per frame.

Starts `tritonserver` on a model directory (for full size: benchmarks/full_bundle.py),
then runs the client's streaming call for each step-cache run and measures what a user
waits for. `s_per_frame` is from sending the request to holding every frame, over the
frames: the same measure as benchmarks/pipeline_race.py's (a whole generation up to the
frames in host memory), plus the transport. `s_per_frame_with_mp4` adds the client's MP4
encode when PyAV is installed. Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/server_generation.py MODEL_DIR [--runs off,teacache,magcache] [--fp8] [--fused-qkv]
        [--cuda-graphs] [--seconds 5] [--steps 25] [--resolution 640]
    python benchmarks/server_generation.py --tiny --resolution 128 --steps 4   # the tiny model on the CPU

The runs are benchmarks/step_caches.py's: off, teacache (0.15), magcache (authors' defaults).
Without --tiny it needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from step_caches import STEP_CACHES

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import stream  # noqa: E402
from framepack_server.demo import SAMPLE_IMAGE  # noqa: E402
from framepack_server.instance import InstanceOverrides  # noqa: E402
from framepack_server.server import TritonServer, free_ports  # noqa: E402
from framepack_server.tiny_model import ensure_tiny_bundle  # noqa: E402
from framepack_wire import WireRequest  # noqa: E402


def run_job(address: str, image: np.ndarray, settings: dict) -> dict:
    from client.video import FrameAssembler, write_mp4

    # The MP4 step needs PyAV; without it the frames are still received and counted.
    assembler = FrameAssembler() if importlib.util.find_spec("av") else None
    start = time.perf_counter()
    first_section_s = final = None
    frames_received = 0
    for event in stream.generate(address, WireRequest(image, "a character dances in the rain", settings)):
        if isinstance(event, stream.Section):
            first_section_s = first_section_s or time.perf_counter() - start
            frames_received += len(event.frames)
            if assembler:
                assembler.add(event.start_frame, event.frames, event.total_frames)
        elif isinstance(event, stream.Final):
            final = event
    received_s = time.perf_counter() - start
    mp4_s = None
    if assembler:
        with tempfile.TemporaryDirectory() as folder:
            t = time.perf_counter()
            write_mp4(Path(folder) / "out.mp4", assembler.video(), final.fps)
            mp4_s = time.perf_counter() - t
    total = received_s + (mp4_s or 0.0)
    return dict(frames=final.frame_count, width=final.width, height=final.height, frames_received=frames_received,
                first_section_s=first_section_s, received_s=received_s, mp4_s=mp4_s, total_s=total,
                s_per_frame=received_s / final.frame_count, s_per_frame_with_mp4=total / final.frame_count,
                computed_forwards=final.timings.get("computed_steps"),
                skipped_forwards=final.timings.get("skipped_steps"), server_timings=final.timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?", help="the model directory (not with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU (checks the script)")
    parser.add_argument("--runs", default="off,teacache", help=f"in order, from: {', '.join(STEP_CACHES)}")
    parser.add_argument("--fp8", action="store_true", help="serve with FP8 linear layers")
    parser.add_argument("--fused-qkv", action="store_true", help="serve with q/k/v as one GEMM (--fused-qkv)")
    parser.add_argument("--cuda-graphs", action="store_true", help="serve with the blocks replayed from CUDA graphs")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--startup-timeout", type=float, default=1200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    runs_wanted = args.runs.split(",")
    if not set(runs_wanted) <= set(STEP_CACHES):
        sys.exit(f"--runs {args.runs!r}: expected names from {', '.join(STEP_CACHES)}")
    if args.tiny == (args.model_dir is not None):
        sys.exit("give a MODEL_DIR or --tiny, one of them")
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/server_generation.py needs a CUDA GPU for a full-size model (or --tiny for the CPU)")
    from PIL import Image  # not client.cli's loader: that module needs PyAV, which this may run without

    model_dir = ensure_tiny_bundle() if args.tiny else args.model_dir
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    grpc_port, http_port, metrics_port = free_ports(3)
    log_path = Path(args.out) / f"server_generation_{time.strftime('%Y%m%d-%H%M%S')}.tritonserver.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    overrides = InstanceOverrides(max_job_seconds=0, fp8=args.fp8, fused_qkv=args.fused_qkv,
                                  cuda_graphs=args.cuda_graphs)
    runs = []
    t0 = time.perf_counter()
    with TritonServer(model_dir, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                      device="cpu" if args.tiny else "auto", log_path=log_path,
                      startup_timeout_s=args.startup_timeout, overrides=overrides) as server:
        ready_s = time.perf_counter() - t0
        print(f"server ready in {ready_s:.1f} s", flush=True)
        for name in runs_wanted:
            settings = {"seconds": args.seconds, "steps": args.steps, "resolution": args.resolution,
                        **STEP_CACHES[name]}
            run = dict(cache=name, **run_job(server.grpc_address, image, settings))
            runs.append(run)
            print(json.dumps(run, default=str), flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    options = ", ".join(name for name, on in (("FP8", args.fp8), ("fused q/k/v", args.fused_qkv),
                                              ("CUDA graphs", args.cuda_graphs)) if on) or "bf16"
    print(f"\n{gpu}: {args.seconds} s video, {args.steps} steps, {options}, through the server")
    for run in runs:
        mp4 = "MP4 not encoded (no PyAV)" if run["mp4_s"] is None else (
            f"{run['s_per_frame_with_mp4']:.3f} with the MP4 ({run['mp4_s']:.1f} s)")
        print(f"cache {run['cache']:9s}: {run['frames']} frames {run['width']}x{run['height']} "
              f"held after {run['received_s']:.1f} s = {run['s_per_frame']:.3f} s/frame, {mp4}; "
              f"forwards {run['computed_forwards']} computed {run['skipped_forwards']} skipped; "
              f"first section after {run['first_section_s']:.1f} s")
    save_result(args.out, "server_generation", "server_generation", tiny=args.tiny, fp8=args.fp8,
                fused_qkv=args.fused_qkv, cuda_graphs=args.cuda_graphs, seconds=args.seconds, steps=args.steps,
                resolution=args.resolution, server_ready_s=ready_s, server_log=log_path.name, runs=runs)


if __name__ == "__main__":
    main()
