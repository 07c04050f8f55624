"""Reliability and security pieces without a running server: validation gaps, fault
injection, the time limit, memory accounting, retry hints, the client's error mapping,
retries and event checks, TLS options, the supervisor's stub watch, safetensors only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_server_jobs import RecordingLog, RecordingSink, ScriptedPipeline, job, wait_until
from tritonclient.utils import InferenceServerException

from client import cli, connection, stream
from client.connection import Endpoint, Unreachable, ready_client
from framepack_backend.components import load_components
from framepack_backend.events import GenerationResult
from framepack_backend.request import parse_request, validate_image
from framepack_backend.settings import SamplingSettings, SettingsError
from framepack_server.cli import main as server_main
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_server.faults import Fault, InjectedFault, take_fault
from framepack_server.instance import InstanceConfig, InstanceOverrides
from framepack_server.job_memory import free_memory, live_tensor_bytes, memory_report
from framepack_server.jobs import Job, JobQueue, Outcome, run_job
from framepack_server.protocol import Status
from framepack_server.server import GrpcTls, TritonServer, free_ports
from framepack_server.supervisor import Supervisor, backend_stub_pids
from framepack_server.triton_install import STUB_NAME

# ------------------------------------------------------------------ validation gaps


@pytest.mark.parametrize("value", ["nul\x00", "x" * 4001])
def test_the_negative_prompt_is_checked_like_the_prompt(value):
    with pytest.raises(SettingsError) as caught:
        SamplingSettings.from_mapping({"negative_prompt": value})
    assert caught.value.field == "negative_prompt"


def test_thin_strips_are_refused_before_the_bucket_resize_could_blow_up():
    assert validate_image(np.zeros((16, 256, 3), np.uint8)).shape == (16, 256, 3)
    with pytest.raises(SettingsError) as caught:
        validate_image(np.zeros((16, 257, 3), np.uint8))
    assert caught.value.field == "image" and "16× the short one" in str(caught.value)


# ------------------------------------------------------------------ fault injection


def test_the_fault_parameter_is_an_unknown_setting_unless_fault_injection_is_on():
    parameters = {"prompt": "p", "fault": "raise@2"}
    assert take_fault(parameters, enabled=False) is None
    with pytest.raises(SettingsError) as caught:
        parse_request(np.zeros((16, 16, 3), np.uint8), parameters)
    assert caught.value.field == "fault"

    assert take_fault(parameters, enabled=True) == Fault(2)
    assert parameters == {"prompt": "p"}
    for bad in ["raise@0", "explode", 3]:
        with pytest.raises(SettingsError) as caught:
            take_fault({"fault": bad}, enabled=True)
        assert caught.value.field == "fault" and "raise@N" in caught.value.allowed


def test_a_fault_raises_inside_the_engine_on_the_chosen_poll_and_the_job_fails():
    polls = []
    cancel = Fault(3).wrap(lambda: polls.append(1) or False)
    assert [cancel(), cancel()] == [False, False]
    with pytest.raises(InjectedFault):
        cancel()
    assert len(polls) == 2

    sink, log = RecordingSink(), RecordingLog()
    faulty = Job("9", job(sink).request, sink, Fault(5))
    assert run_job(ScriptedPipeline(steps=3), faulty, log) is Outcome.FAILED
    assert len(sink.sent) == 5  # 3 steps, a section and a step; the 5th poll failed
    assert sink.failures == [(Status.INTERNAL, "generation failed: InjectedFault: injected fault before model "
                                               "evaluation 5")]


# ------------------------------------------------------------------ time limit, retry hint, memory


class SlowPipeline(ScriptedPipeline):
    def generate(self, request, cancel=None):
        for event in super().generate(request, cancel):
            time.sleep(0.05)
            yield event


def test_a_job_past_the_time_limit_stops_at_its_next_step_with_deadline_exceeded():
    sink, log = RecordingSink(), RecordingLog()
    assert run_job(SlowPipeline(steps=10), job(sink), log, time_limit_s=0.12) is Outcome.TIMED_OUT
    assert 2 <= len(sink.sent) <= 4  # 0.05 s per event: stopped at the first step after 0.12 s
    [(status, text)] = sink.failures
    assert status is Status.DEADLINE_EXCEEDED and "limit of 0.12 s per job (max_job_seconds)" in text
    assert "past the time limit" in log.lines[-1][1]


def test_a_busy_queue_refuses_with_a_retry_hint_from_the_last_job():
    jobs = JobQueue(SlowPipeline(steps=2, sections=1), RecordingLog(), capacity=1)
    assert jobs.refusal().endswith("retry later")  # nothing measured yet
    sink = RecordingSink()
    assert jobs.submit(job(sink))
    wait_until(lambda: ended(sink), seconds=10)
    time.sleep(0.5)  # the worker measures and logs after the final response
    assert jobs.refusal() == ("the server is busy (1 jobs already wait for this model instance); retry in about 1 s "
                              "(an estimate from how long the last job ran)")
    jobs.close()
    assert jobs.refusal() == "the server is shutting down; retry later"


def test_the_memory_report_counts_live_tensor_storage_exactly():
    free_memory()
    before = memory_report()
    leak = torch.zeros(2**18)  # 1 MiB
    view = leak[10:20]  # noqa: F841 - shares the storage: counted once
    after = memory_report()
    assert after.tensor_bytes - before.tensor_bytes == 2**20
    assert after.tensors - before.tensors == 2
    assert after.rss_bytes > 0 and after.cuda_allocated_bytes == 0
    del leak, view
    assert live_tensor_bytes()[0] == before.tensor_bytes


class TupleBuildingPipeline:
    """One long job that builds tuples from generators, as the engine's code does all the
    time, until it is released."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, request, cancel=None):
        self.started.set()
        while not self.release.is_set():
            tuple(i for i in range(64))
        yield GenerationResult(np.zeros((1, 2, 2, 3), np.uint8), 30, 2, 2, 0, {}, {})


def ended(sink: RecordingSink) -> bool:
    return bool(sink.failures) or bool(sink.sent and sink.sent[-1].final)


def test_jobs_ending_on_one_group_leave_the_job_on_another_unharmed():
    """The worker's memory census after a job walks every object (gc.get_objects()); a tuple
    another group's job was filling from a generator then failed with "SystemError: …
    tupleobject.c…: bad argument to internal function". The census waits for a quiet queue."""
    long_job = TupleBuildingPipeline()
    log = RecordingLog()
    jobs = JobQueue([long_job, ScriptedPipeline(steps=1, sections=1)], log, capacity=4)
    running = RecordingSink()
    while not long_job.started.is_set():  # until the long job has a group of its own
        running = RecordingSink()
        assert jobs.submit(job(running))
        long_job.started.wait(0.2)
    short = [RecordingSink() for _ in range(30)]
    for sink in short:  # one after another, on the other group
        assert jobs.submit(job(sink))
        wait_until(lambda: ended(sink), seconds=10)

    def memory_lines() -> list[str]:
        return [text for _, text in log.lines if "memory after the job" in text]

    def not_counted() -> int:
        return sum("tensors not counted while other jobs run" in text for text in memory_lines())

    # The worker measures and logs after a job's final response: wait for the short jobs' lines.
    wait_until(lambda: not_counted() >= 30, seconds=10)
    long_job.release.set()
    wait_until(lambda: ended(running), seconds=10)
    time.sleep(0.5)  # then for the long job's line, logged after its final response
    jobs.close()
    assert running.failures == [] and running.sent[-1].final
    assert all(sink.failures == [] for sink in short)
    assert not_counted() >= 30
    assert re.search(r"tensors \d+ bytes in \d+ tensors", memory_lines()[-1])  # the last one, alone, counts


def test_the_worker_logs_memory_after_every_job():
    log = RecordingLog()
    jobs = JobQueue(ScriptedPipeline(error=RuntimeError("boom")), log, capacity=1)
    assert jobs.submit(job(RecordingSink()))
    deadline = time.monotonic() + 10
    while len(log.lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs.close()
    [line] = [text for _, text in log.lines if "memory after the job" in text]
    assert line.startswith("request 7: failed; memory after the job: tensors ")


def test_instance_config_reads_the_time_limit_and_fault_injection(tmp_path):
    args = {"model_config": json.dumps({"parameters": {"max_job_seconds": {"string_value": "7200"}}})}
    env = {"FRAMEPACK_MODEL_DIR": str(tmp_path)}
    assert InstanceConfig.from_triton(args, env).max_job_seconds == 7200
    assert not InstanceConfig.from_triton(args, env).fault_injection
    env.update(FRAMEPACK_MAX_JOB_SECONDS="0", FRAMEPACK_FAULT_INJECTION="1")
    config = InstanceConfig.from_triton(args, env)
    assert config.max_job_seconds is None and config.fault_injection


# ------------------------------------------------------------------ client: errors, events, retries


@pytest.mark.parametrize("message, status, lost", [
    ("DEADLINE_EXCEEDED: the job ran past ...", "DEADLINE_EXCEEDED", False),
    ("[request id: <id_unknown>] unexpected shape for input 'image' for model 'framepack'. Expected [-1,-1,3], "
     "got [64,64]. ", "INVALID_ARGUMENT", False),
    ("[request id: <id_unknown>] inference input 'image' data-type is 'FP32', but model 'framepack' expects 'UINT8'",
     "INVALID_ARGUMENT", False),
    ("unexpected inference input 'picture' for model 'framepack'", "INVALID_ARGUMENT", False),
    ("[request id: <id_unknown>] expected number of inputs between 0 and 1 but got 2 inputs for model "
     "'framepack'. Got input(s) ['mask','image'], but missing required input(s) ]. ", "INVALID_ARGUMENT", False),
    ("Stub process 'framepack_0_0' is not healthy.", "UNAVAILABLE", True),
    ("something else", "UNKNOWN", False),
])
def test_stream_errors_get_a_status_word(message, status, lost):
    error = stream._server_error(InferenceServerException(message), "h:1")
    assert error.status == status and isinstance(error, stream.ServerLost) is lost


def test_a_dropped_connection_is_reported_as_server_loss():
    error = stream._server_error(InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"), "h:1")
    assert isinstance(error, stream.ServerLost)
    assert str(error) == "UNAVAILABLE: lost the connection to the server at h:1 (StatusCode.UNAVAILABLE: Socket closed)"


class FakeResult:
    def __init__(self, meta: dict):
        self._event = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    def as_numpy(self, name):
        return self._event if name == "event" else np.zeros((1, 2, 2, 3), np.uint8)


@pytest.mark.parametrize("field, value", [("section", "../../etc/x"), ("section", 1.5), ("sections", True)])
def test_numbers_from_the_server_that_name_files_must_be_integers(field, value):
    meta = dict(kind="section", section=1, sections=2, start_frame=0, total_frames=1, fps=30)
    assert stream._parse(FakeResult(meta)).section == 1
    with pytest.raises(stream.ServerError, match=f"{field}=.* is not an integer"):
        stream._parse(FakeResult({**meta, field: value}))


def test_a_final_seed_that_is_not_an_integer_is_refused():  # the web UI names its MP4 after the seed
    meta = dict(kind="final", frame_count=1, fps=30, width=2, height=2, seed="../x", settings={}, timings={})
    with pytest.raises(stream.ServerError, match="seed="):
        stream._parse(FakeResult(meta))


class FlakyClient:
    def __init__(self, answers: list):
        self.answers = answers
        self.closed = False

    def is_model_ready(self, name, client_timeout=None):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self):
        self.closed = True


def test_connecting_retries_with_backoff_until_the_model_is_ready(monkeypatch):
    answers = [InferenceServerException("connection refused"), False, False, True]
    monkeypatch.setattr(Endpoint, "client", lambda self: FlakyClient(answers))
    slept = []
    client = ready_client(Endpoint("h:1"), sleep=slept.append)
    assert slept == [0.25, 0.5, 1.0] and not client.closed and answers == []


def test_connecting_gives_up_after_the_timeout_naming_the_address(monkeypatch):
    monkeypatch.setattr(Endpoint, "client", lambda self: FlakyClient([InferenceServerException("refused")] * 99))
    clock = [0.0]
    monkeypatch.setattr(connection.time, "monotonic", lambda: clock[0])

    def sleep(seconds):
        clock[0] += seconds

    with pytest.raises(Unreachable) as caught:
        ready_client(Endpoint("h:1", connect_timeout_s=10), sleep=sleep)
    # 0.25 + 0.5 + 1 + 2 + 4 = 7.75 s waited; another 4 s would pass the 10 s limit.
    assert str(caught.value) == "cannot reach the server at h:1 (6 attempts over 7.8 s): refused"


def test_tls_options_are_checked(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    with pytest.raises(ValueError, match="need ssl=True"):
        Endpoint("h:1", root_certificates=pem)
    with pytest.raises(ValueError, match="go together"):
        Endpoint("h:1", ssl=True, private_key=pem)
    with pytest.raises(ValueError, match="no such file"):
        Endpoint("h:1", ssl=True, root_certificates=tmp_path / "missing.pem")
    assert Endpoint("h:1", ssl=True, root_certificates=pem).ssl


def test_the_cli_reports_an_unreachable_server_in_one_line(tmp_path):
    port = free_ports(1)[0]
    command = [sys.executable, "-m", "client.cli", "generate", "--image", str(SAMPLE), "--prompt", "p",
               "--output", str(tmp_path / "o.mp4"), "--server", f"127.0.0.1:{port}", "--connect-timeout", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == cli.EXIT_SERVER_ERROR
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"framepack: error: UNAVAILABLE: cannot reach the server at 127.0.0.1:{port} (")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_tls_files_without_ssl(tmp_path, capsys):
    args = ["generate", "--image", str(SAMPLE), "--prompt", "p", "--output", str(tmp_path / "o.mp4"),
            "--root-certificates", str(SAMPLE)]
    assert cli.main(args) == cli.EXIT_USAGE
    assert "need ssl=True (--ssl)" in capsys.readouterr().err


# ------------------------------------------------------------------ launcher: TLS, limits, supervisor


def test_tls_flags_for_tritonserver(tmp_path):
    cert, key, ca = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    for path in (cert, key, ca):
        path.write_text("x")
    assert GrpcTls(cert, key).arguments() == [
        "--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]
    assert GrpcTls(cert, key, ca).arguments()[-2:] == ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={ca}"]
    with pytest.raises(ValueError, match="--grpc-server-key .*: no such file"):
        GrpcTls(cert, tmp_path / "nothing.pem")


def test_the_server_cli_wants_certificate_and_key_together(capsys):
    with pytest.raises(SystemExit):
        server_main(["--grpc-server-cert", str(SAMPLE)])
    assert "--grpc-server-cert and --grpc-server-key go together" in capsys.readouterr().err


def test_limits_and_fault_injection_reach_the_server_environment():
    server = TritonServer(overrides=InstanceOverrides(max_queued_jobs=2, max_job_seconds=60, fault_injection=True))
    assert server.environment == {"FRAMEPACK_MAX_QUEUED_JOBS": "2", "FRAMEPACK_MAX_JOB_SECONDS": "60",
                                  "FRAMEPACK_FAULT_INJECTION": "1"}
    assert TritonServer().environment == {}


def test_backend_stubs_are_found_by_process_group_and_name(tmp_path):
    fake_stub = tmp_path / STUB_NAME
    shutil.copy("/bin/sleep", fake_stub)
    process = subprocess.Popen([str(fake_stub), "60"], start_new_session=True)
    try:
        assert backend_stub_pids(process.pid) == {process.pid}
        assert backend_stub_pids(os.getpgid(0)) == set()  # not in our group
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert backend_stub_pids(process.pid) == set()


class FakeServer:
    def __init__(self):
        self.stubs = {11}
        self.restarted = []

    def running(self):
        return True

    def backend_stub_pids(self):
        return set(self.stubs)

    def restart(self, reason):
        self.restarted.append(reason)
        self.stubs = {12}


def test_the_supervisor_restarts_the_server_when_a_stub_dies():
    server, notes = FakeServer(), []
    supervisor = Supervisor(server, notes.append, poll_s=0.01)
    supervisor.start()
    time.sleep(0.05)
    assert server.restarted == []
    server.stubs = set()
    deadline = time.monotonic() + 5
    while not server.restarted and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    supervisor.stop()
    assert server.restarted == ["backend stub process 11 died"] and supervisor.restarts == server.restarted
    assert notes == ["backend stub process 11 died; restarting the server"]


# ------------------------------------------------------------------ weights: safetensors only


@pytest.mark.parametrize("folder, weights, pickle_name", [
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
])
def test_pickle_weights_are_refused(tiny_bundle, tmp_path, folder, weights, pickle_name):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    state = load_file(bundle / folder / weights)
    (bundle / folder / weights).unlink()
    torch.save(state, bundle / folder / pickle_name)  # what transformers and diffusers would fall back to
    with pytest.raises(OSError, match=f"no file named {weights}"):
        load_components(bundle, dtype=torch.float32)
