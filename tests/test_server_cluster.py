"""One queue over GPU groups and the API key, through the real tritonserver on the CPU:
two CPU groups stand in for two GPUs (`framepack-server --groups 2`)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import FAST_SETTINGS

from client import stream
from client.connection import Endpoint
from framepack_server.instance import InstanceOverrides
from framepack_server.server import TritonServer, free_ports
from framepack_wire import API_KEY_HEADER, WireRequest

pytestmark = pytest.mark.server

API_KEY = "0123456789abcdef0123456789abcdef"
JOB = {**FAST_SETTINGS, "seconds": 1.2}  # one section of 4 steps: 5-20 s on two shared cores


def metric(server: TritonServer, name: str) -> float:
    """One framepack gauge from the metrics port (one instance, so one sample)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    assert len(values) == 1, (name, values)
    return values[0]


@pytest.fixture(scope="module")
def two_group_server(tiny_bundle, tmp_path_factory):
    grpc, http, metrics = free_ports(3)
    server = TritonServer(
        tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
        log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log", startup_timeout_s=300,
        overrides=InstanceOverrides(groups=2, max_queued_jobs=2), api_key=API_KEY,
    )
    with server:
        yield server


class TimedJob(threading.Thread):
    """One job on its own gRPC stream; records when each event arrived."""

    def __init__(self, server: TritonServer, image: np.ndarray, seed: int, on_queued=None):
        super().__init__(daemon=True)
        self.endpoint = Endpoint(server.grpc_address, api_key=API_KEY)
        self.request = WireRequest(image, "a robot waves", {**JOB, "seed": seed})
        self.on_queued = on_queued
        self.events: list[tuple[float, object]] = []
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for event in stream.generate(self.endpoint, self.request):
                self.events.append((time.monotonic(), event))
                if isinstance(event, stream.Queued) and self.on_queued is not None:
                    self.on_queued(event)
        except Exception as e:  # reported by the test
            self.error = e

    def first(self, kind) -> float:
        return next(at for at, event in self.events if isinstance(event, kind))

    @property
    def started(self) -> float:
        return self.first(stream.Plan)  # the engine's first event: the job runs on a group

    @property
    def finished(self) -> float:
        return self.first(stream.Final)

    def sections(self) -> list[tuple[int, np.ndarray]]:
        return [(e.start_frame, e.frames) for _, e in self.events if isinstance(e, stream.Section)]


def run_alone(server, image, seed) -> TimedJob:
    job = TimedJob(server, image, seed)
    job.run()
    assert job.error is None, job.error
    return job


def test_two_groups_run_two_jobs_at_once_and_a_third_waits_for_a_free_one(two_group_server, image):
    server = two_group_server
    alone = {seed: run_alone(server, image, seed) for seed in (1, 2)}
    assert metric(server, "framepack_groups") == 2
    assert metric(server, "framepack_queue_waiting_jobs") == 0

    seen_while_waiting: list[tuple[float, float]] = []

    def read_load(_event) -> None:
        seen_while_waiting.append((metric(server, "framepack_queue_waiting_jobs"),
                                   metric(server, "framepack_busy_groups")))

    first, second = TimedJob(server, image, 1), TimedJob(server, image, 2)
    first.start()
    second.start()
    deadline = time.monotonic() + 120
    while not (first.events and second.events) and time.monotonic() < deadline:
        time.sleep(0.05)
    third = TimedJob(server, image, 3, on_queued=read_load)
    third.start()
    # Both groups busy and a job waiting: a describe request is still answered at once.
    asked = time.monotonic()
    description = stream.describe(Endpoint(server.grpc_address, api_key=API_KEY))
    describe_s = time.monotonic() - asked
    for job in (first, second, third):
        job.join(300)
        assert job.error is None, job.error

    # The first two ran at the same time, each on its own group: each started before the other ended.
    assert first.started < second.finished and second.started < first.finished
    # The third was told it waits (next in line), the metrics said one job waits with both groups busy,
    # and it started only once a group was free.
    queued = [e for _, e in third.events if isinstance(e, stream.Queued)]
    assert queued and queued[0].position == 1
    assert seen_while_waiting and seen_while_waiting[0] == (1.0, 2.0)
    assert third.started >= min(first.finished, second.finished)
    assert "steps" in description.settings and describe_s < 3.0 and asked < min(first.finished, second.finished)
    # Running beside another job changes no pixel: the same seed gives the same frames as alone.
    for job, seed in ((first, 1), (second, 2)):
        together, by_itself = job.sections(), alone[seed].sections()
        assert [start for start, _ in together] == [start for start, _ in by_itself]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(together, by_itself))
    assert not np.array_equal(first.sections()[-1][1], second.sections()[-1][1])  # different seeds differ
    assert metric(server, "framepack_queue_waiting_jobs") == 0
    assert metric(server, "framepack_busy_groups") == 0
    log = server.log_text()
    assert "for 2 GPU group(s): group 0 on cpu; group 1 on cpu" in log
    assert "running on GPU group 0" in log and "running on GPU group 1" in log


def test_a_request_without_the_api_key_is_refused_while_health_answers(two_group_server, image):
    server = two_group_server
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/framepack/ready"):
        with urllib.request.urlopen(server.http_url + path, timeout=10) as response:
            assert response.status == 200, path
    request = WireRequest(image, "a robot waves", {**FAST_SETTINGS, "seconds": 1})
    for key, carried in ((None, "none"), ("f" * 32, "a wrong one")):
        with pytest.raises(stream.ServerError) as refused:
            list(stream.generate(Endpoint(server.grpc_address, api_key=key), request))
        assert refused.value.status == "UNAUTHENTICATED"
        assert refused.value.message == (
            f"the server requires an API key and this request carried {carried}: pass --api-key-file FILE "
            "or set FRAMEPACK_API_KEY"
        )
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(server.http_url + "/v2/models/framepack", timeout=10)
    assert forbidden.value.code == 403
    metadata = urllib.request.Request(server.http_url + "/v2/models/framepack", headers={API_KEY_HEADER: API_KEY})
    with urllib.request.urlopen(metadata, timeout=10) as response:
        assert response.status == 200
    events = list(stream.generate(Endpoint(server.grpc_address, api_key=API_KEY), request))
    final = events[-1]
    assert isinstance(final, stream.Final) and final.frame_count == 37
    assert API_KEY not in server.log_text()  # the launcher logs the command with the key hidden
