"""Server-side pieces without a running server: wire protocol, job runner and queue,
instance configuration, the model config, and the launcher's checks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from framepack_backend.errors import GenerationCancelled
from framepack_backend.events import GenerationResult, SectionFinished, StepProgress
from framepack_backend.request import GenerationRequest, parse_request
from framepack_backend.settings import SettingsError
from framepack_server import protocol
from framepack_server.instance import ENV_OVERRIDES, InstanceConfig, InstanceConfigError, InstanceOverrides
from framepack_server.jobs import Job, JobQueue, Outcome, QueueLoad, run_job
from framepack_server.protocol import Status, request_parameters, to_wire
from framepack_server.server import ServerStartError, TritonServer, free_ports
from framepack_server.supervisor import STUB_EXIT_CODE, exit_for_restart
from framepack_server.triton_install import embedded_install, stub_python_path

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
IMAGE = np.zeros((16, 16, 3), np.uint8)


# ------------------------------------------------------------------ protocol


def test_parameters_give_prompt_and_typed_settings():
    request = parse_request(IMAGE, {"prompt": "waves", "steps": "7", "gs": 8, "teacache": "off", "preset": "Dance"})
    assert request.prompt == "waves"
    assert (request.settings.steps, request.settings.gs, request.settings.teacache) == (7, 8.0, False)
    assert request.settings.flow_preset == "dance"  # from the preset; explicit values won


@pytest.mark.parametrize(
    "parameters, field",
    [({}, "prompt"), ({"prompt": 3}, "prompt"), ({"prompt": "p", "steps": 0}, "steps"),
     ({"prompt": "p", "colour": "red"}, "colour")],
)
def test_bad_parameters_name_the_field(parameters, field):
    with pytest.raises(SettingsError) as caught:
        parse_request(IMAGE, parameters)
    assert caught.value.field == field


@pytest.mark.parametrize("text", ["not json", "[1, 2]"])
def test_parameters_must_be_a_json_object(text):
    with pytest.raises(SettingsError) as caught:
        parse_request(IMAGE, request_parameters(text))
    assert caught.value.field == "parameters"


def test_events_on_the_wire():
    preview = np.full((4, 6, 3), 9, np.uint8)
    progress = to_wire(StepProgress(1, 2, 3, 4, elapsed_s=1.23456, computed=False, preview=preview))
    assert progress.event == dict(kind="progress", section=1, sections=2, step=3, steps=4, elapsed_s=1.2346,
                                  computed=False)
    assert progress.tensors[protocol.PREVIEW_OUTPUT] is not None and not progress.final
    assert to_wire(StepProgress(1, 2, 3, 4, elapsed_s=0.0)).tensors == {}

    frames = np.zeros((33, 8, 10, 3), np.uint8)
    section = to_wire(SectionFinished(1, 2, start_frame=40, frames=frames, total_frames=73, fps=30))
    assert section.event == dict(kind="section", section=1, sections=2, start_frame=40, frame_count=33,
                                 total_frames=73, fps=30)
    assert section.tensors[protocol.FRAMES_OUTPUT].shape == (33, 8, 10, 3)

    result = GenerationResult(np.zeros((73, 8, 10, 3), np.uint8), 30, 10, 8, 5, {"steps": 4},
                              {"total_s": np.float32(2.5), "computed_steps": np.int64(8)})
    final = to_wire(result)
    assert final.final and final.tensors == {}
    assert json.loads(final.event_bytes().tobytes()) == dict(
        kind="final", frame_count=73, fps=30, width=10, height=8, seed=5, settings={"steps": 4},
        timings={"total_s": 2.5, "computed_steps": 8}, parameters={}, model={}, versions={},
    )


def test_engine_output_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError):
        to_wire(SectionFinished(1, 1, 0, np.zeros((3, 8, 10, 3), np.float32), 3, fps=30))


# ------------------------------------------------------------------ jobs


class RecordingSink:
    def __init__(self, cancel_after: int | None = None):
        self.sent = []
        self.failures = []
        self.closed = False
        self.cancel_after = cancel_after

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def send(self, response):
        self.sent.append(response)

    def fail(self, status, text):
        self.failures.append((status, text))

    def close(self):
        self.closed = True


class RecordingLog:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(("info", message))

    def error(self, message):
        self.lines.append(("error", message))


class ScriptedPipeline:
    """Yields `sections` × `steps` progress events, polling cancel before each like the engine."""

    def __init__(self, steps=3, sections=2, error: Exception | None = None, gate: threading.Event | None = None):
        self.steps, self.sections, self.error, self.gate = steps, sections, error, gate
        self.started = threading.Event()

    def generate(self, request, cancel=None):
        self.started.set()
        if self.error is not None:
            raise self.error
        for section in range(1, self.sections + 1):
            for step in range(1, self.steps + 1):
                if self.gate is not None:
                    self.gate.wait(5)
                if cancel():
                    raise GenerationCancelled()
                yield StepProgress(section, self.sections, step, self.steps, 0.0)
            yield SectionFinished(section, self.sections, 0, np.zeros((1, 2, 2, 3), np.uint8), 1, fps=30)
        yield GenerationResult(np.zeros((1, 2, 2, 3), np.uint8), 30, 2, 2, 0, {}, {})


def job(sink) -> Job:
    return Job("7", GenerationRequest.parse(np.zeros((16, 16, 3), np.uint8), "p"), sink)


def test_a_job_streams_every_event_and_ends_with_the_final_one():
    sink = RecordingSink()
    assert run_job(ScriptedPipeline(), job(sink), RecordingLog()) is Outcome.DONE
    kinds = [r.event["kind"] for r in sink.sent]
    assert kinds == ["progress"] * 3 + ["section"] + ["progress"] * 3 + ["section", "final"]
    assert [r.final for r in sink.sent] == [False] * 8 + [True]
    assert sink.failures == [] and not sink.closed


def test_a_cancelled_job_stops_at_the_next_step_and_closes_the_request():
    sink = RecordingSink(cancel_after=2)
    log = RecordingLog()
    assert run_job(ScriptedPipeline(), job(sink), log) is Outcome.CANCELLED
    assert len(sink.sent) == 2 and sink.closed and sink.failures == []
    assert log.lines == [("info", log.lines[0][1])] and "cancelled by the client after 2 steps" in log.lines[0][1]


def test_engine_errors_become_error_responses():
    sink = RecordingSink()
    bad = SettingsError("seconds", 999, "float in [0.5, 120.0]")
    assert run_job(ScriptedPipeline(error=bad), job(sink), RecordingLog()) is Outcome.INVALID
    assert sink.failures == [(Status.INVALID_ARGUMENT, str(bad))]

    sink, log = RecordingSink(), RecordingLog()
    assert run_job(ScriptedPipeline(error=RuntimeError("out of memory")), job(sink), log) is Outcome.FAILED
    assert sink.failures == [(Status.INTERNAL, "generation failed: RuntimeError: out of memory")]
    assert log.lines[0][0] == "error" and "Traceback" in log.lines[0][1]


def test_a_full_queue_refuses_and_closing_stops_the_running_job():
    gate = threading.Event()
    pipeline = ScriptedPipeline(gate=gate)
    jobs = JobQueue(pipeline, RecordingLog(), capacity=1)
    running, waiting, refused = RecordingSink(), RecordingSink(), RecordingSink()
    assert jobs.submit(job(running))
    assert pipeline.started.wait(5)
    assert jobs.submit(job(waiting))
    assert not jobs.submit(job(refused))  # the model says UNAVAILABLE
    threading.Timer(0.2, gate.set).start()  # the running job reaches its next step after close()
    jobs.close()  # returns once the worker has ended
    assert running.sent == []  # stopped before its first step
    assert running.failures == [(Status.UNAVAILABLE, "the server is shutting down; retry later")]
    assert waiting.failures == [(Status.UNAVAILABLE, "the model is shutting down")]
    assert not jobs.submit(job(RecordingSink()))


def test_the_shutdown_signal_stops_the_running_job_and_refuses_new_ones(tmp_path):
    shutdown_file = tmp_path / "shutdown"
    gate = threading.Event()
    pipeline = ScriptedPipeline(gate=gate)
    jobs = JobQueue(pipeline, RecordingLog(), capacity=2, shutdown_requested=shutdown_file.exists)
    running = RecordingSink()
    assert jobs.submit(job(running))
    assert pipeline.started.wait(5)
    shutdown_file.touch()
    gate.set()
    assert not jobs.submit(job(RecordingSink()))
    jobs.close()
    assert running.failures == [(Status.UNAVAILABLE, "the server is shutting down; retry later")]
    assert len(running.sent) < 6  # not run to its end


def test_a_waiting_job_hears_its_position_and_wait_until_it_starts():
    gate = threading.Event()
    pipeline = ScriptedPipeline(gate=gate, steps=1, sections=1)
    jobs = JobQueue(pipeline, RecordingLog(), capacity=3, queued_interval_s=0.05)
    first, second, third = RecordingSink(), RecordingSink(), RecordingSink()
    assert jobs.submit(job(first))
    assert pipeline.started.wait(5)
    assert jobs.submit(job(second)) and jobs.submit(job(third))
    # at once: one job runs before the second, two before the third
    assert [r.event for r in second.sent] == [{"kind": "queued", "position": 1, "waited_s": 0.0}]
    assert [r.event for r in third.sent] == [{"kind": "queued", "position": 2, "waited_s": 0.0}]
    threading.Event().wait(0.3)
    gate.set()
    for sink in (second, third):
        for _ in range(100):
            if sink.sent and sink.sent[-1].final:
                break
            threading.Event().wait(0.05)
    jobs.close()
    assert first.sent[0].event["kind"] == "progress"  # it never waited
    for sink, position in ((second, 1), (third, 2)):
        kinds = [r.event["kind"] for r in sink.sent]
        queued = [r.event for r in sink.sent if r.event["kind"] == "queued"]
        assert len(queued) >= 3 and kinds[: len(queued)] == ["queued"] * len(queued)  # all before the job's own
        assert kinds[len(queued):] == ["progress", "section", "final"]
        waited = [e["waited_s"] for e in queued]
        assert waited == sorted(waited) and waited[-1] >= 0.2
        assert {e["position"] for e in queued} <= {position, position - 1} - {0}


def test_the_busy_refusal_estimates_the_wait_from_measured_jobs():
    gate = threading.Event()
    pipeline = ScriptedPipeline(gate=gate, steps=1, sections=1)
    jobs = JobQueue(pipeline, RecordingLog(), capacity=1)
    assert jobs.refusal().endswith("retry later")  # nothing measured yet
    threading.Timer(1.5, gate.set).start()
    measured = RecordingSink()
    assert jobs.submit(job(measured))
    for _ in range(100):
        if measured.sent and measured.sent[-1].final:
            break
        threading.Event().wait(0.05)
    gate.clear()
    pipeline.started.clear()
    assert jobs.submit(job(RecordingSink()))  # runs, blocked at the gate
    assert pipeline.started.wait(5)
    assert jobs.submit(job(RecordingSink()))  # waits
    assert not jobs.submit(job(RecordingSink()))  # refused
    text = jobs.refusal()
    assert text.startswith("the server is busy (1 jobs already wait for this model instance); retry in about ")
    seconds = int(text.split("retry in about ")[1].split(" s")[0])
    assert 1 <= seconds <= 2  # the last job ran about 1.5 s; the running one started just now
    assert text.endswith("(an estimate from how long the last job ran)")
    gate.set()
    jobs.close()


def test_every_invalid_argument_refusal_is_counted_as_an_invalid_job():
    seen = []
    jobs = JobQueue(ScriptedPipeline(error=SettingsError("steps", 0, "int in [1, 100]")), RecordingLog(), capacity=2,
                    observe=lambda outcome, seconds: seen.append(outcome))
    refused_on_arrival = RecordingSink()
    try:
        parse_request(IMAGE, {"prompt": "p", "steps": 0})
    except SettingsError as e:
        jobs.refuse_invalid(refused_on_arrival, e)  # what the model does when a request fails its checks
    refused_in_job = RecordingSink()
    assert jobs.submit(job(refused_in_job))
    for _ in range(100):
        if len(seen) == 2:
            break
        threading.Event().wait(0.05)
    jobs.close()
    assert refused_on_arrival.failures == [
        (Status.INVALID_ARGUMENT, "steps=0 is not allowed: expected int in [1, 100]")]
    assert refused_in_job.failures[0][0] is Status.INVALID_ARGUMENT
    assert seen == [Outcome.INVALID, Outcome.INVALID]


def test_a_client_gone_before_the_final_response_is_a_cancel_not_done():
    sink = RecordingSink(cancel_after=8)  # everything sent but the final response
    log = RecordingLog()
    assert run_job(ScriptedPipeline(steps=3, sections=2), job(sink), log) is Outcome.CANCELLED
    assert [r.event["kind"] for r in sink.sent][-1] == "section" and sink.closed


class WeightsChangedPipeline(ScriptedPipeline):
    """Fails its first job the way a pipeline whose LoRA undo missed does, and is out of service after."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.out_of_service: str | None = None

    def generate(self, request, cancel=None):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.out_of_service = "the base weights changed"
        raise RuntimeError("a LoRA merged into the weights was not undone exactly")
        yield


def wait_until(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        threading.Event().wait(0.02)
    raise AssertionError("timed out")


def test_a_group_out_of_service_takes_no_more_jobs_and_the_others_run_them():
    gate = threading.Event()
    broken, healthy = WeightsChangedPipeline(), ScriptedPipeline(gate=gate, steps=1, sections=1)
    called, log = [], RecordingLog()
    jobs = JobQueue([broken, healthy], log, capacity=4, on_out_of_service=called.append)
    sinks = [RecordingSink(), RecordingSink()]
    assert all(jobs.submit(job(sink)) for sink in sinks)  # one reaches the broken group, one waits at the gate
    wait_until(lambda: jobs.load().groups == 1)  # after the failed job's response
    assert any(sink.failures for sink in sinks)
    gate.set()
    later = [RecordingSink() for _ in range(3)]
    for sink in later:
        assert jobs.submit(job(sink))
    wait_until(lambda: all(s.sent and s.sent[-1].final for s in [*later, *(s for s in sinks if not s.failures)]))
    jobs.close()
    failed = [sink for sink in sinks if sink.failures]
    assert len(failed) == 1 and failed[0].failures[0][0] is Status.INTERNAL
    assert all(not sink.failures for sink in later) and called == []
    assert ("error", "GPU group 0 is out of service: the base weights changed; 1 other group(s) run the jobs") \
        in log.lines


def test_with_every_group_out_of_service_jobs_are_refused_and_the_instance_asks_for_a_restart():
    gate = threading.Event()
    called = []
    jobs = JobQueue(WeightsChangedPipeline(gate=gate), RecordingLog(), capacity=2, on_out_of_service=called.append)
    running, waiting = RecordingSink(), RecordingSink()
    assert jobs.submit(job(running)) and jobs.submit(job(waiting))
    gate.set()
    wait_until(lambda: called)
    assert called == ["the base weights changed"]
    assert running.failures == [(Status.INTERNAL, "generation failed: RuntimeError: a LoRA merged into the weights "
                                                  "was not undone exactly")]
    text = "this model instance can no longer run jobs (the base weights changed); retry later"
    assert waiting.failures == [(Status.UNAVAILABLE, text)]
    assert not jobs.submit(job(RecordingSink())) and jobs.refusal() == text
    assert jobs.load() == QueueLoad(waiting=0, busy=0, groups=0)
    jobs.close(timeout_s=1)


def test_a_stub_that_asks_for_a_restart_exits_after_the_grace_period():
    exits, lines = [], []
    timer = exit_for_restart("the base weights changed", lines.append, grace_s=0.05, exit=exits.append)
    timer.join(2)
    assert exits == [STUB_EXIT_CODE] and "the base weights changed" in lines[0]


# ------------------------------------------------------------------ instance configuration


def triton_args(kind="CPU", device_id="0", **parameters):
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {"model_config": json.dumps(config), "model_instance_kind": kind, "model_instance_device_id": device_id}


def test_instance_config_from_parameters_and_environment(tmp_path):
    config = InstanceConfig.from_triton(triton_args(model_dir=str(tmp_path), dtype="float16"), {})
    assert config == InstanceConfig(tmp_path, "auto", "float16", 4)  # the groups decide (groups.py)
    assert not config.shutdown_requested()
    assert InstanceConfig.from_triton(triton_args("GPU", "3", model_dir=str(tmp_path)), {}).device == "cuda:3"
    env = {"FRAMEPACK_MODEL_DIR": str(tmp_path), "FRAMEPACK_DEVICE": "cpu", "FRAMEPACK_MAX_QUEUED_JOBS": "2",
           "FRAMEPACK_SHUTDOWN_FILE": str(tmp_path / "shutdown")}
    config = InstanceConfig.from_triton(triton_args("GPU", "1", model_dir="/nowhere"), env)
    assert (config.model_dir, config.device, config.max_queued_jobs) == (tmp_path, "cpu", 2)
    assert not config.shutdown_requested()
    (tmp_path / "shutdown").touch()
    assert config.shutdown_requested()
    assert config.sampling == "inverted"
    f1 = InstanceConfig.from_triton(triton_args(model_dir=str(tmp_path)), {"FRAMEPACK_SAMPLING": "f1"})
    assert f1.sampling == "f1"
    assert config.fp8 is False
    assert InstanceConfig.from_triton(triton_args(model_dir=str(tmp_path), fp8="true"), {}).fp8 is True
    fp8_on = triton_args(model_dir=str(tmp_path), fp8="true")
    assert InstanceConfig.from_triton(fp8_on, {"FRAMEPACK_FP8": "false"}).fp8 is False
    assert config.sequence_parallel == 1
    two = InstanceConfig.from_triton(triton_args(model_dir=str(tmp_path), sequence_parallel="4"),
                                     InstanceOverrides(sequence_parallel=2).environment())
    assert two.sequence_parallel == 2


def test_what_the_launcher_overrides_is_what_the_instance_reads(tmp_path):
    overrides = InstanceOverrides(max_queued_jobs=3, max_job_seconds=90.5, sampling="f1", fp8=True,
                                  fault_injection=True)
    # The model config says otherwise for every one of them: the environment wins.
    args = triton_args(model_dir=str(tmp_path), max_queued_jobs="7", max_job_seconds="5", sampling="inverted",
                       fp8="false")
    config = InstanceConfig.from_triton(args, overrides.environment())
    assert (config.max_queued_jobs, config.max_job_seconds, config.sampling, config.fp8, config.fault_injection) == (
        3, 90.5, "f1", True, True)
    assert InstanceOverrides().environment() == {}
    assert InstanceOverrides(fp8=False).environment() == {ENV_OVERRIDES["fp8"]: "false"}


@pytest.mark.parametrize("key, value, named", [("device", "gpu0", "device"), ("dtype", "int8", "dtype"),
                                               ("max_queued_jobs", "0", "max_queued_jobs"),
                                               ("max_job_seconds", "-1", "max_job_seconds"),
                                               ("max_job_seconds", "nan", "max_job_seconds"),
                                               ("max_job_seconds", "soon", "max_job_seconds"),
                                               ("sampling", "sideways", "sampling"),
                                               ("fp8", "yes", "fp8"),
                                               ("groups", "0", "groups"), ("groups", "two", "groups"),
                                               ("sequence_parallel", "0", "sequence_parallel"),
                                               ("sequence_parallel", "two", "sequence_parallel"),
                                               ("model_dir", "/no/such/dir", "model_dir")])
def test_bad_instance_config_names_the_parameter(tmp_path, key, value, named):
    args = triton_args(**{"model_dir": str(tmp_path), key: value})
    with pytest.raises(InstanceConfigError, match=f"^{named}="):
        InstanceConfig.from_triton(args, {})


def test_model_config_matches_the_protocol():
    config = text_format.Parse((REPOSITORY / "framepack" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == protocol.MODEL_NAME and config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [
        (protocol.IMAGE_INPUT, [-1, -1, 3], True),  # optional: describe requests and text-to-video
        (protocol.VIDEO_INPUT, [-1, -1, -1, 3], True),
        (protocol.END_IMAGE_INPUT, [-1, -1, 3], True),
        (protocol.KEYFRAMES_INPUT, [-1, -1, -1, 3], True),
    ]
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {protocol.EVENT_OUTPUT: [-1], protocol.FRAMES_OUTPUT: [-1, -1, -1, 3],
                       protocol.PREVIEW_OUTPUT: [-1, -1, 3]}
    uint8 = model_config_pb2.DataType.Value("TYPE_UINT8")
    assert all(t.data_type == uint8 for t in [*config.input, *config.output])  # no BYTES tensors
    # One instance owns the one job queue; it places the GPU groups itself.
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert set(config.parameters) == set(ENV_OVERRIDES)  # every parameter can be overridden by the launcher


# ------------------------------------------------------------------ launcher


def test_the_backend_folder_links_the_stub_for_this_python(tmp_path):
    install = embedded_install(tmp_path)
    python = install.backend_directory / "python"
    names = sorted(p.name for p in python.iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert all((python / n).is_symlink() and (python / n).resolve().is_file() for n in names)
    assert install.binary.is_file()
    assert embedded_install(tmp_path) == install  # idempotent


def test_the_stub_gets_our_packages_and_site_packages():
    folders = stub_python_path()
    assert str(REPOSITORY.parent) in folders
    import numpy

    assert any(numpy.__file__.startswith(folder + "/") for folder in folders)


def test_a_busy_port_is_named(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        grpc, metrics = free_ports(2)
        server = TritonServer(tmp_path, grpc_port=grpc, http_port=port, metrics_port=metrics, log_path=tmp_path / "l")
        with pytest.raises(ServerStartError, match=f"http port 127.0.0.1:{port} is not free"):
            server.start()


def test_a_device_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(ValueError, match="device='gpu'"):
        TritonServer(tmp_path, device="gpu")


@pytest.mark.server
def test_a_server_that_cannot_load_the_model_fails_with_its_log(tmp_path):
    empty_model_dir = tmp_path / "empty"
    empty_model_dir.mkdir()
    grpc, http, metrics = free_ports(3)
    server = TritonServer(empty_model_dir, grpc_port=grpc, http_port=http, metrics_port=metrics,
                          device="cpu", log_path=tmp_path / "server.log", startup_timeout_s=120)
    with pytest.raises(ServerStartError) as caught:
        with server:
            pass
    assert "tritonserver exited with code 1 while starting" in str(caught.value)
    assert "failed to load" in str(caught.value)
