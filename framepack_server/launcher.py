"""`framepack-server`: run Triton Inference Server with the FramePack model repository.

    framepack-server                          # embedded Triton, tiny random model, CPU or GPU
    framepack-server --model-dir /models      # real weights (docs/architecture.md layout)
    framepack-server --tritonserver /opt/tritonserver/bin/tritonserver
    framepack-server --grpc-server-cert server.crt --grpc-server-key server.key   # TLS

If the model's backend stub or the server itself dies, the server is restarted
(supervisor.py says why a restart and not less).

As a library (tests, the demo):

    grpc, http, metrics = free_ports(3)
    with TritonServer(path, grpc_port=grpc, http_port=http, metrics_port=metrics) as server:
        ...  # server.grpc_address
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from framepack_backend.variants import VARIANT_NAMES

from .instance import FAULT_INJECTION_ENV
from .supervisor import Supervisor, backend_stub_pids
from .triton_install import (
    TritonInstall,
    TritonNotFound,
    cache_dir,
    default_model_repository,
    embedded_install,
    external_install,
    python_library_dir,
    stub_python_path,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002}
# Loading real weights takes minutes; the tiny model a few seconds.
DEFAULT_STARTUP_TIMEOUT_S = 600.0
# How long Triton waits for running jobs on shutdown; jobs stop at their next step.
EXIT_TIMEOUT_S = 10
# On a restart after a stub died, the dead stub's model never finishes unloading, so
# Triton would always wait out EXIT_TIMEOUT_S; healthy jobs stop within a step anyway.
RESTART_GRACE_S = 2.0


class ServerStartError(RuntimeError):
    pass


def free_ports(count: int) -> list[int]:
    """Distinct ports free on localhost right now (held open together so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((DEFAULT_HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class GrpcTls:
    """TLS for the gRPC endpoint: PEM files; `client_ca` set means clients need certificates too."""

    server_cert: Path
    server_key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for flag, path in (("--grpc-server-cert", self.server_cert), ("--grpc-server-key", self.server_key),
                           ("--grpc-client-ca", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")

    def arguments(self) -> list[str]:
        mutual = ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.client_ca}"] if self.client_ca else []
        return ["--grpc-use-ssl=true", f"--grpc-server-cert={self.server_cert}",
                f"--grpc-server-key={self.server_key}", *mutual]


def ensure_tiny_bundle(folder: Path | None = None) -> Path:
    """The tiny random model under the cache, written on first use (atomically)."""
    folder = folder or cache_dir() / "tiny"
    if folder.is_dir():
        return folder
    from framepack_backend.testing.tiny_bundle import write_tiny_bundle

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        write_tiny_bundle(partial)
        os.rename(partial, folder)
    except OSError:
        if not folder.is_dir():  # not merely another launcher finishing first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


class TritonServer:
    """One `tritonserver` process serving the framepack model; a context manager."""

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        host: str = DEFAULT_HOST,
        grpc_port: int = DEFAULT_PORTS["grpc"],
        http_port: int = DEFAULT_PORTS["http"],
        metrics_port: int = DEFAULT_PORTS["metrics"],
        device: str = "auto",
        tritonserver: Path | str | None = None,
        backend_directory: Path | str | None = None,
        model_repository: Path | str | None = None,
        log_path: Path | str | None = None,
        echo_log: bool = False,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        environment: dict[str, str] | None = None,
        grpc_tls: GrpcTls | None = None,
        max_queued_jobs: int | None = None,
        max_job_seconds: float | None = None,
        restart_on_failure: bool = True,
        fault_injection: bool = False,
        sampling: str | None = None,
        fp8: bool | None = None,
    ):
        """`max_queued_jobs`, `max_job_seconds`, `sampling` and `fp8` override the model config's values;
        `fault_injection` lets requests ask for failures (faults.py; tests only)."""
        if device != "auto" and device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"device={device!r} is not allowed: expected 'auto', 'cpu' or 'cuda:N'")
        self.model_dir = Path(model_dir).expanduser().resolve() if model_dir else None
        self.host = host
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.device = device
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.backend_directory = Path(backend_directory) if backend_directory else None
        self.model_repository = Path(model_repository or default_model_repository()).resolve()
        self.log_path = Path(log_path) if log_path else cache_dir() / "logs" / f"tritonserver-{grpc_port}.log"
        self.echo_log = echo_log
        self.startup_timeout_s = startup_timeout_s
        self.environment = dict(environment or {})
        if max_queued_jobs is not None:
            self.environment["FRAMEPACK_MAX_QUEUED_JOBS"] = str(max_queued_jobs)
        if max_job_seconds is not None:
            self.environment["FRAMEPACK_MAX_JOB_SECONDS"] = str(max_job_seconds)
        if sampling is not None:
            self.environment["FRAMEPACK_SAMPLING"] = sampling
        if fp8 is not None:
            self.environment["FRAMEPACK_FP8"] = "true" if fp8 else "false"
        if fault_injection:
            self.environment[FAULT_INJECTION_ENV] = "1"
        self.grpc_tls = grpc_tls
        self.restart_on_failure = restart_on_failure
        self.supervisor: Supervisor | None = None
        self._process: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None
        self._run_dir: Path | None = None
        self._stop_requested = threading.Event()
        # Held while starting or stopping, so a restart and a stop never interleave.
        self._lifecycle = threading.RLock()

    @property
    def pid(self) -> int | None:
        """The tritonserver process, also the id of its process group (its backend stubs)."""
        return self._process.pid if self._process else None

    @property
    def grpc_address(self) -> str:
        return f"{_reachable(self.host)}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{_reachable(self.host)}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_reachable(self.host)}:{self.ports['metrics']}/metrics"

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def backend_stub_pids(self) -> set[int]:
        """The model's Python-backend stub processes (one per model instance)."""
        return backend_stub_pids(self._process.pid) if self._process else set()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.supervise()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def supervise(self) -> None:
        """Restart the server from now on when a backend stub or the server dies (if enabled)."""
        if self.restart_on_failure and self.supervisor is None:
            self.supervisor = Supervisor(self, self._note)
            self.supervisor.start()

    def restart(self, reason: str) -> None:
        with self._lifecycle:
            if self._stop_requested.is_set():
                return
            self._terminate(RESTART_GRACE_S)
            self.start(restart_reason=reason)
            self.wait_ready()

    def _note(self, message: str) -> None:
        """A line from the launcher itself in the server log (and on stderr when echoing)."""
        line = f"framepack-server: {message}\n"
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line)
        if self.echo_log:
            sys.stderr.write(line)

    def start(self, restart_reason: str | None = None) -> None:
        if self._process is not None:
            raise RuntimeError("server already started")
        if not (self.model_repository / "framepack" / "config.pbtxt").is_file():
            raise ServerStartError(
                f"no framepack model under {self.model_repository}: pass --model-repository "
                "or set FRAMEPACK_MODEL_REPOSITORY"
            )
        model_dir = self.model_dir or ensure_tiny_bundle()
        if not model_dir.is_dir():
            raise ServerStartError(f"--model-dir {model_dir}: no such directory")
        for name, port in self.ports.items():
            _check_port_free(self.host, port, name)
        install = self._install()
        command = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backend_directory}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports['grpc']}",
            f"--http-address={self.host}", f"--http-port={self.ports['http']}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports['metrics']}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            *(self.grpc_tls.arguments() if self.grpc_tls else []),
        ]
        self._run_dir = Path(tempfile.mkdtemp(prefix="framepack-server-"))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if restart_reason is None:
            self.log_path.write_text("", encoding="utf-8")
        # Appending (O_APPEND), so the launcher's own notes and a restart's output land
        # after what is there instead of overwriting it.
        log = open(self.log_path, "a", encoding="utf-8")
        if restart_reason is not None:
            log.write(f"# restarted: {restart_reason}\n")
        log.write(f"# {' '.join(command)}\n# model dir: {model_dir}\n")
        log.flush()
        self._process = subprocess.Popen(
            command,
            env=self._environment(install, model_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C reaches the server only through stop()
        )
        self._pump = threading.Thread(target=_pump_log, args=(self._process.stdout, log, self.echo_log), daemon=True)
        self._pump.start()

    def wait_ready(self) -> None:
        """Wait for /v2/health/ready; if the server dies or times out, raise with its log's tail."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._stop_requested.is_set():
                raise ServerStartError("stopped while starting")
            if self._process.poll() is not None:
                self._pump.join(5)
                raise ServerStartError(
                    f"tritonserver exited with code {self._process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_text())}"
                )
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServerStartError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s; "
            f"last lines of {self.log_path}:\n{_tail(self.log_text())}"
        )

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 20) -> int | None:
        """Stop running jobs, ask the server to exit (SIGTERM), kill its process group if it does not."""
        self._stop_requested.set()
        if self.supervisor is not None:
            self.supervisor.stop()
        with self._lifecycle:
            return self._terminate(timeout_s)

    def _terminate(self, timeout_s: float) -> int | None:
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            # Triton tells the model nothing on shutdown; jobs poll this file and stop.
            self._shutdown_file().touch()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # When Triton gives up waiting for the model ("Exit timeout expired"), it exits and
        # leaves the backend stub behind; the stubs share the server's process group.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._pump is not None:
            self._pump.join(5)
        shutil.rmtree(self._run_dir, ignore_errors=True)
        self._process = None
        return process.returncode

    def wait(self, stop_requested: threading.Event) -> int | None:
        """Block until `stop_requested` is set or the server is down for good; then stop it."""
        while not stop_requested.wait(0.5):
            if self.supervisor is not None and self.supervisor.gave_up is None:
                continue  # a dead server is being restarted
            if not self.running():
                break
        return self.stop()

    def _shutdown_file(self) -> Path:
        return self._run_dir / "shutdown"

    def _install(self) -> TritonInstall:
        if self.tritonserver:
            return external_install(self.tritonserver, self.backend_directory)
        return embedded_install(cache_dir())

    def _environment(self, install: TritonInstall, model_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        libraries = [str(p) for p in install.library_path]
        if not self.tritonserver and python_library_dir():
            libraries.insert(0, str(python_library_dir()))
        if env.get("LD_LIBRARY_PATH"):
            libraries.append(env["LD_LIBRARY_PATH"])
        if libraries:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
        env["FRAMEPACK_PYTHONPATH"] = os.pathsep.join(stub_python_path())
        env["FRAMEPACK_MODEL_DIR"] = str(model_dir)
        env["FRAMEPACK_SHUTDOWN_FILE"] = str(self._shutdown_file())
        # Triton makes one instance per visible GPU, or one CPU instance when it sees none.
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device[5:]
        env.update(self.environment)
        return env


def _reachable(host: str) -> str:
    return DEFAULT_HOST if host in ("0.0.0.0", "") else host


def _check_port_free(host: str, port: int, name: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerStartError(
                f"{name} port {host}:{port} is not free ({e.strerror}): choose --{name}-port"
            ) from None


def _pump_log(stream: IO[bytes], log: IO[str], echo: bool) -> None:
    with log:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace")
            log.write(line)
            log.flush()
            if echo:
                sys.stderr.write(line)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
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
    tls_options = parser.add_argument_group("TLS for gRPC", "clients then connect with `framepack generate --ssl ...`")
    tls_options.add_argument("--grpc-server-cert", type=Path, metavar="PEM", help="server certificate (turns TLS on)")
    tls_options.add_argument("--grpc-server-key", type=Path, metavar="PEM", help="its private key")
    tls_options.add_argument("--grpc-client-ca", type=Path, metavar="PEM",
                             help="require client certificates signed by this CA")
    # Lets requests ask for failures (framepack_server/faults.py): for reliability tests only.
    parser.add_argument("--fault-injection", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.grpc_server_cert is None) != (args.grpc_server_key is None):
        parser.error("--grpc-server-cert and --grpc-server-key go together")
    if args.grpc_client_ca is not None and args.grpc_server_cert is None:
        parser.error("--grpc-client-ca needs --grpc-server-cert and --grpc-server-key")

    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        tls = None
        if args.grpc_server_cert:
            tls = GrpcTls(args.grpc_server_cert, args.grpc_server_key, args.grpc_client_ca)
        server = TritonServer(
            args.model_dir, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
            metrics_port=args.metrics_port, device=args.device, tritonserver=args.tritonserver,
            backend_directory=args.backend_directory, model_repository=args.model_repository,
            log_path=args.log_file, echo_log=not args.quiet, startup_timeout_s=args.startup_timeout,
            grpc_tls=tls, max_queued_jobs=args.max_queued_jobs, max_job_seconds=args.max_job_seconds,
            restart_on_failure=not args.no_restart, fault_injection=args.fault_injection, sampling=args.sampling,
            fp8=True if args.fp8 else None,
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
        print(f"framepack-server: error: {e}", file=sys.stderr)
        return 1
    server.supervise()
    scheme = " (TLS)" if tls else ""
    print(
        f"framepack-server: ready, gRPC{scheme} at {server.grpc_address} (log: {server.log_path}); Ctrl-C stops it",
        flush=True,
    )
    code = server.wait(stop_requested)
    if stop_requested.is_set():
        print("framepack-server: stopped", file=sys.stderr)
        return 0
    if server.supervisor is not None and server.supervisor.gave_up is not None:
        print(f"framepack-server: error: restart failed: {server.supervisor.gave_up}", file=sys.stderr)
        return 1
    print(f"framepack-server: tritonserver exited with code {code}", file=sys.stderr)
    return 1 if not code else code


if __name__ == "__main__":
    sys.exit(main())
