"""One `tritonserver` process serving the FramePack model repository: ports, TLS, log, lifecycle.

    grpc, http, metrics = free_ports(3)
    with TritonServer(path, grpc_port=grpc, http_port=http, metrics_port=metrics) as server:
        ...  # server.grpc_address

If the model's backend stub or the server itself dies, the server is restarted
(supervisor.py says why a restart and not less). `framepack-server` (cli.py) is the
command line around this class.
"""

from __future__ import annotations

import os
import re
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

from .access import check_api_key, hide_api_key, restricted_protocol_arguments
from .instance import (
    ENV_OVERRIDES,
    SHUTDOWN_FILE_ENV,
    InstanceConfigError,
    InstanceOverrides,
    check_device,
    check_speed_options,
)
from .processes import command_line, exited, kill_group, listening_pid, spawn, wait_unreaped
from .supervisor import Supervisor, backend_stub_pids
from .tiny_model import ensure_tiny_bundle
from .triton_install import (
    TritonInstall,
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
        restart_on_failure: bool = True,
        overrides: InstanceOverrides = InstanceOverrides(),
        api_key: str | None = None,
    ):
        """`overrides` replace model config values for this server's instances (instance.py);
        `environment` adds variables of its own to the server's; `api_key` makes every
        request but health checks carry it (access.py)."""
        self.model_dir = Path(model_dir).expanduser().resolve() if model_dir else None
        self.host = host
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.device = check_device(device)
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.backend_directory = Path(backend_directory) if backend_directory else None
        self.model_repository = Path(model_repository or default_model_repository()).resolve()
        self.log_path = Path(log_path) if log_path else cache_dir() / "logs" / f"tritonserver-{grpc_port}.log"
        self.echo_log = echo_log
        self.startup_timeout_s = startup_timeout_s
        self.overrides = overrides
        self.environment = {**overrides.environment(), **(environment or {})}
        self.grpc_tls = grpc_tls
        self.restart_on_failure = restart_on_failure
        self.api_key = check_api_key(api_key, "api_key") if api_key is not None else None
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
        # Not Popen.poll(): that would reap tritonserver before stop() kills its stubs (processes.py).
        return self._process is not None and not exited(self._process)

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

    def request_stop(self) -> None:
        """Make a `wait_ready` in progress give up (from a signal handler); `stop()` still stops."""
        self._stop_requested.set()

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
        if self.device.startswith("cuda:"):
            _check_gpu(int(self.device[5:]))
        self._check_speed_options()
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
            *(restricted_protocol_arguments(self.api_key) if self.api_key else []),
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
        log.write(f"# {' '.join(hide_api_key(command, self.api_key))}\n# model dir: {model_dir}\n")
        log.flush()
        # Dies with this process (processes.py), so a closed terminal or a killed
        # launcher leaves no server behind holding the ports.
        self._process = spawn(
            command,
            env=self._environment(install, model_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C reaches the server only through stop()
        )
        echo = _Echo(gpu_expected=self.device != "cpu" and nvidia_gpu_count() > 0) if self.echo_log else None
        self._pump = threading.Thread(target=_pump_log, args=(self._process.stdout, log, echo), daemon=True)
        self._pump.start()

    def _check_speed_options(self) -> None:
        """Refuse speed options that cannot apply to this server before starting it (instance.py)."""
        o = self.overrides
        # Only CUDA graphs depend on the device, and counting GPUs runs nvidia-smi.
        on_gpu = self.device != "cpu" and nvidia_gpu_count() > 0 if o.cuda_graphs else None
        try:
            check_speed_options(bool(o.fused_qkv), bool(o.cuda_graphs), on_gpu=on_gpu,
                                sequence_parallel=o.sequence_parallel or 1, lora_dir=o.lora_dir)
        except InstanceConfigError as e:
            raise ServerStartError(str(e)) from None

    def wait_ready(self) -> None:
        """Wait for /v2/health/ready; if the server dies or times out, raise with its log's tail."""
        process, pump = self._process, self._pump
        if process is None or pump is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._stop_requested.is_set():
                raise ServerStartError("stopped while starting")
            if exited(process):
                kill_group(process.pid)  # a stub it left, before reaping (processes.py)
                code = process.wait()
                pump.join(5)
                log = self.log_text()
                failure = model_load_error(log)
                cause = f"the framepack model failed to load: {failure}\n" if failure else ""
                raise ServerStartError(
                    f"{cause}tritonserver exited with code {code} while starting; "
                    f"last lines of {self.log_path}:\n{_tail(log)}"
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
        if not exited(process):
            # Triton tells the model nothing on shutdown; jobs poll this file and stop.
            self._shutdown_file().touch()
            os.kill(process.pid, signal.SIGTERM)  # not send_signal(): it polls, which reaps
            if not wait_unreaped(process, timeout_s):
                kill_group(process.pid)
                wait_unreaped(process, 10)
        # When Triton gives up waiting for the model ("Exit timeout expired"), it exits and
        # leaves the backend stub behind; the stubs share the server's process group. Kill
        # them while tritonserver is still an unreaped zombie: a stub that sees its parent
        # gone exits through C++ destructors under a running job thread (processes.py).
        kill_group(process.pid)
        process.wait()
        if self._pump is not None:
            self._pump.join(5)
        if self._run_dir is not None:
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
        if self._run_dir is None:
            raise RuntimeError("server not started")
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
        env["FRAMEPACK_PYTHON"] = sys.executable  # the stub's sys.executable is not this environment's Python
        env[ENV_OVERRIDES["model_dir"]] = str(model_dir)
        env[SHUTDOWN_FILE_ENV] = str(self._shutdown_file())
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
            raise ServerStartError(_port_taken(host, port, name, e.strerror)) from None


def _port_taken(host: str, port: int, name: str, why: str | None) -> str:
    """Why a port is not free, naming the process that holds it when we can see it."""
    pid = listening_pid(port)
    command = command_line(pid) if pid is not None else []
    if command and os.path.basename(command[0]) == "tritonserver":
        http = next((a.split("=", 1)[1] for a in command if a.startswith("--http-port=")), None)
        address = next((a.split("=", 1)[1] for a in command if a.startswith("--http-address=")), host)
        state = ""
        if http is not None:
            state = ", ready" if _ready(f"http://{_reachable(address)}:{http}") else ", not ready"
        return (
            f"a tritonserver (pid {pid}{state}) is already serving on {host}:{port} ({name}); "
            f"stop it (kill {pid}) or choose --{name}-port"
        )
    if name == "http" and _ready(f"http://{_reachable(host)}:{port}"):
        return f"a Triton server is already serving on {host}:{port} ({name}); stop it or choose --{name}-port"
    holder = f"; held by pid {pid} ({os.path.basename(command[0])})" if command else ""
    return f"{name} port {host}:{port} is not free ({why}{holder}): choose --{name}-port"


def _ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def nvidia_gpu_count() -> int:
    """NVIDIA GPUs on this machine, found without CUDA or torch (the launcher imports neither)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        if listing.returncode == 0:
            return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    folder = Path("/proc/driver/nvidia/gpus")
    if folder.is_dir():
        return len(list(folder.iterdir()))
    return len([d for d in Path("/dev").glob("nvidia*") if d.name[6:].isdigit()])


def _check_gpu(index: int) -> None:
    count = nvidia_gpu_count()
    if count == 0:
        raise ServerStartError(
            f"--device cuda:{index}: no NVIDIA GPU on this machine (nvidia-smi -L lists none): use --device cpu or auto"
        )
    if index >= count:
        raise ServerStartError(
            f"--device cuda:{index}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
        )


def model_load_error(log: str) -> str | None:
    """The framepack model's load error in a tritonserver log (its first line), or None."""
    for line in log.splitlines():
        found = re.search(r"failed to load 'framepack' version \d+: (?:\w+: )?(.*)", line)
        if found:
            # Triton quotes the message, writing its newlines as "\n"; keep the first line.
            return found.group(1).split("\\n", 1)[0].rstrip('"').strip()
    return None


# What tritonserver logs on a machine without a GPU; harmless there (it runs on the CPU).
NO_GPU_NOISE = (
    "Unable to allocate pinned system memory",
    "CUDA memory pool disabled",
    "CudaDriverHelper has not been initialized",
    "Failed to initialize NVML",
    "DCGM unable to start",
)


class _Echo:
    """Copies the server log to stderr; without a GPU, tritonserver's CUDA/NVML/DCGM
    warnings are expected, so they stay in the log file and one line says so."""

    def __init__(self, gpu_expected: bool):
        self._filter = not gpu_expected
        self._noted = False
        self._broken = False

    def write(self, line: str) -> None:
        if self._broken:
            return
        text = line
        if self._filter and any(noise in line for noise in NO_GPU_NOISE):
            if self._noted:
                return
            self._noted = True
            text = ("framepack-server: running without a GPU: tritonserver's CUDA, NVML and DCGM warnings "
                    "are expected (kept in the log file only)\n")
        try:
            sys.stderr.write(text)
        except (OSError, ValueError):  # the terminal is gone (closed window): keep logging to the file
            self._broken = True


def _pump_log(stream: IO[bytes], log: IO[str], echo: _Echo | None) -> None:
    with log:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace")
            log.write(line)
            log.flush()
            if echo is not None:
                echo.write(line)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
