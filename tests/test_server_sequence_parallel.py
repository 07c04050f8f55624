"""Sequence parallelism through the real server on the CPU: `--sequence-parallel 2` (gloo)
makes the video a single process makes, and a killed worker fails only its job."""

from __future__ import annotations

import os
import re
import signal

import numpy as np
import pytest
from conftest import FAST_SETTINGS

from client import stream
from client.images import load_image
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_server.instance import InstanceOverrides
from framepack_server.server import ServerStartError, TritonServer, free_ports
from framepack_wire import WireRequest

pytestmark = pytest.mark.server

SETTINGS = {**FAST_SETTINGS, "seconds": 2}


def start_server(tiny_bundle, tmp_path, **overrides) -> TritonServer:
    grpc, http, metrics = free_ports(3)
    return TritonServer(tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
                        log_path=tmp_path / "tritonserver.log", startup_timeout_s=300,
                        overrides=InstanceOverrides(**overrides))


def video(events) -> np.ndarray:
    """The video as a streaming client assembles it from its sections."""
    sections = [e for e in events if isinstance(e, stream.Section)]
    frames = np.zeros((sections[0].total_frames, *sections[0].frames.shape[1:]), np.uint8)
    for section in sections:
        frames[section.start_frame : section.start_frame + len(section.frames)] = section.frames
    return frames


def single_process_video(tiny_bundle, sampling: str, settings: dict) -> np.ndarray:
    pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu", sampling=sampling)
    request = GenerationRequest.parse(load_image(SAMPLE).pixels, "a person waves", **settings)
    return list(pipeline.generate(request))[-1].frames


WITH_TEACACHE = {**SETTINGS, "teacache": True, "teacache_threshold": 0.5}
WITHOUT_TEACACHE = {**SETTINGS, "teacache": False}


def assert_same_video(server, sampling: str, settings: dict, expected: np.ndarray) -> stream.Final:
    events = list(stream.generate(server.grpc_address, WireRequest(load_image(SAMPLE).pixels, "a person waves",
                                                                   settings)))
    final = events[-1]
    assert isinstance(final, stream.Final) and final.settings["sequence_parallel"] == 2
    assert final.settings["sampling"] == sampling
    got = video(events)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    return final


def test_two_ranks_serve_the_single_process_inverted_video_and_survive_a_killed_worker(tiny_bundle, tmp_path):
    expected = {name: single_process_video(tiny_bundle, "inverted", settings)
                for name, settings in (("plain", WITHOUT_TEACACHE), ("teacache", WITH_TEACACHE))}
    with start_server(tiny_bundle, tmp_path, sequence_parallel=2) as server:
        pid = int(re.search(r"sequence-parallel worker pids \(ranks 1 to 1\): (\d+)", server.log_text()).group(1))
        assert_same_video(server, "inverted", WITHOUT_TEACACHE, expected["plain"])
        final = assert_same_video(server, "inverted", WITH_TEACACHE, expected["teacache"])
        assert final.timings["skipped_steps"] > 0  # rank 0 skipped; the worker was not asked

        failure = None
        try:
            request = WireRequest(load_image(SAMPLE).pixels, "x", WITHOUT_TEACACHE)
            for event in stream.generate(server.grpc_address, request):
                if isinstance(event, stream.Progress) and event.step == 1:
                    os.kill(pid, signal.SIGKILL)
        except stream.ServerError as e:
            failure = e
        assert failure is not None and failure.status == "INTERNAL"
        assert f"sequence-parallel worker rank 1 (pid {pid}) exited with code -9" in failure.message
        assert "\n" not in failure.message

        assert_same_video(server, "inverted", WITHOUT_TEACACHE, expected["plain"])  # the group came back


def test_two_ranks_serve_the_single_process_f1_video_with_teacache(tiny_bundle, tmp_path):
    expected = single_process_video(tiny_bundle, "f1", WITH_TEACACHE)
    with start_server(tiny_bundle, tmp_path, sampling="f1", sequence_parallel=2) as server:
        final = assert_same_video(server, "f1", WITH_TEACACHE, expected)
    assert final.timings["skipped_steps"] > 0


def test_a_degree_that_does_not_divide_the_heads_stops_the_start_with_the_reason(tiny_bundle, tmp_path):
    server = start_server(tiny_bundle, tmp_path, sequence_parallel=3)
    with pytest.raises(ServerStartError) as failure:
        with server:
            pass
    message = str(failure.value)
    assert "the framepack model failed to load" in message
    assert "sequence_parallel=3 is not allowed: it must divide the transformer's 2 attention heads (1, 2)" in message
