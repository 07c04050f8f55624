"""The whole serving path on the CPU: real tritonserver, our model repository, the tiny
model, the real client (CLI as a subprocess, or its streaming API)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import FAST_SETTINGS

from client import stream
from client.images import load_image
from framepack_backend.buckets import bucket_for
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_server.instance import InstanceOverrides
from framepack_server.server import TritonServer, free_ports
from framepack_wire import WireRequest

pytestmark = pytest.mark.server

CANCELLED_LINE = "cancelled by the client"


def run_cli(server, output: Path, *extra: str, seconds: str = "2.4", **popen) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "client.cli", "generate",
        "--image", str(SAMPLE), "--prompt", "a person waves", "--output", str(output),
        "--server", server.grpc_address, "--seconds", seconds,
        "--resolution", str(FAST_SETTINGS["resolution"]), "--steps", str(FAST_SETTINGS["steps"]), *extra,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def read_mp4(path: Path) -> tuple[np.ndarray, av.video.stream.VideoStream]:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video)])
        return frames, video


def test_cli_writes_the_planned_mp4(triton_server, tmp_path):
    output = tmp_path / "out" / "wave.mp4"
    cli = run_cli(triton_server, output, "--crf", "20", "--save-sections", str(tmp_path / "sections"),
                  "--save-previews", str(tmp_path / "previews"))
    stdout, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, stderr
    assert stdout.strip() == str(output)

    frames, video = read_mp4(output)
    sections = 2  # round(2.4 s · 30 / 36)
    assert len(frames) == 36 * sections + 1
    assert video.average_rate == 30
    assert video.codec_context.name == "h264" and video.format.name == "yuv420p"
    height, width = bucket_for(*load_image(SAMPLE).pixels.shape[:2], FAST_SETTINGS["resolution"])
    assert (video.height, video.width) == (height, width)
    # Random weights make noise, but it must move: frames differ from each other.
    assert frames.std() > 5
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1
    assert sorted(p.name for p in (tmp_path / "sections").iterdir()) == ["section_01.mp4", "section_02.mp4"]
    assert len(list((tmp_path / "previews").glob("*.png"))) == sections * FAST_SETTINGS["steps"]
    assert sorted(p.name for p in output.parent.iterdir()) == ["wave.json", "wave.mp4"]  # no temporary left behind


def test_responses_stream_before_the_final_one_and_other_requests_are_answered(triton_server):
    image = load_image(SAMPLE).pixels
    arrivals: list[tuple[float, stream.Event]] = []
    refusal: dict[str, object] = {}

    def send_bad_request() -> None:
        sent = time.monotonic()
        try:
            list(stream.generate(triton_server.grpc_address, WireRequest(image, "x", {"steps": "many"})))
        except stream.ServerError as e:
            refusal.update(error=e, sent=sent, answered=time.monotonic())

    settings = {**FAST_SETTINGS, "seconds": 2.4}
    invalid_before = job_counts(triton_server).get("invalid", 0)
    bad_request = threading.Thread(target=send_bad_request)
    for event in stream.generate(triton_server.grpc_address, WireRequest(image, "a person waves", settings)):
        arrivals.append((time.monotonic(), event))
        if len(arrivals) == 1:
            bad_request.start()  # while the job runs
    bad_request.join(30)

    final_at, final = arrivals[-1]
    assert isinstance(final, stream.Final) and final.frame_count == 73
    kinds = [type(e) for _, e in arrivals]
    steps = FAST_SETTINGS["steps"]
    Plan, Phase, Progress, Section, Final = stream.Plan, stream.Phase, stream.Progress, stream.Section, stream.Final
    assert kinds == [Plan, Phase, Phase] + ([Phase] + [Progress] * steps + [Phase, Section]) * 2 + [Final]
    assert arrivals[0][1] == stream.Plan(2, 9, 19, 73, 30, final.width, final.height)
    phases = [(e.phase, e.section) for _, e in arrivals if isinstance(e, stream.Phase)]
    assert phases == [("text", 0), ("image", 0), ("sampling", 1), ("decode", 1), ("sampling", 2), ("decode", 2)]
    first_section_at = next(t for t, e in arrivals if isinstance(e, stream.Section))
    first_progress_at = next(t for t, e in arrivals if isinstance(e, stream.Progress))
    # The first section's frames and the first steps arrived well before the end.
    assert final_at - first_section_at > 0.5
    assert first_section_at - first_progress_at > 0.1
    # A bad request sent while the job ran was refused at once, not after the job.
    assert refusal["error"].status == "INVALID_ARGUMENT"
    assert refusal["answered"] < final_at
    assert refusal["answered"] - refusal["sent"] < 2.0
    # A refusal on arrival counts as an invalid job, as one refused inside a job does.
    deadline = time.monotonic() + 10
    while job_counts(triton_server).get("invalid", 0) < invalid_before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_counts(triton_server).get("invalid", 0) == invalid_before + 1


@pytest.mark.parametrize(
    "settings, field, allowed",
    [
        ({"steps": "many"}, "steps", "int in [1, 100]"),
        ({"window": 0}, "window", "int in [1, 33]"),
        ({"stepz": 3}, "stepz", "one of the settings"),
        ({"preset": "Disco"}, "preset", "one of"),
    ],
)
def test_bad_settings_are_invalid_arguments_naming_the_field(triton_server, settings, field, allowed):
    with pytest.raises(stream.ServerError) as caught:
        list(stream.generate(triton_server.grpc_address, WireRequest(load_image(SAMPLE).pixels, "x", settings)))
    assert caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message.startswith(f"{field}=")
    assert allowed in caught.value.message


def test_cli_reports_a_server_error_in_one_line_and_writes_no_mp4(triton_server, tmp_path):
    output = tmp_path / "bad.mp4"
    cli = run_cli(triton_server, output, "--window", "0")
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 1
    assert stderr.strip().splitlines() == [
        "framepack: error: INVALID_ARGUMENT: window=0 is not allowed: expected int in [1, 33]"
    ]
    assert list(tmp_path.iterdir()) == []


def job_counts(server: TritonServer) -> dict[str, float]:
    """framepack_jobs_total by outcome, summed over instances, from Triton's metrics endpoint."""
    counts: dict[str, float] = {}
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("framepack_jobs_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_ctrl_c_cancels_the_job_writes_no_mp4_and_the_next_request_succeeds(triton_server, tmp_path):
    cancellations_before = triton_server.log_text().count(CANCELLED_LINE)
    jobs_before = job_counts(triton_server)
    output = tmp_path / "cancelled.mp4"
    cli = run_cli(triton_server, output, seconds="5")  # 4 sections: far from done when interrupted
    progress = threading.Event()
    stderr_text: list[str] = []

    def watch_stderr() -> None:
        for chunk in iter(lambda: cli.stderr.read(1), ""):
            stderr_text.append(chunk)
            if "section 1/" in "".join(stderr_text[-64:]):
                progress.set()

    threading.Thread(target=watch_stderr, daemon=True).start()
    assert progress.wait(120), "no progress from the client"
    cli.send_signal(signal.SIGINT)
    assert cli.wait(60) == 130
    assert "cancelled; no video written" in "".join(stderr_text)
    assert list(tmp_path.iterdir()) == []

    deadline = time.monotonic() + 60
    while triton_server.log_text().count(CANCELLED_LINE) == cancellations_before:
        assert time.monotonic() < deadline, "the server did not report the cancellation"
        time.sleep(0.2)
    line = [ln for ln in triton_server.log_text().splitlines() if CANCELLED_LINE in ln][-1]
    steps_done = int(line.split("after ")[1].split(" steps")[0])
    assert steps_done < 4 * FAST_SETTINGS["steps"]  # stopped early, not run to the end

    next_job = {**FAST_SETTINGS, "seconds": 1}
    events = list(stream.generate(triton_server.grpc_address, WireRequest(load_image(SAMPLE).pixels, "next", next_job)))
    assert isinstance(events[-1], stream.Final) and events[-1].frame_count == 37

    # The server's metrics count the cancelled job and the one after it.
    deadline = time.monotonic() + 30
    while True:
        jobs_after = job_counts(triton_server)
        if jobs_after.get("done", 0) >= jobs_before.get("done", 0) + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert jobs_after["cancelled"] == jobs_before.get("cancelled", 0) + 1
    assert jobs_after["done"] >= jobs_before.get("done", 0) + 1


def test_stopping_the_server_stops_a_running_job_promptly(tiny_bundle, tmp_path):
    grpc, http, metrics = free_ports(3)
    server = TritonServer(tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
                          log_path=tmp_path / "server.log", startup_timeout_s=300)
    outcome: dict[str, Exception] = {}

    def keep_reading(events) -> None:  # as a client does, until the stream ends
        try:
            list(events)
        except stream.ServerError as e:
            outcome["error"] = e

    with server:
        events = stream.generate(server.grpc_address,
                                 WireRequest(load_image(SAMPLE).pixels, "x", {**FAST_SETTINGS, "seconds": 10}))
        assert isinstance(next(events), stream.Plan)
        reader = threading.Thread(target=keep_reading, args=(events,))
        reader.start()
        process_group = server.pid
        started = time.monotonic()
        server.stop()
        stop_s = time.monotonic() - started
        reader.join(10)
    assert outcome["error"].status == "UNAVAILABLE" and "shutting down" in outcome["error"].message
    # A 10-second video takes far longer; on its own, Triton would wait for the job to end.
    assert stop_s < 10
    assert "stopped after" in server.log_text()
    with pytest.raises(ProcessLookupError):  # no backend stub left behind
        os.killpg(process_group, 0)


def test_a_server_started_for_f1_serves_forward_sampling(tiny_bundle, tmp_path):
    grpc, http, metrics = free_ports(3)
    server = TritonServer(tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
                          log_path=tmp_path / "tritonserver.log", startup_timeout_s=300,
                          overrides=InstanceOverrides(sampling="f1"))
    with server:
        events = list(stream.generate(server.grpc_address,
                                      WireRequest(load_image(SAMPLE).pixels, "f1", {**FAST_SETTINGS, "seconds": 2})))
        refused = None
        try:
            inverted = {**FAST_SETTINGS, "sampling": "inverted"}
            list(stream.generate(server.grpc_address, WireRequest(load_image(SAMPLE).pixels, "x", inverted)))
        except stream.ServerError as e:
            refused = str(e)
    final = events[-1]
    assert isinstance(final, stream.Final) and final.frame_count == 73 and final.settings["sampling"] == "f1"
    starts = [e.start_frame for e in events if isinstance(e, stream.Section)]
    assert starts[0] == 0 and starts == sorted(starts)  # F1 appends sections at the end
    assert refused is not None and "INVALID_ARGUMENT" in refused and "sampling=" in refused


def test_a_cancel_during_the_decode_stops_the_job_and_counts_it_cancelled(triton_server):
    """The client cancels a moment after the decode began: the server stops at the decoder's
    next chunk (sooner than the whole decode takes), counts the job cancelled, not done, and
    serves the next job."""
    cancellations_before = triton_server.log_text().count(CANCELLED_LINE)
    jobs_before = job_counts(triton_server)
    request = WireRequest(load_image(SAMPLE).pixels, "x", {**FAST_SETTINGS, "seconds": 1, "steps": 1})
    cancel = threading.Event()
    events = []
    for event in stream.generate(triton_server.grpc_address, request, cancel=cancel.is_set):
        events.append(event)
        if isinstance(event, stream.Phase) and event.phase == "decode":
            decode_began = time.monotonic()
            threading.Timer(0.3, cancel.set).start()
    assert cancel.is_set() and not any(isinstance(e, (stream.Section, stream.Final)) for e in events)

    deadline = time.monotonic() + 60
    while triton_server.log_text().count(CANCELLED_LINE) == cancellations_before:
        assert time.monotonic() < deadline, "the server did not report the cancellation"
        time.sleep(0.05)
    stopped_after = time.monotonic() - decode_began
    line = [ln for ln in triton_server.log_text().splitlines() if CANCELLED_LINE in ln][-1]
    assert "after 1 steps" in line  # sampling was over: it stopped in the decode

    # The same job run to its end: its whole decode takes longer than the cancelled one ran.
    final = list(stream.generate(triton_server.grpc_address, request))[-1]
    assert isinstance(final, stream.Final) and final.frame_count == 37
    assert stopped_after < final.timings["decode_s"], (stopped_after, final.timings["decode_s"])
    deadline = time.monotonic() + 30
    while job_counts(triton_server).get("done", 0) < jobs_before.get("done", 0) + 1:
        assert time.monotonic() < deadline, "the finished job was not counted"
        time.sleep(0.2)
    jobs_after = job_counts(triton_server)
    assert jobs_after["cancelled"] == jobs_before.get("cancelled", 0) + 1
    assert jobs_after["done"] == jobs_before.get("done", 0) + 1
