"""The launcher's lifecycle: its tritonserver dies with it (closed terminal, SIGKILL), a
port held by another server is named as such, and start-up failures name their cause."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from client import stream
from client.images import load_image
from framepack_backend.settings import EngineOptions, EngineOverrides, SettingsError
from framepack_server import server as server_module
from framepack_server.cli import main as server_main
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_server.processes import exited, spawn, wait_unreaped
from framepack_server.server import TritonServer, free_ports, model_load_error
from framepack_server.supervisor import backend_stub_pids
from framepack_wire import WireRequest

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def children(pid: int, name: str) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        if int(stat.rpartition(")")[2].split()[1]) == pid and comm == name:
            found.add(int(entry.name))
    return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def launcher_command(tiny_bundle: Path, ports: list[int], log: Path, *extra: str) -> list[str]:
    grpc, http, metrics = ports
    return [
        sys.executable, "-m", "framepack_server.cli", "--model-dir", str(tiny_bundle), "--device", "cpu",
        "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
        "--log-file", str(log), "--startup-timeout", "240", *extra,
    ]


def start_launcher(tiny_bundle: Path, tmp_path: Path) -> tuple[subprocess.Popen, list[int], Path]:
    """`framepack-server` in a session of its own (as `setsid` does), ready; its stdout and stderr in a file."""
    ports = free_ports(3)
    output = tmp_path / "launcher.out"
    launcher = subprocess.Popen(
        launcher_command(tiny_bundle, ports, tmp_path / "server.log", "--quiet"),
        stdin=subprocess.DEVNULL, stdout=output.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    ready = wait_for(lambda: "framepack-server: ready" in output.read_text() or launcher.poll() is not None, 240)
    assert ready and launcher.poll() is None, output.read_text()
    return launcher, ports, output


def server_processes(launcher: subprocess.Popen) -> tuple[int, set[int]]:
    [triton] = children(launcher.pid, "tritonserver")
    stubs = backend_stub_pids(triton)
    assert len(stubs) == 1
    return triton, stubs


# ------------------------------------------------------------------ parent-death signal, without a server


def test_a_child_outlives_the_thread_that_started_it():
    """PR_SET_PDEATHSIG fires when the forking *thread* ends: a restart from the supervisor's
    thread must not kill the new server when that thread ends."""
    started: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: started.append(spawn(["sleep", "60"])))
    thread.start()
    thread.join()
    [child] = started
    try:
        time.sleep(0.5)
        assert alive(child.pid) and not exited(child)
    finally:
        child.kill()
        child.wait()


def test_a_child_dies_when_its_launcher_is_killed(tmp_path):
    script = ("import sys, time; from framepack_server.processes import spawn; "
              "print(spawn(['sleep', '60']).pid, flush=True); time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    child = int(launcher.stdout.readline())
    assert alive(child)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert wait_for(lambda: not alive(child), 5), f"sleep {child} outlived its killed launcher"


def test_waiting_for_a_child_leaves_it_unreaped_until_wait():
    """stop() kills the stubs while tritonserver is still a zombie (see processes.py)."""
    child = spawn(["true"])
    assert wait_unreaped(child, 10)
    assert exited(child) and Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    assert child.wait() == 0
    assert not Path(f"/proc/{child.pid}").exists()


CRASHING_SERVER = """
import os, sys
parent = os.getpid()
child = os.fork()
if child == 0:  # a backend stub: watches its parent as pb_stub.cc does, but without pause
    while True:
        try:
            os.kill(parent, 0)  # succeeds while the parent is an unreaped zombie
        except ProcessLookupError:
            open(sys.argv[1], "w").write("the stub saw its parent gone")
            os._exit(1)
print(child, flush=True)
os._exit(3)  # the server crashes
"""


def test_a_crashed_server_stays_unreaped_until_its_stubs_are_killed(tmp_path):
    """A stub that sees tritonserver gone exits through C++ destructors, possibly under a
    running job thread (a heap corruption seen once): the supervisor's and the launcher's
    checks must not reap tritonserver, and stop() kills the stubs before reaping it."""
    flag = tmp_path / "flag"
    server = TritonServer(log_path=tmp_path / "server.log")
    server._run_dir = tmp_path / "run"
    server._run_dir.mkdir()
    server._process = spawn([sys.executable, "-c", CRASHING_SERVER, str(flag)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    stub = int(server._process.stdout.readline())
    assert wait_for(lambda: not server.running(), 10)
    time.sleep(0.5)
    assert alive(stub) and not flag.exists()  # its parent is a zombie: still there
    assert server.stop(timeout_s=10) == 3
    assert wait_for(lambda: not alive(stub), 5)
    assert not flag.exists()


# ------------------------------------------------------------------ start-up checks, without a server


def test_a_cuda_device_without_a_gpu_is_refused_in_one_line(tiny_bundle, monkeypatch, capsys):
    ports = [str(p) for p in free_ports(3)]
    arguments = ["--model-dir", str(tiny_bundle), "--grpc-port", ports[0], "--http-port", ports[1],
                 "--metrics-port", ports[2], "--quiet"]
    monkeypatch.setattr(server_module, "nvidia_gpu_count", lambda: 0)
    assert server_main([*arguments, "--device", "cuda:0"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "framepack-server: error: --device cuda:0: no NVIDIA GPU on this machine (nvidia-smi -L lists none): "
        "use --device cpu or auto"
    )
    monkeypatch.setattr(server_module, "nvidia_gpu_count", lambda: 2)
    assert server_main([*arguments, "--device", "cuda:2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "framepack-server: error: --device cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1"
    )
    assert all(port_free(int(p)) for p in ports)


LOAD_FAILURE = (
    'E1206 17:13:08.011707 29368 model_lifecycle.cc:642] "failed to load \'framepack\' version 1: Internal: '
    "ValueError: fp8=True is not allowed: expected a GPU with FP8 tensor cores (compute capability 8.9 or "
    'newer), not cpu\\n\\nAt:\\n  /x/framepack_backend/pipeline.py(310): configure_transformer\\n"'
)


def test_the_model_load_error_is_found_in_the_log():
    log = f'I1206 model_lifecycle.cc:472] "loading: framepack:1"\n{LOAD_FAILURE}\nError: Failed to initialize NVML\n'
    assert model_load_error(log) == (
        "ValueError: fp8=True is not allowed: expected a GPU with FP8 tensor cores (compute capability 8.9 or "
        "newer), not cpu"
    )
    assert model_load_error("error: creating server: Internal - failed to load all models") is None


# ------------------------------------------------------------------ real servers


@pytest.mark.server
@pytest.mark.slow
def test_sighup_stops_the_launcher_its_server_and_stubs_and_frees_the_ports(tiny_bundle, tmp_path):
    launcher, ports, output = start_launcher(tiny_bundle, tmp_path)
    try:
        triton, stubs = server_processes(launcher)

        # A second launcher on the same gRPC port names the server that holds it.
        second = subprocess.run(
            launcher_command(tiny_bundle, [ports[0], *free_ports(2)], tmp_path / "second.log", "--quiet"),
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert second.returncode == 1
        assert second.stderr.splitlines()[-1] == (
            f"framepack-server: error: a tritonserver (pid {triton}, ready) is already serving on "
            f"127.0.0.1:{ports[0]} (grpc); stop it (kill {triton}) or choose --grpc-port"
        )

        launcher.send_signal(signal.SIGHUP)  # what closing its terminal sends
        assert launcher.wait(60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert output.read_text().splitlines()[-1] == "framepack-server: stopped"
    assert not alive(triton) and not any(alive(stub) for stub in stubs)
    assert wait_for(lambda: all(port_free(p) for p in ports), 5), ports


@pytest.mark.server
@pytest.mark.slow
def test_sighup_while_starting_stops_at_once(tiny_bundle, tmp_path):
    ports = free_ports(3)
    output = tmp_path / "launcher.out"
    launcher = subprocess.Popen(
        launcher_command(tiny_bundle, ports, tmp_path / "server.log", "--quiet"),
        stdin=subprocess.DEVNULL, stdout=output.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert wait_for(lambda: children(launcher.pid, "tritonserver"), 120), output.read_text()
        [triton] = children(launcher.pid, "tritonserver")
        launcher.send_signal(signal.SIGHUP)
        assert launcher.wait(60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert output.read_text().splitlines()[-1] == "framepack-server: stopped while starting"
    assert "ready" not in output.read_text()
    assert not alive(triton) and not backend_stub_pids(triton)
    assert wait_for(lambda: all(port_free(p) for p in ports), 5), ports


@pytest.mark.server
@pytest.mark.slow
def test_a_killed_launcher_leaves_no_server_and_frees_the_ports(tiny_bundle, tmp_path):
    launcher, ports, _ = start_launcher(tiny_bundle, tmp_path)
    triton, stubs = server_processes(launcher)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert wait_for(lambda: not alive(triton), 5), f"tritonserver {triton} outlived its killed launcher"
    # Each stub sees its parent gone within 0.3 s and exits (1.7 s measured while idle).
    assert wait_for(lambda: not any(alive(stub) for stub in stubs), 15), f"backend stubs {stubs} left behind"
    assert wait_for(lambda: all(port_free(p) for p in ports), 5), ports


@pytest.mark.server
@pytest.mark.slow
def test_a_model_that_fails_to_load_is_named_first_and_gpu_warnings_stay_in_the_log(tiny_bundle, tmp_path):
    log = tmp_path / "server.log"
    ports = free_ports(3)
    launcher = subprocess.run(
        launcher_command(tiny_bundle, ports, log, "--fp8"), capture_output=True, text=True, timeout=240,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert launcher.returncode == 1
    [error] = [line for line in launcher.stderr.splitlines() if line.startswith("framepack-server: error:")]
    assert error == (
        "framepack-server: error: the framepack model failed to load: ValueError: fp8=True is not allowed: "
        "expected a GPU with FP8 tensor cores (compute capability 8.9 or newer), not cpu"
    )
    # The echo leaves out the expected warnings of a machine without a GPU, and says so once; the log keeps them.
    echoed = launcher.stderr.split(error)[0]
    assert "Failed to initialize NVML" not in echoed and "DCGM unable to start" not in echoed
    assert echoed.count("warnings are expected (kept in the log file only)") == 1
    assert "Failed to initialize NVML" in log.read_text() and "DCGM unable to start" in log.read_text()
    assert all(port_free(p) for p in ports)


# ------------------------------------------------------------------ memory modes on a CPU server


def test_a_cpu_server_refuses_offload_and_stream_naming_the_field():
    options = EngineOptions()
    for mode in ("offload", "stream"):
        with pytest.raises(SettingsError) as caught:
            options.for_job(EngineOverrides(memory_mode=mode), device_type="cpu")
        assert caught.value.field == "memory_mode" and caught.value.value == mode
        assert str(caught.value).startswith(f"memory_mode='{mode}' is not allowed: expected 'auto' or 'resident'")
        assert options.for_job(EngineOverrides(memory_mode=mode), device_type="cuda").memory_mode == mode
        assert options.for_job(EngineOverrides(memory_mode=mode)).memory_mode == mode  # the engine's own CPU runs
    for mode in ("auto", "resident", None):
        assert options.for_job(EngineOverrides(memory_mode=mode), device_type="cpu").memory_mode == (mode or "auto")


@pytest.mark.server
def test_a_stream_request_to_a_cpu_server_is_an_invalid_argument(triton_server):
    request = WireRequest(load_image(SAMPLE).pixels, "x", {"memory_mode": "stream"})
    with pytest.raises(stream.ServerError) as caught:
        list(stream.generate(triton_server.grpc_address, request))
    assert caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message.startswith("memory_mode='stream' is not allowed: expected 'auto' or 'resident'")


# ------------------------------------------------------------------ restarts


@pytest.mark.server
@pytest.mark.slow
def test_a_server_restarted_by_the_supervisor_survives_the_supervisor_thread(tiny_bundle, tmp_path):
    grpc, http, metrics = free_ports(3)
    with TritonServer(tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
                      log_path=tmp_path / "server.log", startup_timeout_s=240) as server:
        first, [stub] = server.pid, server.backend_stub_pids()
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: server.supervisor.restarts and server.running() and server.pid != first
                        and server_ready(server), 240), server.log_text()[-2000:]
        # Its stub was killed before tritonserver was reaped, so it never took its own
        # exit path (C++ destructors under a possibly running job thread).
        assert not alive(stub) and "Non-graceful termination" not in server.log_text()
        server.supervisor.stop()  # the thread that restarted the server ends
        time.sleep(1)
        assert server.running() and server_ready(server) and len(server.backend_stub_pids()) == 1
    assert not server.running() and all(port_free(p) for p in (grpc, http, metrics))


def server_ready(server: TritonServer) -> bool:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
