"""Every input kind through the real tritonserver with the tiny model: `--from` repeats an
end-image job and a clip extension bit for bit, and a jobs file with an image job, a clip job
and an end-image job makes three MP4s, then nothing new when run again."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mp4_files import mp4_frames, mp4_packets
from PIL import Image

from client import cli
from client.provenance import file_sha256, read_record
from client.video import write_mp4

pytestmark = pytest.mark.server

# One section of one step at the smallest bucket: a job takes a few seconds on the CPU.
QUICK = ["--resolution", "128", "--steps", "1", "--seconds", "0.5"]
QUICK_SETTINGS = {"resolution": 128, "steps": 1, "seconds": 0.5}
CLIP_FRAMES = 20
NEW_FRAMES = {"image": 37, "video": 36}  # one section: 1 + 4·9 frames from an image, 4·9 after a clip's last


@pytest.fixture
def inputs(tmp_path, image) -> dict[str, Path]:
    """A start image, an end image and a 128×96 clip beside the jobs."""
    Image.fromarray(image).save(tmp_path / "start.png")
    Image.fromarray(np.ascontiguousarray(image[::-1, ::-1])).save(tmp_path / "end.png")
    y, x = np.mgrid[0:96, 0:128]
    clip = np.stack([np.stack([(x * 2 + 6 * t) % 256, y * 2, (x + y) % 256], -1) for t in range(CLIP_FRAMES)])
    write_mp4(tmp_path / "clip.mp4", clip.astype(np.uint8), 30, crf=0)
    return {name: tmp_path / f"{name}.{ext}" for name, ext in (("start", "png"), ("end", "png"), ("clip", "mp4"))}


def generate(server, *options: str) -> None:
    code = cli.main(["generate", *options, "--server", server.grpc_address, "--quiet"])
    assert code == 0


@pytest.mark.parametrize("kind", ["end_image", "video"])
def test_from_repeats_an_end_image_job_and_a_clip_extension_bit_for_bit(triton_server, inputs, tmp_path, kind):
    first, again = tmp_path / "first.mp4", tmp_path / "again.mp4"
    given = (["--image", str(inputs["start"]), "--end-image", str(inputs["end"])] if kind == "end_image"
             else ["--video", str(inputs["clip"])])
    generate(triton_server, *given, "--prompt", "it goes on", "--seed", "5", "--output", str(first), *QUICK)
    generate(triton_server, "--from", str(first), "--output", str(again))

    record, repeated = read_record(first), read_record(again)
    kept = {"end_image": inputs["end"], "video": inputs["clip"]}[kind]
    assert record[kind]["path"] == str(kept) and record[kind]["sha256"] == file_sha256(kept)
    assert repeated[kind]["sha256"] == record[kind]["sha256"]
    assert repeated["final"]["parameters"] == record["final"]["parameters"]
    frames = mp4_frames(first)
    before = CLIP_FRAMES if kind == "video" else 0  # an extension's MP4 shows the clip first
    assert len(frames) == before + NEW_FRAMES["video" if kind == "video" else "image"]
    assert record["final"]["frame_count"] == len(frames) - before
    assert np.array_equal(mp4_frames(again), frames)
    assert mp4_packets(again) == mp4_packets(first)


def done_jobs(server) -> float:
    """framepack_jobs_total{outcome="done"}, summed over instances (the server's own metric)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("framepack_jobs_total{") and 'outcome="done"' in line)


def counted(servers, at_least: float, timeout_s: float = 20.0) -> list[float]:
    """done_jobs of each of `servers` once their sum reaches `at_least`: a job is counted just
    after its last response is sent."""
    deadline = time.monotonic() + timeout_s
    while sum(done := [done_jobs(server) for server in servers]) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return done


def test_a_queue_of_an_image_a_clip_and_an_end_image_job_runs_once(triton_server, inputs, tmp_path, capsys):
    jobs = [
        {"image": "start.png", "prompt": "a person waves", "settings": QUICK_SETTINGS, "output": "out/image.mp4"},
        {"video": "clip.mp4", "prompt": "it goes on", "settings": QUICK_SETTINGS, "output": "out/clip.mp4"},
        {"image": "start.png", "end_image": "end.png", "prompt": "a person turns", "settings": QUICK_SETTINGS,
         "output": "out/ends.mp4"},
    ]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    command = ["queue", str(jobs_file), "--server", triton_server.grpc_address, "--quiet"]
    done_before = done_jobs(triton_server)

    assert cli.main(command) == 0
    summary = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in summary[1:-1]] == ["done", "done", "done"] and summary[-1] == "3 done, 0 failed"
    assert sum(counted([triton_server], done_before + 3)) - done_before == 3
    expected = {"image": NEW_FRAMES["image"], "clip": CLIP_FRAMES + NEW_FRAMES["video"], "ends": NEW_FRAMES["image"]}
    assert {name: len(mp4_frames(tmp_path / "out" / f"{name}.mp4")) for name in expected} == expected
    assert read_record(tmp_path / "out/clip.mp4")["video"]["sha256"] == file_sha256(inputs["clip"])
    assert read_record(tmp_path / "out/ends.mp4")["inputs"] == ["end_image", "image"]

    # Again: every job is done, so nothing is generated and no file is rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert cli.main(command) == 0
    summary = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in summary[1:-1]] == ["skipped"] * 3 and summary[-1] == "3 skipped, 0 failed"
    assert done_jobs(triton_server) - done_before == 3
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
