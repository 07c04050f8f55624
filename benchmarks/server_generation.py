"""A whole generation through the Triton server and the gRPC client: seconds per frame.

Starts `tritonserver` on a model directory (for full size: benchmarks/full_bundle.py),
then runs the client's streaming call for each TeaCache setting and measures what a user
waits for: from sending the request to holding every frame, plus the MP4 encode when
PyAV is installed. Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/server_generation.py MODEL_DIR [--fp8] [--teacache off,on] [--seconds 5] [--steps 25]
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

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import stream  # noqa: E402
from framepack_server.demo import SAMPLE_IMAGE  # noqa: E402
from framepack_server.instance import InstanceOverrides  # noqa: E402
from framepack_server.server import TritonServer, free_ports  # noqa: E402
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
                s_per_frame=total / final.frame_count, server_timings=final.timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--fp8", action="store_true", help="serve with FP8 linear layers")
    parser.add_argument("--teacache", default="off,on", help="runs, in order: off and/or on (threshold 0.15)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--startup-timeout", type=float, default=1200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    teacache_runs = args.teacache.split(",")
    if not set(teacache_runs) <= {"off", "on"}:
        sys.exit(f"--teacache {args.teacache!r}: expected off and/or on")
    from PIL import Image  # not client.cli's loader: that module needs PyAV, which this may run without

    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    grpc_port, http_port, metrics_port = free_ports(3)
    log_path = Path(args.out) / f"server_generation_{time.strftime('%Y%m%d-%H%M%S')}.tritonserver.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    t0 = time.perf_counter()
    with TritonServer(args.model_dir, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                      log_path=log_path, startup_timeout_s=args.startup_timeout,
                      overrides=InstanceOverrides(max_job_seconds=0, fp8=args.fp8)) as server:
        ready_s = time.perf_counter() - t0
        print(f"server ready in {ready_s:.1f} s", flush=True)
        for teacache in teacache_runs:
            settings = {"seconds": args.seconds, "steps": args.steps, "teacache": teacache == "on",
                        "teacache_threshold": 0.15}
            run = dict(teacache=teacache == "on", **run_job(server.grpc_address, image, settings))
            runs.append(run)
            print(json.dumps(run, default=str), flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{gpu}: {args.seconds} s video, {args.steps} steps, {'FP8' if args.fp8 else 'bf16'}, through the server")
    for run in runs:
        mp4 = "not encoded (no PyAV)" if run["mp4_s"] is None else f"MP4 {run['mp4_s']:.1f} s"
        teacache = "0.15" if run["teacache"] else "off "
        print(f"TeaCache {teacache}: {run['frames']} frames {run['width']}x{run['height']} "
              f"in {run['total_s']:.1f} s ({mp4}) = {run['s_per_frame']:.3f} s/frame; first section after "
              f"{run['first_section_s']:.1f} s")
    save_result(args.out, "server_generation", "server_generation", fp8=args.fp8, server_ready_s=ready_s,
                server_log=log_path.name, runs=runs)

if __name__ == "__main__":
    main()
