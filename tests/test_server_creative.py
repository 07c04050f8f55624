"""Creative controls through the real server and the CLI: each feature makes the planned MP4
(PyAV), bad input is refused with INVALID_ARGUMENT naming the field, and the server keeps serving.

Kept to three small jobs (window 3: 12 frames a section) and refusals, which run no job.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from client import stream
from client.images import load_image
from framepack_backend.buckets import bucket_for
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_wire import WireRequest

pytestmark = pytest.mark.server

RESOLUTION, WINDOW = 128, 3
FAST = ["--resolution", str(RESOLUTION), "--steps", "1", "--window", str(WINDOW), "--seconds", "0.8"]


def generate(server, output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "client.cli", "generate", "--output", str(output),
               "--server", server.grpc_address, "--quiet", *FAST, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def read_mp4(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        return frames, video.height, video.width, float(video.average_rate)


@pytest.fixture(scope="module")
def end_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("guides") / "end.png"
    Image.fromarray(255 - load_image(SAMPLE).pixels).save(path)
    return path


def test_end_image_keyframe_and_timed_prompt_make_the_planned_video(triton_server, tmp_path, end_png):
    output = tmp_path / "guided.mp4"
    done = generate(triton_server, output, "--image", str(SAMPLE), "--end-image", str(end_png),
                    "--end-strength", "0.8", "--keyframe", f"0.5:{end_png}",
                    "--prompt", "[0s: a person stands] [0.5s: the person waves]", "--prompt-blend-sections", "1")
    assert done.returncode == 0, done.stderr
    sections = 2  # round(0.8 s · 30 / 12)
    height, width = bucket_for(*load_image(SAMPLE).pixels.shape[:2], RESOLUTION)
    assert read_mp4(output) == (4 * WINDOW * sections + 1, height, width, 30.0)


def test_loop_and_text_to_video_make_the_planned_videos(triton_server, tmp_path):
    # The default window: one section of 36 frames + the start frame (36n + 1).
    loop = generate(triton_server, tmp_path / "loop.mp4", "--image", str(SAMPLE), "--loop", "--prompt", "waves",
                    "--window", "9", "--seconds", "1.2")
    assert loop.returncode == 0, loop.stderr
    height, width = bucket_for(*load_image(SAMPLE).pixels.shape[:2], RESOLUTION)
    assert read_mp4(tmp_path / "loop.mp4") == (37, height, width, 30.0)
    t2v = generate(triton_server, tmp_path / "t2v.mp4", "--latent-init", "noise", "--prompt", "a cat")
    assert t2v.returncode == 0, t2v.stderr
    assert read_mp4(tmp_path / "t2v.mp4") == (25, *bucket_for(RESOLUTION, RESOLUTION, RESOLUTION), 30.0)


@pytest.mark.parametrize("request_, field", [
    (dict(prompt="[0s: a cat] [1s the cat jumps]"), "prompt"),
    (dict(keyframes=((5.0, np.zeros((64, 64, 3), np.uint8)),)), "keyframe_times"),
    (dict(keyframes=tuple((0.1, np.zeros((16, 16, 3), np.uint8)) for _ in range(17))), "keyframes"),
    (dict(end_image=np.zeros((16, 400, 3), np.uint8)), "end_image"),
    (dict(parameters={"loop": "true"}, end_image=np.zeros((64, 64, 3), np.uint8)), "loop"),
])
def test_bad_creative_input_is_an_invalid_argument_naming_the_field(triton_server, request_, field):
    image = load_image(SAMPLE).pixels
    values = {"prompt": "a cat", "parameters": {}, **request_}
    parameters = {"resolution": RESOLUTION, "window": WINDOW, "seconds": 0.8, **values.pop("parameters")}
    with pytest.raises(stream.ServerError) as refused:
        list(stream.generate(triton_server.grpc_address, WireRequest(image, parameters=parameters, **values)))
    assert refused.value.status == "INVALID_ARGUMENT"
    assert refused.value.message.startswith(f"{field}=") or refused.value.message.startswith(f"{field}[")
    assert stream.describe(triton_server.grpc_address).settings["end_strength"]["high"] == 1.0  # still serving
