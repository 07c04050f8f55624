"""The client without a server: MP4 writing (atomic), section assembly, CLI surface."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import av
import numpy as np
import pytest

from client import cli
from client.connection import Endpoint
from client.video import FrameAssembler, write_mp4
from framepack_backend.settings import describe_settings
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE


def moving_gradient(count: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [np.stack([(x * 4 + 6 * t) % 256, (y * 4) % 256, np.full_like(x, 128)], axis=-1) for t in range(count)]
    ).astype(np.uint8)


def noise(count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def read_back(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, stream.average_rate, stream.codec_context.name, stream.format.name


def test_mp4_round_trip_keeps_count_rate_size_and_pixels(tmp_path):
    frames = moving_gradient(37, 48, 64)
    path = write_mp4(tmp_path / "clip.mp4", frames, fps=30, crf=10)
    decoded, rate, codec, pixel_format = read_back(path)
    assert decoded.shape == frames.shape
    assert (rate, codec, pixel_format) == (30, "h264", "yuv420p")
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6


def test_the_mp4_gets_the_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_mp4(tmp_path / "clip.mp4", moving_gradient(2, 16, 16), fps=30)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_odd_sides_are_cropped_to_even(tmp_path):
    decoded, *_ = read_back(write_mp4(tmp_path / "odd.mp4", moving_gradient(3, 33, 47), fps=24))
    assert decoded.shape == (3, 32, 46, 3)


def test_lower_crf_gives_a_larger_file(tmp_path):
    frames = noise(8, 64, 64)
    fine = write_mp4(tmp_path / "fine.mp4", frames, fps=30, crf=5).stat().st_size
    coarse = write_mp4(tmp_path / "coarse.mp4", frames, fps=30, crf=45).stat().st_size
    assert fine > 2 * coarse


def test_the_same_frames_give_the_same_mp4_bytes(tmp_path):
    """Noisy moving frames of the size where x264's macroblock tree made most encodes differ
    (benchmarks/mp4_determinism.py: 4 distinct files of 5 without the fix)."""
    y, x = np.mgrid[0:224, 0:288]
    moving = np.stack([np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, (x + y + t) % 256], -1) for t in range(73)])
    frames = np.clip(moving + np.random.default_rng(0).normal(0, 12, moving.shape), 0, 255).astype(np.uint8)
    encodes = {write_mp4(tmp_path / f"same-{i}.mp4", frames, 30, 16).read_bytes() for i in range(3)}
    assert len(encodes) == 1
    other = write_mp4(tmp_path / "other.mp4", frames[::-1].copy(), 30, 16).read_bytes()
    assert other not in encodes


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "video.mp4"
    path.write_bytes(b"previous video")
    real = av.VideoFrame.from_ndarray
    calls = []

    def failing_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing_after_three)
    with pytest.raises(RuntimeError, match="disk full"):
        write_mp4(path, moving_gradient(10, 16, 16), fps=30)
    assert path.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


@pytest.mark.parametrize("frames", [np.zeros((0, 16, 16, 3), np.uint8), np.zeros((2, 16, 16), np.uint8),
                                    np.zeros((2, 16, 16, 3), np.float32), np.zeros((2, 1, 1, 3), np.uint8)])
def test_bad_frames_are_refused_before_any_file_appears(tmp_path, frames):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "bad.mp4", frames, fps=30)
    assert list(tmp_path.iterdir()) == []


def test_sections_land_at_their_start_frame_and_later_ones_win():
    # Inverted sampling: the video's end arrives first, then a section that rewrites the overlap.
    assembler = FrameAssembler()
    assembler.add(40, np.full((33, 4, 6, 3), 1, np.uint8), total_frames=73)
    with pytest.raises(ValueError, match="40 frames never arrived"):
        assembler.video()
    assembler.add(0, np.full((45, 4, 6, 3), 2, np.uint8), total_frames=73)
    result = assembler.video()
    assert result.shape == (73, 4, 6, 3)
    assert (result[:45] == 2).all() and (result[45:] == 1).all()


@pytest.mark.parametrize(
    "start, frames, total",
    [
        (70, np.zeros((5, 4, 6, 3), np.uint8), 73),  # past the end
        (-1, np.zeros((5, 4, 6, 3), np.uint8), 73),
        (0, np.zeros((5, 4, 8, 3), np.uint8), 73),  # another frame size
        (0, np.zeros((5, 4, 6, 3), np.uint8), 37),  # another video length
    ],
)
def test_inconsistent_sections_are_refused(start, frames, total):
    assembler = FrameAssembler()
    assembler.add(40, np.zeros((33, 4, 6, 3), np.uint8), total_frames=73)
    with pytest.raises(ValueError):
        assembler.add(start, frames, total)


def test_the_client_imports_neither_torch_nor_the_engine():
    code = "import sys, client.cli; print(sorted(m for m in ('torch', 'framepack_backend') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_offers_every_engine_setting():
    # keyframe_times and loop come from --keyframe SECONDS:PATH and the --loop flag
    assert set(cli.SETTINGS) | set(cli.CLI_SPELLING) == set(describe_settings())
    assert not set(cli.SETTINGS) & set(cli.CLI_SPELLING)


def test_only_given_settings_are_sent(tmp_path, monkeypatch):
    sent = {}

    def fake_generate(server, request):
        sent.update(server=server, prompt=request.prompt, settings=request.parameters, shape=request.image.shape)
        raise cli.stream.ServerError("UNAVAILABLE", "no server in this test")

    monkeypatch.setattr(cli.stream, "generate", fake_generate)
    args = ["generate", "--image", str(SAMPLE), "--prompt", "p", "--output", str(tmp_path / "o.mp4"),
            "--steps", "7", "--teacache", "off", "--negative-prompt", "blur", "--server", "h:1"]
    assert cli.main(args) == cli.EXIT_SERVER_ERROR
    assert sent == {"server": Endpoint("h:1"), "prompt": "p", "settings": {"steps": "7", "teacache": "off",
                                                                 "negative_prompt": "blur"}, "shape": (192, 256, 3)}
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_image_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    code = cli.main(["generate", "--image", str(bad), "--prompt", "p", "--output", str(tmp_path / "o.mp4")])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"framepack: error: --image {bad}: not a readable image")


def test_crf_is_a_client_option_checked_here():
    from client.video import CRF_DEFAULT, parse_crf

    assert CRF_DEFAULT == 16 and [parse_crf("20"), parse_crf(0), parse_crf(51.0)] == [20, 0, 51]
    for bad in ("52", -1, "fine", True, 20.5):
        with pytest.raises(ValueError, match=r"^crf=.* is not allowed: expected int in \[0, 51\]"):
            parse_crf(bad)


def test_crf_is_used_locally_and_never_sent(tmp_path, monkeypatch, capsys):
    sent = []

    def fake_generate(server, request):
        sent.append(request.request_parameters())
        raise cli.stream.ServerError("UNAVAILABLE", "no server in this test")

    monkeypatch.setattr(cli.stream, "generate", fake_generate)
    args = ["generate", "--image", str(SAMPLE), "--prompt", "p", "--output", str(tmp_path / "o.mp4"), "--server", "h:1"]
    assert cli.main([*args, "--crf", "20", "--steps", "3"]) == cli.EXIT_SERVER_ERROR
    assert sent == [{"prompt": "p", "steps": "3"}]
    assert cli.main([*args, "--crf", "99"]) == cli.EXIT_USAGE  # refused before anything is sent
    assert len(sent) == 1 and "crf='99' is not allowed" in capsys.readouterr().err
    # The backend names come from the server's describe answer, not from a copy here.
    assert "sdpa" not in cli.SETTINGS["attention"] and "describe answer" in cli.SETTINGS["attention"]


def test_the_cli_prints_the_planned_video_before_sampling_and_names_the_phase(tmp_path, monkeypatch, capsys):
    frames = np.zeros((37, 112, 144, 3), np.uint8)
    printed_before_sampling = []

    def fake_generate(server, request):
        yield cli.stream.Queued(1, 0.0)
        yield cli.stream.Queued(1, 5.0)  # the same position again: not printed again
        yield cli.stream.Plan(1, 9, 10, 37, 30, 144, 112)
        yield cli.stream.Phase("text", 0, 1, 0.1)
        yield cli.stream.Phase("sampling", 1, 1, 0.5)
        printed_before_sampling.append(capsys.readouterr().err)
        for step in (1, 2):
            yield cli.stream.Progress(1, 1, step, 2, 0.5 + step, None)
        yield cli.stream.Phase("decode", 1, 1, 2.5)
        yield cli.stream.Section(1, 1, 0, 37, 30, frames)
        yield cli.stream.Final(37, 30, 144, 112, 7, {}, {"total_s": 3.0})

    monkeypatch.setattr(cli.stream, "generate", fake_generate)
    output = tmp_path / "o.mp4"
    assert cli.main(["generate", "--image", str(SAMPLE), "--prompt", "p", "--output", str(output)]) == 0
    lines = printed_before_sampling[0].splitlines()
    assert lines[:2] == ["framepack: queued on the server (next in line), waiting for 0:00",
                         "framepack: video: 37 frames = 1.23 s (1 section of 9 latent frames) at 144×112"]
    err = capsys.readouterr().err
    assert "section 1/1 · step 2/2" in err and "section 1/1 · decoding" in err and "ETA" in err
    assert output.exists() and "framepack: 37 frames, 144×112 at 30 fps" in err
