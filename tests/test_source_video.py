"""The client's side of video extension: reading a clip's end at 30 fps, the output's source frames."""

from __future__ import annotations

import numpy as np
import pytest

from client.source_video import VideoLoadError, context_frames, fit_to_output, read_clip_end, source_frames
from client.video import write_mp4
from framepack_backend.buckets import resize_and_center_crop
from framepack_backend.extension import describe_video


def flat_clip(frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i is grey level 10·i, so a decoded frame says which it was."""
    return np.stack([np.full((height, width, 3), 10 * i, np.uint8) for i in range(frames)])


def levels(frames: np.ndarray) -> list[int]:
    return [int(round(frame.mean() / 10)) for frame in frames]


def test_the_last_frames_of_a_30_fps_clip_are_sent_as_they_are(tmp_path):
    path = write_mp4(tmp_path / "clip.mp4", flat_clip(20), 30, crf=0)
    clip = read_clip_end(path, 5)
    assert clip.frame_count == 20 and clip.frames.shape == (5, 48, 64, 3)
    assert levels(clip.frames) == [15, 16, 17, 18, 19]
    assert clip.message.endswith("5 of its 20 frames sent (its end, at 30 fps)")


def test_a_clip_of_another_rate_is_read_at_30_fps(tmp_path):
    path = write_mp4(tmp_path / "clip.mp4", flat_clip(20), 25, crf=0)  # 0.8 s
    clip = read_clip_end(path, 73)
    assert clip.frame_count == len(clip.frames) == 24
    assert levels(clip.frames)[-1] == 19 and "read at 30 fps from 25 fps" in clip.message
    assert len(list(source_frames(path, 32, 32))) == 24


def test_frames_over_the_pixel_limit_are_downscaled(tmp_path):
    path = write_mp4(tmp_path / "clip.mp4", flat_clip(3, 96, 128), 30, crf=0)
    clip = read_clip_end(path, 3, max_pixels=64 * 48)
    assert clip.frames.shape == (3, 48, 64, 3) and "downscaled from 128×96 to 64×48" in clip.message


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_text("not a video"), "not a readable video"),
    (lambda p: p.write_bytes(b""), "not a readable video"),
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_a_file_that_is_not_a_clip_is_one_line_naming_it(tmp_path, make, reason):
    path = tmp_path / "clip.mp4"
    make(path)
    with pytest.raises(VideoLoadError) as caught:
        read_clip_end(path, 5, label="--video")
    assert str(caught.value).startswith(f"--video {path}: {reason}") and "\n" not in str(caught.value)


def test_the_output_s_source_frames_are_cut_as_the_server_cuts_the_frames_it_reads():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    for width, height in ((144, 112), (112, 144), (160, 90), (64, 64)):
        assert np.array_equal(fit_to_output(frame, width, height), resize_and_center_crop(frame, width, height))


def test_the_frames_to_send_follow_the_server_s_variant():
    assert context_frames(describe_video("f1")) == 73
    assert context_frames(describe_video("inverted")) == 1
    assert context_frames(describe_video("inverted"), "f1") == 73  # a job asking for f1 (refused unless loaded)
    assert context_frames(describe_video(None)) == 73 == context_frames({})  # not said: the most it accepts


@pytest.mark.parametrize("value, ok", [("1", True), ("73", True), ("0", False), ("74", False), ("five", False)])
def test_context_frames_is_a_count_up_to_the_wire_limit(value, ok, capsys):
    from client.cli import build_parser

    argv = ["generate", "--video", "c.mp4", "--prompt", "p", "--output", "o.mp4", "--context-frames", value]
    if ok:
        assert build_parser().parse_args(argv).context_frames == int(value)
    else:
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(argv)
        assert caught.value.code == 2 and "--context-frames" in capsys.readouterr().err
