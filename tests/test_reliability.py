"""Reliability and security on the real server (CPU, tiny model): a corpus of bad
requests, 8 concurrent clients, cancellations and memory, an injected fault, the time
limit, a killed backend stub, TLS, loopback binding. The figures for the issue note are
printed at the end of the module (`reliability:` lines).

`FRAMEPACK_TEST_DEVICE=cuda:0` runs the same suite with the server's instance on the GPU;
the jobs meant to be interrupted then use a larger bucket so they still last seconds."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from client import stream
from client.connection import Endpoint
from client.images import load_image
from client.video import FrameAssembler
from framepack_backend.buckets import bucket_for
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_server.instance import InstanceOverrides
from framepack_server.server import GrpcTls, TritonServer, free_ports
from framepack_wire import WireRequest

pytestmark = pytest.mark.server

DEVICE = os.environ.get("FRAMEPACK_TEST_DEVICE", "cpu")
# Jobs that a test stops mid-way (cancel, kill, time limit) must run for seconds.
LONG_RESOLUTION = 128 if DEVICE == "cpu" else 640
QUEUED_JOBS = 4
# The server's limit per job: well above the longest job a test lets finish (~7 s on two busy
# CPU cores; 12 s was seen under load, which a 12 s limit turned into a spurious failure).
JOB_LIMIT_S = 20.0
# One section of 37 frames at the smallest bucket: about 1.5 s on two CPU cores.
FAST = {"resolution": 128, "steps": 2, "seconds": 0.5}
GOOD_VIDEO_SHAPE = (37, *bucket_for(*load_image(SAMPLE).pixels.shape[:2], FAST["resolution"]), 3)
MEMORY_LINE = re.compile(
    r"request (?P<id>.+?): (?P<outcome>[a-z ]+); memory after the job: tensors (?P<bytes>\d+) bytes in "
    r"(?P<tensors>\d+) tensors, RSS (?P<rss>[\d.]+) MiB, CUDA allocated (?P<cuda_allocated>[\d.]+) MiB, "
    r"reserved (?P<cuda_reserved>[\d.]+) MiB"
)


@pytest.fixture(scope="module")
def figures(request):
    """Lines for the issue note, written to the terminal when the module ends."""
    lines: list[str] = []
    yield lines
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even when the tests pass
        print()
        for line in lines:
            print(f"reliability: {line}")


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    grpc_port, http_port, metrics_port = free_ports(3)
    with TritonServer(
        tiny_bundle, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, device=DEVICE,
        log_path=tmp_path_factory.mktemp("reliability") / "tritonserver.log", startup_timeout_s=300,
        overrides=InstanceOverrides(fault_injection=True, max_queued_jobs=QUEUED_JOBS, max_job_seconds=JOB_LIMIT_S),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return load_image(SAMPLE).pixels


def generate(server, image, settings, prompt="a person waves", **options) -> list[stream.Event]:
    return list(stream.generate(server.grpc_address, WireRequest(image, prompt, settings), **options))


def video(events: list[stream.Event]) -> np.ndarray:
    assembler = FrameAssembler()
    for event in events:
        if isinstance(event, stream.Section):
            assembler.add(event.start_frame, event.frames, event.total_frames)
    return assembler.video()


def memory_lines(server) -> list[re.Match]:
    return list(MEMORY_LINE.finditer(server.log_text()))


def wait_for_memory_line(server, request_id: str, timeout_s: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [m for m in memory_lines(server) if f"({request_id})" in m["id"]]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no memory line for request {request_id} in the server log")


def mib(match: re.Match) -> str:
    return (f"tensors {int(match['bytes']) / 2**20:.3f} MiB in {match['tensors']}, RSS {float(match['rss']):.1f} MiB, "
            f"CUDA allocated {match['cuda_allocated']} / reserved {match['cuda_reserved']} MiB")


# ------------------------------------------------------------------ 1. bad requests


def image_input(array: np.ndarray, datatype: str = "UINT8", name: str = "image") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass(frozen=True)
class BadRequest:
    name: str
    field: str  # the field the answer must name
    inputs: Callable[[np.ndarray], list[grpcclient.InferInput]]
    parameters: dict


def bad_setting(name: str, field: str, value: object) -> BadRequest:
    """A good request but for one setting (or the prompt)."""
    return BadRequest(name, field, lambda image: [image_input(image)], {"prompt": "p", **FAST, field: value})


def bad_input(name: str, field: str, inputs: Callable, **parameters) -> BadRequest:
    return BadRequest(name, field, inputs, {"prompt": "p", **parameters})


PNG_BYTES = SAMPLE.read_bytes()
CORPUS = [
    # inputs: missing, wrong dtype, rank, channels, size, name, encoded instead of pixels
    # (no image input is text-to-video; looping to a start image that is not there is not)
    bad_input("no image input, but a loop", "loop", lambda image: [], loop=True),
    bad_input("image as FP32", "image", lambda image: [image_input(image.astype(np.float32), "FP32")]),
    bad_input("image as INT32", "image", lambda image: [image_input(image.astype(np.int32), "INT32")]),
    bad_input("image of rank 2", "image", lambda image: [image_input(image[..., 0].copy())]),
    bad_input("image of rank 4", "image", lambda image: [image_input(image[None])]),
    bad_input("RGBA image", "image", lambda image: [image_input(np.zeros((64, 64, 4), np.uint8))]),
    bad_input("grey image with one channel", "image", lambda image: [image_input(np.zeros((64, 64, 1), np.uint8))]),
    bad_input("empty image", "image", lambda image: [image_input(np.zeros((0, 64, 3), np.uint8))]),
    bad_input("8×8 image", "image", lambda image: [image_input(np.zeros((8, 8, 3), np.uint8))]),
    bad_input("huge image 5000×5000", "image", lambda image: [image_input(np.zeros((5000, 5000, 3), np.uint8))]),
    bad_input("thin strip 16×4096", "image", lambda image: [image_input(np.zeros((16, 4096, 3), np.uint8))]),
    bad_input("PNG file bytes instead of pixels", "image",
              lambda image: [image_input(np.frombuffer(PNG_BYTES[: len(PNG_BYTES) // 3 * 3], np.uint8)
                                         .reshape(-1, 1, 3))]),
    bad_input("input under another name", "picture", lambda image: [image_input(image, name="picture")]),
    bad_input("an extra input", "mask", lambda image: [image_input(image), image_input(image, name="mask")]),
    # prompt
    BadRequest("no prompt", "prompt", lambda image: [image_input(image)], dict(FAST)),
    bad_setting("prompt as a number", "prompt", 42),
    bad_setting("prompt as a bool", "prompt", True),
    bad_setting("prompt over 4000 characters", "prompt", "wave " * 1000),
    bad_setting("prompt as a float", "prompt", 1.5),
    bad_setting("negative prompt as a number", "negative_prompt", 7),
    bad_setting("negative prompt over 4000 characters", "negative_prompt", "x" * 4001),
    # numbers: not numbers, NaN, infinite, negative, out of range, too big, wrong type
    bad_setting("steps as words", "steps", "many"),
    bad_setting("steps 0", "steps", 0),
    bad_setting("steps 101", "steps", 101),
    bad_setting("steps 2.5", "steps", 2.5),
    bad_setting("steps as a bool", "steps", True),
    bad_setting("seconds NaN", "seconds", float("nan")),
    bad_setting("seconds infinite", "seconds", float("inf")),
    bad_setting("seconds '1e400'", "seconds", "1e400"),
    bad_setting("seconds negative", "seconds", -1),
    bad_setting("seconds huge", "seconds", 1e300),
    bad_setting("gs NaN as text", "gs", "nan"),
    bad_setting("cfg below 1", "cfg", 0.5),
    bad_setting("rs above 1", "rs", 2),
    bad_setting("seed negative", "seed", -1),
    bad_setting("seed past int64", "seed", "9" * 30),
    bad_setting("seed of 5000 digits", "seed", "9" * 5000),
    bad_setting("window 0", "window", 0),
    bad_setting("resolution not a multiple of 16", "resolution", 130),
    bad_setting("resolution 4096", "resolution", 4096),
    bad_setting("teacache 'maybe'", "teacache", "maybe"),
    bad_setting("teacache_threshold infinite", "teacache_threshold", float("-inf")),
    bad_setting("crf 99", "crf", 99),
    bad_setting("gpu_memory_preservation negative", "gpu_memory_preservation", -1.0),
    # names: unknown preset, backend, modes, settings
    bad_setting("unknown preset", "preset", "Disco"),
    bad_setting("unknown flow preset", "flow_preset", "zigzag"),
    bad_setting("unknown attention backend", "attention", "magic"),
    bad_setting("unknown memory mode", "memory_mode", "swap"),
    bad_setting("unknown sampling", "sampling", "backwards"),
    bad_setting("unknown solver", "solver", "euler"),
    bad_setting("preview 'sometimes'", "preview", "sometimes"),
    bad_setting("unknown setting", "stepz", 3),
    bad_setting("describe not true", "describe", "yes"),
    bad_setting("malformed fault request", "fault", "explode"),
]


def names_the_field(message: str, field: str) -> bool:
    """Our messages start `field=value`; Triton's own name the input in quotes."""
    return message.startswith(f"{field}=") or f"'{field}'" in message


def non_utf8_prompt_request(server, image: np.ndarray) -> list:
    """A request whose prompt bytes are not UTF-8, sent below tritonclient (which cannot encode it)."""
    request = service_pb2.ModelInferRequest(model_name="framepack")
    placeholder = "\x01" * 8
    request.parameters["prompt"].string_param = placeholder
    tensor = request.inputs.add(name="image", datatype="UINT8")
    tensor.shape.extend(image.shape)
    request.raw_input_contents.append(image.tobytes())
    data = request.SerializeToString().replace(placeholder.encode(), b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8")
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=lambda raw: raw,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        return list(call(iter([data]), timeout=30))


def test_every_bad_request_is_refused_naming_the_field_and_the_server_keeps_serving(server, image, figures):
    assert len(CORPUS) >= 40
    jobs_before = len(memory_lines(server))
    good = 0
    refused: dict[str, int] = {}
    for number, bad in enumerate(CORPUS, 1):
        try:
            list(stream._responses(server.grpc_address, bad.inputs(image), bad.parameters))
        except stream.ServerError as e:
            error = e
        else:
            pytest.fail(f"{bad.name}: accepted")
        assert error.status == "INVALID_ARGUMENT", (bad.name, str(error))
        assert names_the_field(error.message, bad.field), (bad.name, str(error))
        refused[error.status] = refused.get(error.status, 0) + 1
        if number % 5 == 0:  # a good request after every 5th bad one (all 53 would add a minute)
            good += 1
            assert video(generate(server, image, FAST, request_id=f"good-{good}")).shape == GOOD_VIDEO_SHAPE
    # Invalid UTF-8 cannot be a protobuf string: gRPC drops the request before Triton
    # parses it, so the stream ends without an answer and nothing reaches the model.
    # (A NUL in a text parameter never arrives either: Triton cuts the text there.)
    assert non_utf8_prompt_request(server, image) == []
    good += 1
    assert video(generate(server, image, FAST, request_id=f"good-{good}")).shape == GOOD_VIDEO_SHAPE
    # Only the good requests became jobs: every refusal came before any model work.
    wait_for_memory_line(server, f"good-{good}")  # logged just after the final response
    assert len(memory_lines(server)) - jobs_before == good
    figures.append(
        f"bad requests: {len(CORPUS)} sent, {refused['INVALID_ARGUMENT']} refused INVALID_ARGUMENT naming the "
        f"field, 0 became jobs; non-UTF-8 prompt dropped by gRPC without an answer; {good} good requests "
        f"in between (after every 5th bad one and at the end) all succeeded"
    )


# ------------------------------------------------------------------ 2. load


def test_eight_clients_get_the_same_frames_as_alone_or_a_busy_refusal(server, image, figures):
    seeds = [11, 12, 13, 14]
    alone = {seed: video(generate(server, image, {**FAST, "seed": seed})) for seed in seeds}
    assert not np.array_equal(alone[11], alone[12])  # the seeds make different videos
    results: list[tuple[int, str, float, object]] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        think = random.Random(number)
        for request in range(5):
            seed = seeds[(number + request) % len(seeds)]
            time.sleep(think.uniform(0, 0.3))
            started = time.monotonic()
            try:
                outcome, detail = "done", video(generate(server, image, {**FAST, "seed": seed}))
            except stream.ServerError as e:
                outcome, detail = e.status, e.message
            except Exception as e:  # anything else is a failure the assertions below report
                outcome, detail = type(e).__name__, str(e)
            with lock:
                results.append((seed, outcome, time.monotonic() - started, detail))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    # Bounded: a request waits for at most the queue ahead of it, each job for at most its limit.
    bound_s = (QUEUED_JOBS + 1) * JOB_LIMIT_S + 30
    for thread in threads:
        thread.join(5 * bound_s)
    assert not any(thread.is_alive() for thread in threads), "a client waited forever"

    assert len(results) == 40  # nothing lost
    outcomes = [outcome for _, outcome, _, _ in results]
    assert set(outcomes) <= {"done", "UNAVAILABLE"}, [r for r in results if r[1] not in ("done", "UNAVAILABLE")]
    done = [(seed, frames) for seed, outcome, _, frames in results if outcome == "done"]
    assert len(done) >= 10
    assert all(np.array_equal(frames, alone[seed]) for seed, frames in done)  # bit-identical
    busy = [message for _, outcome, _, message in results if outcome == "UNAVAILABLE"]
    hint = r"server is busy .* retry in about \d+ s \(an estimate from how long the last (\d+ )?jobs? ran\)$"
    assert all(re.search(hint, message) for message in busy), busy[:3]
    longest = max(seconds for _, _, seconds, _ in results)
    assert longest < bound_s
    figures.append(
        f"load: 8 clients × 5 requests = {len(results)}: {len(done)} completed, bit-identical to the same request "
        f"alone; {len(busy)} refused UNAVAILABLE with a retry hint; 0 other failures; 0 lost; longest request "
        f"{longest:.1f} s (bound {bound_s:.0f} s)"
    )


# ------------------------------------------------------------------ 3. cancellation and memory


def test_ten_cancellations_stop_promptly_and_memory_returns_to_baseline(server, image, figures):
    steps = 12  # 3 sections: about 7 s on two CPU cores, inside the server's JOB_LIMIT_S
    settings = {**FAST, "seconds": 4, "steps": steps, "resolution": LONG_RESOLUTION}
    started = time.monotonic()
    final = generate(server, image, settings, request_id="warm-up")[-1]
    job_s = time.monotonic() - started
    baseline = wait_for_memory_line(server, "warm-up")
    # The engine checks for cancellation before every model evaluation (about 10 ms here);
    # decoding a section with the VAE is the longest stretch without a check.
    decode_s = final.timings["decode_s"] / 3
    rng = random.Random(2024)
    latencies = []
    for number in range(10):
        request_id = f"cancel-{number}"
        # Cancel at a random step (1 to 60 % of the job), counted from the stream: a point in
        # time could fall after the last step on a machine slower than during the warm-up.
        cancel_after_steps = rng.randint(1, int(0.6 * 3 * steps))
        events: list[stream.Event] = []
        started, cancelled_at = time.monotonic(), []

        def cancel() -> bool:
            if not cancelled_at and sum(isinstance(e, stream.Progress) for e in events) >= cancel_after_steps:
                cancelled_at.append(time.monotonic() - started)
            return bool(cancelled_at)

        for event in stream.generate(server.grpc_address, WireRequest(image, "a person waves", settings),
                                     request_id=request_id, cancel=cancel):
            events.append(event)
        assert cancelled_at and not any(isinstance(e, stream.Final) for e in events)
        line = wait_for_memory_line(server, request_id)
        assert line["outcome"] == "cancelled"
        stopped = re.search(rf"\({request_id}\): cancelled by the client after (\d+) steps \(([\d.]+) s\)",
                            server.log_text())
        assert cancel_after_steps <= int(stopped[1]) < 3 * steps  # not run to its end
        latencies.append(float(stopped[2]) - cancelled_at[0])  # the job stopped this long after the cancel
    after = memory_lines(server)[-1]
    assert after["bytes"] == baseline["bytes"] and after["tensors"] == baseline["tensors"]
    assert after["cuda_allocated"] == baseline["cuda_allocated"]
    assert float(after["cuda_reserved"]) <= float(baseline["cuda_reserved"])
    rss_growth = float(after["rss"]) - float(baseline["rss"])
    assert rss_growth < 64
    # At most one section's decode, plus the client's poll interval and the way back to the server.
    assert max(latencies) < 1.5 * decode_s + 0.5
    assert video(generate(server, image, FAST)).shape == GOOD_VIDEO_SHAPE
    figures.append(
        f"cancellation ({DEVICE}): 10 jobs of {job_s:.1f} s cancelled at random steps (up to 60 %), "
        f"each stopped at most "
        f"{max(latencies):.2f} s after the cancel (one section's VAE decode, not interruptible, takes "
        f"{decode_s:.2f} s); memory after the warm-up job: {mib(baseline)}; after the 10 "
        f"cancels: {mib(after)} (tensor storage identical, RSS {rss_growth:+.1f} MiB); the next job succeeded"
    )


def test_a_killed_client_stops_its_job(server, tmp_path, figures):
    cancelled_before = server.log_text().count("cancelled by the client")
    cli = run_cli(server, tmp_path / "gone.mp4", "--seconds", "5", "--steps", "12")
    assert watch_progress(cli).wait(60), "no progress from the client"
    cli.kill()  # no goodbye: the connection just closes
    cli.wait()
    killed_at = time.monotonic()
    while server.log_text().count("cancelled by the client") == cancelled_before:
        assert time.monotonic() - killed_at < 15, "the server kept running the job of a dead client"
        time.sleep(0.05)
    stopped_after = time.monotonic() - killed_at
    assert list(tmp_path.iterdir()) == []
    figures.append(f"a client killed mid-job (SIGKILL): its job stopped {stopped_after:.1f} s later")


# ------------------------------------------------------------------ 4. faults and the time limit


def test_a_fault_inside_the_engine_fails_only_that_job(server, image, figures):
    baseline = memory_lines(server)[-1]
    with pytest.raises(stream.ServerError) as caught:
        generate(server, image, {**FAST, "fault": "raise@2"}, request_id="fault")
    assert str(caught.value) == "INTERNAL: generation failed: InjectedFault: injected fault before model evaluation 2"
    line = wait_for_memory_line(server, "fault")
    assert line["outcome"] == "failed" and line["bytes"] == baseline["bytes"]
    assert "Traceback" in server.log_text()  # the server logged the error in full
    assert video(generate(server, image, FAST)).shape == GOOD_VIDEO_SHAPE
    figures.append("fault: an exception inside the engine failed that job (INTERNAL, traceback in the log, "
                   "tensor memory back to baseline); the next job succeeded")


def run_cli(server, output: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "client.cli", "generate", "--image", str(SAMPLE), "--prompt", "a wave",
               "--output", str(output), "--server", server.grpc_address, "--resolution", str(LONG_RESOLUTION), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def watch_progress(cli: subprocess.Popen, stderr: list[str] | None = None) -> threading.Event:
    """Set once the client's progress bar shows the job running; collects its stderr."""
    progress = threading.Event()
    stderr = [] if stderr is None else stderr

    def watch() -> None:
        for chunk in iter(lambda: cli.stderr.read(1), ""):
            stderr.append(chunk)
            if "section 1/" in "".join(stderr[-64:]):
                progress.set()

    threading.Thread(target=watch, daemon=True).start()
    return progress


def error_lines(stderr: str) -> list[str]:
    """The client's error lines (the progress bar redraws with carriage returns; the planned
    video and queue lines are information)."""
    return [part.strip() for part in re.split(r"[\r\n]", stderr) if part.strip().startswith("framepack: error")]


def test_a_job_past_the_time_limit_fails_cleanly_without_an_mp4(server, tmp_path, figures):
    output = tmp_path / "long.mp4"
    started = time.monotonic()
    cli = run_cli(server, output, "--seconds", "20", "--steps", "25", "--quiet")
    _, stderr = cli.communicate(timeout=120)
    took = time.monotonic() - started
    assert cli.returncode == 1
    [line] = error_lines(stderr)
    assert line.startswith(f"framepack: error: DEADLINE_EXCEEDED: the job ran past this server's limit of "
                           f"{JOB_LIMIT_S:g} s")
    assert list(tmp_path.iterdir()) == []
    assert took < JOB_LIMIT_S + 10
    figures.append(f"time limit: a 20-second video on an {JOB_LIMIT_S:g} s limit ended DEADLINE_EXCEEDED after "
                   f"{took:.1f} s at the client, no MP4 written")


def test_killing_the_backend_stub_mid_job_fails_that_job_and_the_next_succeeds(server, tmp_path, figures):
    [stub] = server.backend_stub_pids()
    output = tmp_path / "lost.mp4"
    cli = run_cli(server, output, "--seconds", "5", "--steps", "12")
    stderr: list[str] = []
    assert watch_progress(cli, stderr).wait(60), "no progress from the client"
    killed_at = time.monotonic()
    os.kill(stub, signal.SIGKILL)
    assert cli.wait(60) == 1
    failed_after = time.monotonic() - killed_at
    time.sleep(0.2)
    [line] = error_lines("".join(stderr))
    assert line.startswith(f"framepack: error: UNAVAILABLE: lost the connection to the server at {server.grpc_address}")
    assert list(tmp_path.iterdir()) == []

    # The next request waits (connect retries with backoff) for the restarted server.
    started = time.monotonic()
    cli = run_cli(server, tmp_path / "next.mp4", "--seconds", "0.5", "--steps", "2", "--quiet",
                  "--connect-timeout", "120")
    stdout, stderr_text = cli.communicate(timeout=180)
    assert cli.returncode == 0, stderr_text
    assert stdout.strip() == str(tmp_path / "next.mp4") and (tmp_path / "next.mp4").stat().st_size > 0
    next_took = time.monotonic() - started
    assert server.supervisor.restarts == [f"backend stub process {stub} died"]
    [new_stub] = server.backend_stub_pids()
    assert new_stub != stub
    figures.append(
        f"stub killed mid-job: that job failed {failed_after:.2f} s later with one line (UNAVAILABLE: lost the "
        f"connection), no MP4; the launcher restarted the server; the next request waited for it and succeeded "
        f"after {next_took:.1f} s"
    )


# ------------------------------------------------------------------ 5. security: binding, TLS


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_server_listens_on_loopback_only(server):
    # 127.0.0.1 as /proc writes it: little-endian hex, or IPv4-mapped on an IPv6 socket (gRPC).
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    for name, port in server.ports.items():
        addresses = listening_addresses(port)
        assert addresses and addresses <= loopback, (name, addresses)


def openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=framepack test CA", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=framepack test {name}", cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl command")
def test_tls_end_to_end_with_a_self_signed_certificate(tiny_bundle, tmp_path, image, figures):
    make_certificates(tmp_path)
    checked = []
    for mutual in (False, True):
        tls = GrpcTls(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem" if mutual else None)
        grpc_port, http_port, metrics_port = free_ports(3)
        with TritonServer(tiny_bundle, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                          device="cpu", log_path=tmp_path / f"tls-{mutual}.log", startup_timeout_s=300,
                          grpc_tls=tls) as server:
            client_files = ["--private-key", str(tmp_path / "client.key"),
                            "--certificate-chain", str(tmp_path / "client.pem")] if mutual else []
            output = tmp_path / f"tls-{mutual}.mp4"
            cli = run_cli(server, output, "--seconds", "0.5", "--steps", "2", "--quiet", "--ssl",
                          "--root-certificates", str(tmp_path / "ca.pem"), *client_files)
            stdout, stderr = cli.communicate(timeout=120)
            assert cli.returncode == 0, stderr
            assert stdout.strip() == str(output) and output.stat().st_size > 0

            refused = [Endpoint(server.grpc_address, connect_timeout_s=0.5)]  # plain text
            refused.append(Endpoint(server.grpc_address, ssl=True, connect_timeout_s=0.5))  # CA unknown
            if mutual:  # the right CA but no client certificate
                refused.append(Endpoint(server.grpc_address, ssl=True, root_certificates=tmp_path / "ca.pem",
                                        connect_timeout_s=0.5))
            for endpoint in refused:
                with pytest.raises(stream.ServerError) as caught:
                    list(stream.generate(endpoint, WireRequest(image, "p", FAST)))
                assert caught.value.status == "UNAVAILABLE" and "cannot reach the server" in caught.value.message
            checked.append(f"{'mutual TLS' if mutual else 'TLS'}: job over TLS succeeded, "
                           f"{len(refused)} wrong clients refused")
    figures.append("; ".join(checked))
