"""Reproducible jobs and batch queues through the real tritonserver with the tiny model:
`framepack generate --from` repeats a job bit for bit, and `framepack queue` spreads jobs
over two servers, reports the bad one and does nothing twice when run again."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from mp4_files import mp4_frames, mp4_packets
from PIL import Image

from client import cli
from client.images import load_image
from client.job_files import JobFiles
from client.provenance import ImageFile, file_sha256, read_record
from client.webui_job import run_job as page_job
from client.webui_queue import PageQueue
from framepack_server.server import TritonServer, free_ports
from framepack_wire import WireRequest
from tests.test_inputs_server import counted, done_jobs

pytestmark = pytest.mark.server

# One section of one step at the smallest bucket: a job takes a few seconds on the CPU.
QUICK = ["--resolution", "128", "--steps", "1", "--seconds", "0.5"]
QUICK_SETTINGS = {"resolution": 128, "steps": 1, "seconds": 0.5}


@pytest.fixture
def start_image(tmp_path, image) -> Path:
    path = tmp_path / "start.png"
    Image.fromarray(image).save(path)
    return path




def test_from_repeats_a_random_seed_job_bit_for_bit(triton_server, start_image, tmp_path, capsys):
    first = tmp_path / "first.mp4"
    code = cli.main(["generate", "--image", str(start_image), "--prompt", "a person waves", "--seed", "random",
                     "--output", str(first), "--server", triton_server.grpc_address, "--quiet", *QUICK])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    drawn = int(re.search(r"framepack: seed (\d+) \(drawn for --seed random\)", stderr).group(1))
    assert f"seed {drawn}," in stderr  # the final line reports the seed the server used

    record = read_record(first)
    assert record == json.loads((tmp_path / "first.json").read_text())
    final = record["final"]
    assert final["seed"] == drawn and final["parameters"]["seed"] == drawn
    assert final["parameters"]["prompt"] == "a person waves" and final["parameters"]["steps"] == 1
    assert final["parameters"]["resolution"] == 128 and final["parameters"]["teacache"] is True  # a default
    assert len(final["model"]["sha256"]) == 64 and set(final["model"]["components"]) == {
        "text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer"}
    assert set(final["versions"]) == {"framepack-serving", "torch", "diffusers", "transformers"}
    assert record["image"] == {"path": str(start_image), "sha256": file_sha256(start_image)}
    assert record["crf"] == 16 and record["sent"]["parameters"]["seed"] == drawn
    assert final["frame_count"] == len(mp4_frames(first))

    again = tmp_path / "again.mp4"
    code = cli.main(["generate", "--from", str(first), "--output", str(again),
                     "--server", triton_server.grpc_address, "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(mp4_frames(again), mp4_frames(first))
    assert mp4_packets(again) == mp4_packets(first)
    repeated = read_record(again)
    assert repeated["final"]["parameters"] == final["parameters"]
    assert repeated["final"]["model"] == final["model"] and repeated["image"] == record["image"]

    # From the JSON, with a setting given on the command line: that one wins.
    other = tmp_path / "other.mp4"
    code = cli.main(["generate", "--from", str(tmp_path / "first.json"), "--seed", str(drawn + 1),
                     "--output", str(other), "--server", triton_server.grpc_address, "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert read_record(other)["final"]["seed"] == drawn + 1
    assert not np.array_equal(mp4_frames(other), mp4_frames(first))


def test_from_refuses_a_changed_image_before_sending_anything(triton_server, start_image, tmp_path, capsys):
    first = tmp_path / "first.mp4"
    assert cli.main(["generate", "--image", str(start_image), "--prompt", "p", "--output", str(first),
                     "--server", triton_server.grpc_address, "--quiet", *QUICK]) == 0
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(start_image)
    capsys.readouterr()
    code = cli.main(["generate", "--from", str(first), "--output", str(tmp_path / "again.mp4"),
                     "--server", triton_server.grpc_address])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == (
        f"framepack: error: {first}: the start image {start_image} changed since (its sha256 differs); give --image")
    assert not (tmp_path / "again.mp4").exists()


@pytest.fixture(scope="module")
def second_server(tiny_bundle, tmp_path_factory) -> TritonServer:
    grpc, http, metrics = free_ports(3)
    server = TritonServer(tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
                          log_path=tmp_path_factory.mktemp("triton2") / "tritonserver.log", startup_timeout_s=300)
    with server:
        yield server


def test_queue_over_two_servers_reports_the_bad_job_and_resumes_without_redoing(
    triton_server, second_server, start_image, tmp_path, capsys
):
    jobs = [
        {"image": "start.png", "prompt": "a person waves", "settings": {**QUICK_SETTINGS, "seed": 1},
         "output": "out/one.mp4"},
        {"image": "start.png", "prompt": "a person waves", "settings": {**QUICK_SETTINGS, "steps": 1000},
         "output": "out/bad.mp4"},
        {"image": "start.png", "prompt": "a person jumps", "settings": {**QUICK_SETTINGS, "seed": 2},
         "output": "out/two.mp4", "crf": 20},
        {"image": "start.png", "prompt": "a person sits", "settings": QUICK_SETTINGS, "output": "out/three.mp4"},
    ]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    servers = [triton_server, second_server]
    done_before = [done_jobs(server) for server in servers]
    command = ["queue", str(jobs_file), "--server", ",".join(s.grpc_address for s in servers), "--per-server", "2"]

    assert cli.main(command) == 1
    summary = capsys.readouterr().out.splitlines()
    rows = {int(line.split()[0]): line for line in summary[1:-1]}
    assert [rows[n].split()[1] for n in (1, 2, 3, 4)] == ["done", "failed", "done", "done"]
    assert "INVALID_ARGUMENT: steps=1000 is not allowed: expected int in [1, 100]" in rows[2]
    assert summary[-1] == "3 done, 1 failed"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "one.json", "one.mp4", "three.json", "three.mp4", "two.json", "two.mp4"]
    done_now = counted(servers, sum(done_before) + 3)
    assert sum(done_now) - sum(done_before) == 3
    assert all(now > before for now, before in zip(done_now, done_before))  # both servers worked
    for job in (jobs[0], jobs[2], jobs[3]):
        record = read_record(tmp_path / job["output"])
        assert record["sent"] == {"prompt": job["prompt"], "parameters": job["settings"]}
        assert record["crf"] == job.get("crf", 16)
        assert len(mp4_frames(tmp_path / job["output"])) == record["final"]["frame_count"]
    assert read_record(tmp_path / "out/one.mp4")["final"]["seed"] == 1

    # Run again: the three finished jobs are skipped (no new job on either server), the bad one fails again.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert cli.main(command) == 1
    summary = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in summary[1:-1]] == ["skipped", "failed", "skipped", "skipped"]
    assert summary[-1] == "3 skipped, 1 failed"
    assert [done_jobs(server) for server in servers] == done_now
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes


def test_the_web_ui_records_its_video_and_its_queue_runs_jobs_on_the_server(triton_server, start_image, tmp_path):
    request = WireRequest(load_image(start_image).pixels, "a person waves", QUICK_SETTINGS)
    updates = list(page_job(triton_server.grpc_address, request, tmp_path / "page", lambda: False, 16,
                            ImageFile.of(start_image)))
    last = updates[-1]
    assert last.status.startswith("Done") and last.record == read_record(last.final)
    assert last.record["final"]["parameters"]["seed"] == 31337 and last.record["image"]["path"] == str(start_image)

    jobs = PageQueue(triton_server.grpc_address, tmp_path / "ui")
    jobs.add(JobFiles(image=start_image), "a person waves", {**QUICK_SETTINGS, "seed": 3}, 16)
    jobs.add(JobFiles(image=start_image), "a person jumps", {**QUICK_SETTINGS, "seed": 4}, 16)
    assert jobs.cancel(2) == "Job 2 cancelled."
    deadline = time.monotonic() + 120
    while jobs.rows()[0][2] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert [row[:3] for row in jobs.rows()] == [[1, "a person waves", "done"], [2, "a person jumps", "cancelled"]]
    [result] = jobs.results()
    assert result == str(tmp_path / "ui" / "queue" / "job_001.mp4")
    assert read_record(result)["final"]["seed"] == 3
    assert len(mp4_frames(Path(result))) == read_record(result)["final"]["frame_count"]
