"""The CLI end to end against the real tritonserver with the tiny model: start photos as
phones and editors save them, and output paths that cannot be written.

The tiny model's weights are random, so a video is not a picture of its start image; but
it is a deterministic function of it. Each photo's MP4 is compared with the video the
server makes from the pixels a correct reading gives (built here by hand, not by
client/images.py), and with the one a naive reading gives, to show the difference shows.
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mp4_files import mp4_frames
from PIL import Image

from client import cli, provenance, stream
from client.video import FrameAssembler, write_mp4
from framepack_backend.buckets import bucket_for
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_wire import MAX_IMAGE_PIXELS, WireRequest

pytestmark = pytest.mark.server

# One section of one step at the smallest bucket: a job takes a few seconds on the CPU.
QUICK = {"resolution": "128", "steps": "1", "seconds": "1"}
JOB_LINE = re.compile(r"request \S*: ")
# Both videos go through the same encoder; the server's CPU arithmetic is not bit-exact
# from run to run (measured: up to 0.1 in a frame's mean; the naive readings move it 3 to 4).
MEAN_TOLERANCE = 0.5


def cli_command(server, image: Path, output: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "client.cli", "generate", "--image", str(image), "--prompt", "a person waves",
               "--output", str(output), "--server", server.grpc_address]
    for name, value in QUICK.items():
        command += [f"--{name}", value]
    return command + list(extra)


def run_cli(server, image: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(server, image, output, *extra), capture_output=True, text=True, timeout=300)


def server_video(server, pixels: np.ndarray, folder: Path) -> np.ndarray:
    """The video the server makes from exactly these pixels (same seed and settings as the
    CLI), through the same MP4 encoding, so that only the start image differs."""
    assembler = FrameAssembler()
    for event in stream.generate(server.grpc_address, WireRequest(pixels, "a person waves", QUICK)):
        if isinstance(event, stream.Section):
            assembler.add(event.start_frame, event.frames, event.total_frames)
            fps = event.fps
    return mp4_frames(write_mp4(folder / f"reference-{time.monotonic_ns()}.mp4", assembler.video(), fps, 16))


def mean_gap(video: np.ndarray, reference: np.ndarray) -> float:
    """The largest difference of a per-channel mean colour, over the top and bottom halves
    of the first and the last frames."""
    half = video.shape[1] // 2
    return max(
        float(np.abs(video[i, rows].reshape(-1, 3).mean(0) - reference[i, rows].reshape(-1, 3).mean(0)).max())
        for i in (0, -1) for rows in (slice(None, half), slice(half, None))
    )


def job_lines(server) -> int:
    """Lines the server logged about jobs, once the last job's lines have all been written."""
    count = -1
    while (now := len(JOB_LINE.findall(server.log_text()))) != count:
        count = now
        time.sleep(0.5)
    return count


# --- start photos ----------------------------------------------------------------------


def exif_portrait(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A phone photo stored 192×96 (landscape) with EXIF orientation 6: upright, 96×192."""
    stored = np.zeros((96, 192, 3), np.uint8)
    stored[:, :96] = (220, 40, 40)  # left half red, right half blue, as stored
    stored[:, 96:] = (40, 40, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = folder / "portrait.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(path).convert("RGB"))  # what the JPEG really holds
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # turned 90° clockwise
    return path, upright, np.ascontiguousarray(np.rot90(stored, k=1))  # turned the wrong way


def grey_16_bit(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 16-bit greyscale PNG, mid-grey values far above 255."""
    y, x = np.mgrid[0:96, 0:128]
    values = (30000 + x * 100 + y * 50).astype(np.uint16)
    path = folder / "grey16.png"
    Image.fromarray(values).save(path)  # Pillow writes uint16 arrays as 16-bit greyscale
    assert Image.open(path).mode in ("I;16", "I")
    upright = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    clipped = np.full_like(upright, 255)  # what converting to RGB without scaling gives
    return path, upright, clipped


def transparent(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """An RGBA PNG: the left half fully transparent over black pixels, the right half opaque red."""
    rgba = np.zeros((96, 128, 4), np.uint8)
    rgba[:, 64:] = (200, 30, 30, 255)
    path = folder / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    composited = rgba[..., :3].copy()
    composited[:, :64] = 255  # onto white
    return path, composited, np.ascontiguousarray(rgba[..., :3])  # the alpha dropped: black


def huge(folder: Path) -> tuple[Path, np.ndarray, None]:
    """A 5000×5000 PNG (25 MP, over the server's 4096×4096): green above, purple below."""
    pixels = np.empty((5000, 5000, 3), np.uint8)
    pixels[:2500] = (40, 180, 60)
    pixels[2500:] = (150, 50, 170)
    path = folder / "huge.png"
    Image.fromarray(pixels).save(path, compress_level=1)
    side = int(MAX_IMAGE_PIXELS**0.5)
    fitted = np.empty((side, side, 3), np.uint8)
    fitted[: side // 2] = (40, 180, 60)
    fitted[side // 2 :] = (150, 50, 170)
    return path, fitted, None  # the naive reading is refused by the server


@pytest.mark.parametrize(
    "make, message",
    [
        (exif_portrait, "turned upright (rotated 90° clockwise) per its EXIF orientation 6"),
        (grey_16_bit, "16-bit"),
        (transparent, "transparency composited onto white"),
        (huge, "downscaled from 5000×5000 (25,000,000 pixels) to 4096×4096 to fit the limit of 16,777,216 pixels"),
    ],
    ids=["exif-orientation-6", "16-bit-grey", "rgba", "5000x5000"],
)
def test_cli_sends_photos_upright_in_their_colours_and_within_the_limit(triton_server, tmp_path, make, message):
    image, correct, naive = make(tmp_path)
    output = tmp_path / "out.mp4"
    done = run_cli(triton_server, image, output)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith(f"framepack: --image {image}: ")]
    assert len(notes) == 1 and message in notes[0], done.stderr

    video = mp4_frames(output)
    height, width = bucket_for(*correct.shape[:2], int(QUICK["resolution"]))
    assert video.shape == (37, height, width, 3)
    if make is exif_portrait:
        assert height > width  # upright portrait, not the stored landscape
    reference = server_video(triton_server, correct, tmp_path)
    assert mean_gap(video, reference) < MEAN_TOLERANCE
    if naive is not None:  # what a naive reading sends makes a measurably different video
        assert mean_gap(video, server_video(triton_server, naive, tmp_path)) > 4 * MEAN_TOLERANCE


# --- output paths ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["folder under a file", "output is a folder", "sections unwritable"])
def test_unwritable_outputs_fail_at_once_in_one_line_and_send_no_job(triton_server, tmp_path, case):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file")
    output, extra, expected = {
        "folder under a file": (blocker / "out.mp4", [],
                                f"--output {blocker / 'out.mp4'}: {blocker} is a file, not a folder"),
        "output is a folder": (tmp_path, [],
                               f"--output {tmp_path}: is a folder; give a file name, e.g. {tmp_path / 'video.mp4'}"),
        "sections unwritable": (tmp_path / "ok.mp4", ["--save-sections", str(blocker / "clips")],
                                f"--save-sections {blocker / 'clips'}: {blocker} is a file, not a folder"),
    }[case]
    jobs_before = job_lines(triton_server)
    started = time.monotonic()
    done = run_cli(triton_server, SAMPLE, output, *extra)
    elapsed = time.monotonic() - started
    assert done.returncode == cli.EXIT_USAGE
    assert done.stderr.splitlines() == [f"framepack: error: {expected}"]
    assert done.stdout == ""
    assert elapsed < 5
    assert job_lines(triton_server) == jobs_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_write_failing_at_the_end_keeps_the_video_in_a_fallback_file(triton_server, tmp_path, monkeypatch, capsys):
    wanted = tmp_path / "videos" / "wave.mp4"
    refused = []

    def disk_full_for_the_wanted_path(path, frames, fps, crf=None, **options):
        if Path(path) == wanted:  # checked writable before the job; full by the end of it
            refused.append(len(frames))
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_mp4(path, frames, fps, crf, **options)

    monkeypatch.setattr(provenance, "write_mp4", disk_full_for_the_wanted_path)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # leave pytest's SIGTERM alone
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    args = ["generate", "--image", str(SAMPLE), "--prompt", "a person waves", "--output", str(wanted),
            "--server", triton_server.grpc_address, "--quiet"]
    for name, value in QUICK.items():
        args += [f"--{name}", value]

    code = cli.main(args)
    out, err = capsys.readouterr()
    assert refused == [37]
    [fallback] = list(here.glob("wave-*.mp4"))
    assert code == cli.EXIT_SERVER_ERROR
    assert out.strip() == str(fallback)
    assert err.splitlines()[-1] == (
        f"framepack: error: could not write {wanted} (No space left on device); "
        f"the video was saved to {fallback} instead"
    )
    assert "Traceback" not in err
    assert len(mp4_frames(fallback)) == 37
    assert not wanted.exists()
