"""Video extension through the real server and the CLI: the MP4 holds the clip then the
new frames, at the bucket's size and 30 fps; bad clips are refused naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import FAST_SETTINGS

from client import stream
from client.source_video import fit_to_output
from client.video import write_mp4
from framepack_wire import MAX_VIDEO_FRAMES, WireRequest

pytestmark = pytest.mark.server

SOURCE_FRAMES = 20  # a 30 fps clip, 128×96: the 144×112 bucket at resolution 128


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:96, 0:128]
    frames = np.stack([np.stack([(x * 2 + 6 * t) % 256, y * 2, (x + y) % 256], -1) for t in range(SOURCE_FRAMES)])
    return write_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4", frames.astype(np.uint8), 30, crf=0)


def run_cli(server, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "client.cli", "generate", "--prompt", "it goes on", "--server", server.grpc_address,
        "--seconds", "1", "--resolution", str(FAST_SETTINGS["resolution"]), "--steps", "2", *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def read_mp4(path: Path) -> tuple[np.ndarray, int, tuple[int, int]]:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video)])
        return frames, video.average_rate, (video.width, video.height)


def test_the_mp4_is_the_clip_then_the_new_frames_and_extension_only_is_the_new_frames(triton_server, clip_path,
                                                                                     tmp_path):
    combined = run_cli(triton_server, "--video", str(clip_path), "--output", str(tmp_path / "longer.mp4"))
    assert combined.returncode == 0, combined.stderr
    assert "1 of its 20 frames sent" in combined.stderr  # the inverted model reads the clip's last frame
    frames, rate, size = read_mp4(tmp_path / "longer.mp4")
    new = 36  # one section: 4·9 new frames after the clip's last
    assert len(frames) == SOURCE_FRAMES + new and rate == 30 and size == (144, 112)

    alone = run_cli(triton_server, "--video", str(clip_path), "--extension-only", "--output", str(tmp_path / "new.mp4"))
    assert alone.returncode == 0, alone.stderr
    new_frames, rate, size = read_mp4(tmp_path / "new.mp4")
    assert len(new_frames) == new and rate == 30 and size == (144, 112)
    # The same job: the combined MP4's tail is the extension-only MP4's frames (two lossy
    # encodes of the same noisy frames, at other places in the stream).
    assert np.abs(frames[SOURCE_FRAMES:].astype(int) - new_frames.astype(int)).mean() < 6
    # Its head is the clip, scaled to cover the bucket (128×96 → 150×112) and centre-cropped.
    with av.open(str(clip_path)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(frames[0].astype(int) - fit_to_output(first, 144, 112).astype(int)).mean() < 6


@pytest.mark.parametrize("extra, message", [
    (("--image", "x.png", "--video", "y.mp4"), "not allowed with argument"),
    (("--video", "{missing}"), "no such file"),
    (("--video", "{text}"), "not a readable video"),
    (("--image", "{text}", "--extension-only"), "go with --video"),
])
def test_the_cli_refuses_a_clip_it_cannot_use_in_one_line(triton_server, tmp_path, extra, message):
    (tmp_path / "text.mp4").write_text("hello")
    paths = {"missing": tmp_path / "nothing.mp4", "text": tmp_path / "text.mp4"}
    extra = tuple(arg.format(**paths) for arg in extra)
    cli = run_cli(triton_server, *extra, "--output", str(tmp_path / "out.mp4"))
    assert cli.returncode == 2 and message in cli.stderr
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("video, image, value", [
    (np.zeros((0, 96, 128, 3), np.uint8), None, "'0 frames'"),
    (np.zeros((MAX_VIDEO_FRAMES + 1, 16, 16, 3), np.uint8), None, "'74 frames'"),
    (np.zeros((1, 1081, 1920, 3), np.uint8), None, "'1920×1081 pixels'"),
    (np.zeros((1, 96, 128, 3), np.uint8), np.zeros((96, 128, 3), np.uint8), "'a video and an image'"),
])
def test_a_bad_clip_is_an_invalid_argument_naming_the_video_and_the_server_keeps_serving(triton_server, video,
                                                                                        image, value):
    with pytest.raises(stream.ServerError) as caught:
        list(stream.generate(triton_server.grpc_address, WireRequest(image, "x", FAST_SETTINGS, video=video)))
    assert caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message.startswith(f"video={value} is not allowed")
    description = stream.describe(triton_server.grpc_address)
    assert description.video["sampling"] == "inverted" and description.video["context_frames"]["f1"] == 73


def test_a_web_ui_job_extending_a_clip_offers_the_clip_then_the_new_frames(triton_server, clip_path, tmp_path):
    from client.source_video import read_clip_end
    from client.webui_job import run_job

    clip = read_clip_end(clip_path, 1)
    job = WireRequest(None, "it goes on", {**FAST_SETTINGS, "steps": 2, "seconds": 1}, video=clip.frames)
    updates = list(run_job(triton_server.grpc_address, job, tmp_path, lambda: False, source=clip_path))
    assert updates[-1].final is not None, updates[-1].status
    frames, rate, size = read_mp4(updates[-1].final)
    assert len(frames) == SOURCE_FRAMES + 36 and rate == 30 and size == (144, 112)
