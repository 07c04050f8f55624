"""One queue over GPU groups, the API key and the web UI's login, without a tritonserver:
the group plan, the queue with several groups (fake pipelines), the key's checks and
the client's options."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from test_server_jobs import RecordingLog, RecordingSink, ScriptedPipeline, job, triton_args
from test_webui import UI_WITH_A_DESCRIBED_SERVER

from client import cli
from client.connection import Endpoint
from client.webui_login import is_loopback, login_problem, read_logins
from framepack_server.access import ApiKeyError, hide_api_key, read_api_key, restricted_protocol_arguments
from framepack_server.groups import OnGroupDevice, plan_groups
from framepack_server.instance import InstanceConfig, InstanceConfigError, InstanceOverrides
from framepack_server.jobs import JobQueue, QueueLoad
from framepack_server.server import free_ports
from framepack_wire import GRPC_API_KEY_HEADER

ROOT = Path(__file__).resolve().parent.parent
KEY = "0123456789abcdef0123456789abcdef"

# ------------------------------------------------------------------ the groups


@pytest.mark.parametrize("device, groups, gpus, per_group, devices", [
    ("auto", None, 0, 1, [("cpu",)]),
    ("cpu", 2, 8, 1, [("cpu",), ("cpu",)]),
    ("auto", None, 3, 1, [("cuda:0",), ("cuda:1",), ("cuda:2",)]),
    ("auto", 2, 3, 1, [("cuda:0",), ("cuda:1",)]),
    ("auto", None, 8, 4, [("cuda:0", "cuda:1", "cuda:2", "cuda:3"), ("cuda:4", "cuda:5", "cuda:6", "cuda:7")]),
    ("auto", None, 6, 4, [("cuda:0", "cuda:1", "cuda:2", "cuda:3")]),
    ("cuda:5", None, 8, 1, [("cuda:5",)]),
    ("cuda:2", None, 8, 2, [("cuda:2", "cuda:3")]),
])
def test_groups_split_the_visible_gpus(device, groups, gpus, per_group, devices):
    planned = plan_groups(device, groups, gpus, per_group)
    assert [g.devices for g in planned] == devices
    assert [g.index for g in planned] == list(range(len(devices)))
    assert planned[0].device == devices[0][0]


@pytest.mark.parametrize("device, groups, gpus, per_group", [
    ("auto", 3, 2, 1), ("auto", None, 3, 4), ("cuda:0", 2, 8, 1),
])
def test_more_groups_than_the_gpus_hold_are_refused_naming_the_parameter(device, groups, gpus, per_group):
    with pytest.raises(InstanceConfigError, match=r"^groups="):
        plan_groups(device, groups, gpus, per_group)


def test_the_launcher_s_groups_reach_the_instance(tmp_path):
    config = InstanceConfig.from_triton(triton_args(model_dir=str(tmp_path), groups="4"),
                                        InstanceOverrides(groups=2).environment())
    assert config.groups == 2
    assert InstanceConfig.from_triton(triton_args(model_dir=str(tmp_path)), {}).groups is None  # auto


class DevicePipeline:
    """Yields the thread's current CUDA device (None on the CPU) at each step."""

    def __init__(self, device: str):
        self.device = torch.device(device)

    def generate(self, request, cancel=None):
        for _ in range(2):
            yield torch.cuda.current_device() if self.device.type == "cuda" else None


def test_a_cpu_group_passes_its_pipeline_s_events_through():
    assert list(OnGroupDevice(DevicePipeline("cpu")).generate(None)) == [None, None]


@pytest.mark.gpu
def test_a_group_runs_with_its_gpu_as_the_thread_s_current_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.extend(OnGroupDevice(DevicePipeline("cuda:1")).generate(None)))
    worker.start()
    worker.join(30)
    assert seen == [1, 1] and torch.cuda.current_device() == 0  # this thread's device is untouched


# ------------------------------------------------------------------ one queue, two groups


def wait_for(condition, timeout_s=5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_two_groups_run_two_jobs_at_once_and_the_third_takes_the_first_free_one():
    gates = [threading.Event(), threading.Event()]
    groups = [ScriptedPipeline(steps=1, sections=1, gate=gate) for gate in gates]
    loads: list[QueueLoad] = []
    log = RecordingLog()
    jobs = JobQueue(groups, log, capacity=2, queued_interval_s=60, publish_load=loads.append)
    assert jobs.groups == 2 and loads == [QueueLoad(0, 0, 2)]
    first, second, third = RecordingSink(), RecordingSink(), RecordingSink()
    assert jobs.submit(job(first)) and jobs.submit(job(second))
    assert groups[0].started.wait(5) and groups[1].started.wait(5)  # both at once
    assert first.sent == [] and second.sent == []  # neither was told to wait
    assert jobs.submit(job(third))
    assert [r.event for r in third.sent] == [{"kind": "queued", "position": 1, "waited_s": 0.0}]
    assert jobs.load() == QueueLoad(waiting=1, busy=2, groups=2)
    assert loads[-1] == QueueLoad(1, 2, 2)
    groups[1].started.clear()
    gates[1].set()  # the second group frees first: the third job runs there
    assert wait_for(lambda: third.sent and third.sent[-1].final)
    assert groups[1].started.is_set()
    # Which of the first two jobs each group took is the workers' race; group 1's is done.
    on_group_1, on_group_0 = (first, second) if first.sent else (second, first)
    assert on_group_1.sent[-1].final and not on_group_0.sent
    gates[0].set()
    assert wait_for(lambda: on_group_0.sent and on_group_0.sent[-1].final)
    assert wait_for(lambda: jobs.load() == QueueLoad(0, 0, 2))
    jobs.close()
    assert [r.event["kind"] for r in on_group_1.sent] == ["progress", "section", "final"]
    # Every change was published, in order, and never more than the two groups were busy.
    assert QueueLoad(1, 2, 2) in loads and max(load.busy for load in loads) == 2
    assert loads[-1] == QueueLoad(0, 0, 2)
    running = [line for kind, line in log.lines if "running on GPU group" in line]
    assert sorted(running) == ["request 7: running on GPU group 0", "request 7: running on GPU group 1",
                               "request 7: running on GPU group 1"]


def test_the_busy_refusal_counts_from_the_longest_running_group():
    gates = [threading.Event(), threading.Event()]
    groups = [ScriptedPipeline(steps=1, sections=1, gate=gate) for gate in gates]
    jobs = JobQueue(groups, RecordingLog(), capacity=1)
    jobs._recent_s.append(30.0)  # one finished job took 30 s
    assert jobs.submit(job(RecordingSink())) and groups[0].started.wait(5)
    time.sleep(1.2)
    assert jobs.submit(job(RecordingSink())) and groups[1].started.wait(5)
    assert jobs.submit(job(RecordingSink()))
    assert not jobs.submit(job(RecordingSink()))
    # The first group's job has run longest (1.2 s or more): it frees a group, and so a slot,
    # first; counting from the second one's (just started) would say 30 s.
    hint = re.fullmatch(r"the server is busy \(1 jobs already wait for this model instance\); retry in about "
                        r"(\d+) s \(an estimate from how long the last job ran\)", jobs.refusal())
    assert hint and 20 <= int(hint.group(1)) <= 29
    for gate in gates:
        gate.set()
    jobs.close()


def test_a_failing_metrics_sink_never_stops_the_queue():
    def broken(load):
        raise RuntimeError("metrics down")

    log = RecordingLog()
    jobs = JobQueue([ScriptedPipeline(steps=1, sections=1)], log, capacity=1, publish_load=broken)
    sink = RecordingSink()
    assert jobs.submit(job(sink))
    assert wait_for(lambda: sink.sent and sink.sent[-1].final)
    jobs.close()
    assert ("error", "queue metrics not updated: RuntimeError: metrics down") in log.lines


# ------------------------------------------------------------------ the API key


def test_the_api_key_comes_from_a_file_and_must_be_long_visible_ascii(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    assert read_api_key(path) == KEY
    for bad in ("short", "with a space in the middle of it", "ключ" * 8, ""):
        path.write_text(bad)
        with pytest.raises(ApiKeyError, match=f"^--api-key-file {path}: the API key is not allowed"):
            read_api_key(path)
    with pytest.raises(ApiKeyError, match="cannot read it"):
        read_api_key(tmp_path / "missing")


def test_triton_restricts_every_protocol_but_health_and_the_log_hides_the_key():
    grpc, http = restricted_protocol_arguments(KEY)
    rule = f"metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging:x-api-key={KEY}"
    assert (grpc, http) == (f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}")
    assert "health" not in rule
    assert hide_api_key(["tritonserver", grpc], KEY) == ["tritonserver", grpc.replace(KEY, "***")]
    assert hide_api_key(["tritonserver"], None) == ["tritonserver"]


def test_the_client_takes_the_key_from_a_file_or_the_environment_and_never_prints_it(tmp_path):
    path = tmp_path / "key"
    path.write_text(f"{KEY}\n")
    args = cli.build_parser().parse_args(["generate", "--image", "x.png", "--prompt", "p", "--output", "o.mp4",
                                          "--api-key-file", str(path)])
    endpoint = cli.endpoint(args)
    assert endpoint.headers() == {GRPC_API_KEY_HEADER: KEY}
    assert KEY not in repr(endpoint)
    assert cli.api_key(None, {"FRAMEPACK_API_KEY": "from-env"}) == "from-env"
    assert cli.api_key(None, {}) is None and Endpoint("localhost").headers() is None
    path.write_text("\n")
    with pytest.raises(ValueError, match="the file is empty"):
        cli.api_key(path, {})


def test_the_server_refuses_a_bad_key_file_in_one_line(tmp_path, capsys):
    from framepack_server import cli as server_cli

    path = tmp_path / "key"
    path.write_text("short")
    with pytest.raises(SystemExit) as exited:
        server_cli.main(["--api-key-file", str(path)])
    assert exited.value.code == 2
    assert f"--api-key-file {path}: the API key is not allowed" in capsys.readouterr().err


# ------------------------------------------------------------------ the web UI's login


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                             ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                             ("192.168.1.5", False), ("gpu-box", False)])
def test_only_loopback_addresses_count_as_this_machine(host, loopback):
    assert is_loopback(host) is loopback
    assert (login_problem(host, None) is None) is loopback
    assert login_problem(host, Path("logins")) is None


def test_a_login_file_holds_user_password_lines(tmp_path):
    path = tmp_path / "logins"
    path.write_text("# team\nalice:s3cret:with:colons\n\nbob:pw\n")
    assert read_logins(path) == [("alice", "s3cret:with:colons"), ("bob", "pw")]
    path.write_text("alice\n")
    with pytest.raises(ValueError, match="line 1: expected user:password"):
        read_logins(path)
    path.write_text("# nobody\n")
    with pytest.raises(ValueError, match="no user:password line"):
        read_logins(path)


def test_the_ui_beyond_loopback_without_a_login_is_refused_before_anything(capsys):
    assert cli.main(["ui", "--server", "127.0.0.1:1", "--host", "0.0.0.0", "--port", "7860"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == (
        "framepack: error: --host 0.0.0.0 serves the page beyond this machine: give --login-file FILE "
        "(lines user:password) so it asks for a login"
    )


def login(port: int, user: str, password: str) -> int:
    form = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", data=form, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_ui_refuses_a_wrong_login_and_admits_the_right_one(tmp_path):
    pytest.importorskip("gradio")
    logins = tmp_path / "logins"
    logins.write_text("alice:correct-horse\n")
    (port,) = free_ports(1)
    environment = {key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}
    ui = subprocess.Popen(
        [sys.executable, "-c", UI_WITH_A_DESCRIBED_SERVER, "ui", "--server", "127.0.0.1", "--port", str(port),
         "--output-dir", str(tmp_path / "out"), "--login-file", str(logins)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**environment, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert ui.stderr.readline().startswith("framepack: web UI for")
        with pytest.raises(urllib.error.HTTPError) as locked:  # the app's config needs a login
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30)
        assert locked.value.code == 401
        assert login(port, "alice", "wrong") == 400
        assert login(port, "mallory", "correct-horse") == 400
        assert login(port, "alice", "correct-horse") == 200
    finally:
        ui.terminate()
        ui.wait(30)


def test_run_ui_reads_the_login_file_before_serving(tmp_path, monkeypatch):
    logins = tmp_path / "logins"
    logins.write_text("alice:pw\n")
    served = {}
    import client.webui as webui

    monkeypatch.setattr(webui, "serve", lambda *args: served.setdefault("args", args) and 0)
    args = cli.build_parser().parse_args(["ui", "--host", "0.0.0.0", "--port", str(free_ports(1)[0]),
                                          "--login-file", str(logins)])
    assert isinstance(args, argparse.Namespace)
    cli.run_ui(args)
    assert served["args"][-1] == [("alice", "pw")]

