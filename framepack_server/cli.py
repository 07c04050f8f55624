"""`framepack-server`: run Triton Inference Server with the FramePack model repository.

    framepack-server                          # embedded Triton, tiny random model, CPU or GPU
    framepack-server --model-dir /models      # real weights (docs/architecture.md layout)
    framepack-server --tritonserver /opt/tritonserver/bin/tritonserver
    framepack-server --grpc-server-cert server.crt --grpc-server-key server.key   # TLS
    framepack-server --host 0.0.0.0 --api-key-file key.txt   # clients need the key (access.py)

The server process itself is `server.TritonServer`; this module is its command line.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from framepack_backend.variants import VARIANT_NAMES

from .access import ApiKeyError, read_api_key
from .instance import InstanceOverrides
from .server import DEFAULT_HOST, DEFAULT_PORTS, DEFAULT_STARTUP_TIMEOUT_S, GrpcTls, ServerStartError, TritonServer
from .triton_install import TritonNotFound


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framepack-server", description="Serve FramePack with Triton.")
    parser.add_argument("--model-dir", type=Path, help="weights (default: a tiny random model, made on first use)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"], help="default %(default)s")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"], help="default %(default)s")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"], help="default %(default)s")
    parser.add_argument("--device", default="auto", help="auto (every GPU, else the CPU), cpu, or cuda:N")
    parser.add_argument("--tritonserver", type=Path, help="another tritonserver binary (default: the embedded one)")
    parser.add_argument("--backend-directory", type=Path, help="its backends folder (default: beside its bin/)")
    parser.add_argument("--model-repository", type=Path, help="default: this project's model_repository/")
    parser.add_argument("--log-file", type=Path, help="server log (default: under the cache folder)")
    parser.add_argument("--quiet", action="store_true", help="write the server log to the file only")
    parser.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S, help="seconds")
    parser.add_argument("--max-queued-jobs", type=int, help="jobs that may wait per model instance (default: config)")
    parser.add_argument("--max-job-seconds", type=float, help="time limit of one job, 0 for none (default: config)")
    parser.add_argument("--no-restart", action="store_true", help="do not restart the server when its model dies")
    parser.add_argument("--sampling", choices=VARIANT_NAMES,
                        help="transformer to serve: inverted (transformer/) or f1 (transformer_f1/); default: config")
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 e4m3 linear layers in the transformer blocks (Hopper GPUs; default: config, bf16)")
    parser.add_argument("--fused-qkv", action="store_true",
                        help="each attention's q/k/v projections as one GEMM (same math; not with --lora-dir)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the transformer blocks from CUDA graphs captured per job (GPU; jobs that run "
                             "with resident weights)")
    parser.add_argument("--fast-vae-decode", action=argparse.BooleanOptionalAction,
                        help="the VAE decoder in channels_last_3d with GroupNorm+SiLU fused into its padding "
                             "(same output within fp16 rounding; default: config, on for a GPU with Triton)")
    parser.add_argument("--lora-dir", type=Path, metavar="DIR",
                        help="folder of LoRA .safetensors files requests may name (framepack generate --lora NAME)")
    parser.add_argument("--groups", type=int,
                        help="GPU groups that take jobs from the one queue (default: config, one per visible GPU; "
                             "on the CPU N copies of the model)")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="require this file's key (header x-api-key) on every request but health checks")
    parser.add_argument("--sequence-parallel", type=int, metavar="N",
                        help="split each job's transformer over N processes, one device each, by attention heads "
                             "(Ulysses; N must divide the heads: 24 for FramePack); default: config, 1")
    tls_options = parser.add_argument_group("TLS for gRPC", "clients then connect with `framepack generate --ssl ...`")
    tls_options.add_argument("--grpc-server-cert", type=Path, metavar="PEM", help="server certificate (turns TLS on)")
    tls_options.add_argument("--grpc-server-key", type=Path, metavar="PEM", help="its private key")
    tls_options.add_argument("--grpc-client-ca", type=Path, metavar="PEM",
                             help="require client certificates signed by this CA")
    # Lets requests ask for failures (framepack_server/faults.py): for reliability tests only.
    parser.add_argument("--fault-injection", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.grpc_server_cert is None) != (args.grpc_server_key is None):
        parser.error("--grpc-server-cert and --grpc-server-key go together")
    if args.sequence_parallel is not None and args.sequence_parallel < 1:
        parser.error(f"--sequence-parallel {args.sequence_parallel}: expected a process count >= 1")
    if args.grpc_client_ca is not None and args.grpc_server_cert is None:
        parser.error("--grpc-client-ca needs --grpc-server-cert and --grpc-server-key")
    if args.groups is not None and args.groups < 1:
        parser.error(f"--groups {args.groups}: expected an integer >= 1")
    try:
        api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    except ApiKeyError as e:
        parser.error(str(e))

    stop_requested = threading.Event()
    server: TritonServer | None = None

    def request_stop(*_) -> None:
        stop_requested.set()
        if server is not None:
            server.request_stop()  # also while it is still starting

    # SIGHUP: the terminal was closed. The server must not outlive its launcher.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    try:
        if args.lora_dir is not None and not args.lora_dir.is_dir():
            raise ValueError(f"--lora-dir {args.lora_dir} is not a directory")
        tls = None
        if args.grpc_server_cert:
            tls = GrpcTls(args.grpc_server_cert, args.grpc_server_key, args.grpc_client_ca)
        server = TritonServer(
            args.model_dir, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
            metrics_port=args.metrics_port, device=args.device, tritonserver=args.tritonserver,
            backend_directory=args.backend_directory, model_repository=args.model_repository,
            log_path=args.log_file, echo_log=not args.quiet, startup_timeout_s=args.startup_timeout,
            grpc_tls=tls, restart_on_failure=not args.no_restart, api_key=api_key,
            overrides=InstanceOverrides(
                max_queued_jobs=args.max_queued_jobs, max_job_seconds=args.max_job_seconds, sampling=args.sampling,
                lora_dir=str(args.lora_dir.resolve()) if args.lora_dir else None,
                fp8=True if args.fp8 else None, groups=args.groups, sequence_parallel=args.sequence_parallel,
                fused_qkv=True if args.fused_qkv else None, cuda_graphs=True if args.cuda_graphs else None,
                fast_vae_decode=args.fast_vae_decode,
                fault_injection=args.fault_injection,
            ),
        )
    except ValueError as e:
        parser.error(str(e))
    if server.model_dir is None:
        print("framepack-server: no --model-dir, using the tiny random model (made on first use)", file=sys.stderr)
    try:
        server.start()
        server.wait_ready()
    except (ServerStartError, TritonNotFound) as e:
        server.stop()
        if stop_requested.is_set():
            _say("framepack-server: stopped while starting")
            return 0
        _say(f"framepack-server: error: {e}")
        return 1
    server.supervise()
    scheme = (" (TLS)" if tls else "") + (", API key required" if api_key else "")
    _say(
        f"framepack-server: ready, gRPC{scheme} at {server.grpc_address} (log: {server.log_path}); Ctrl-C stops it",
        sys.stdout,
    )
    code = server.wait(stop_requested)
    if stop_requested.is_set():
        _say("framepack-server: stopped")
        return 0
    if server.supervisor is not None and server.supervisor.gave_up is not None:
        _say(f"framepack-server: error: restart failed: {server.supervisor.gave_up}")
        return 1
    _say(f"framepack-server: tritonserver exited with code {code}")
    return 1 if not code else code


def _say(line: str, stream: TextIO | None = None) -> None:
    """Print a line; after SIGHUP the terminal may be gone, which must not stop the shutdown."""
    try:
        print(line, file=stream or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
