"""`make demo`: the whole product on this machine, end to end, in one command.

Tiny random model (made on first use) → embedded Triton server on free local ports →
the `framepack` client on the sample image → an MP4 → the server stops again.
The tiny model's weights are random, so the video is coloured noise; what the demo
shows is the path: streaming, sections, progress, encoding.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from .server import ServerStartError, TritonServer, free_ports
from .tiny_model import ensure_tiny_bundle
from .triton_install import cache_dir

# Shipped with the server package, so the demo needs nothing from `client` but its command line.
SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="framepack-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/demo.mp4"), help="default %(default)s")
    parser.add_argument("--model-dir", type=Path, help="default: the tiny random model")
    parser.add_argument("--seconds", default="2", help="video length (default %(default)s)")
    parser.add_argument("--resolution", default="128", help="bucket resolution (default %(default)s, for a CPU)")
    parser.add_argument("--steps", default="4", help="steps per section (default %(default)s)")
    args = parser.parse_args(argv)

    if args.model_dir is None:
        print(f"demo: tiny random model in {cache_dir() / 'tiny'} (made on first use)", flush=True)
    model_dir = args.model_dir or ensure_tiny_bundle()
    grpc, http, metrics = free_ports(3)
    log = cache_dir() / "logs" / "demo-tritonserver.log"
    server = TritonServer(model_dir, grpc_port=grpc, http_port=http, metrics_port=metrics, log_path=log)
    print(f"demo: starting tritonserver (log: {server.log_path})", flush=True)
    try:
        with server:
            print(f"demo: server ready, gRPC at {server.grpc_address}", flush=True)
            command = [
                sys.executable, "-m", "client.cli", "generate",
                "--server", server.grpc_address, "--image", str(SAMPLE_IMAGE),
                "--prompt", "a person on a hill waves at the sun", "--output", str(args.output),
                "--seconds", args.seconds, "--resolution", args.resolution, "--steps", args.steps,
            ]
            print("demo: framepack " + shlex.join(command[3:]), flush=True)
            code = subprocess.call(command)
    except ServerStartError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if code != 0:
        print(f"demo: the client failed (exit code {code})", file=sys.stderr)
        return code
    print(f"demo: video written to {args.output.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
