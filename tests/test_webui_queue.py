"""The web UI's queue and settings record (client/webui_queue.py, client/webui.py helpers),
without a browser: jobs run in the order added, one at a time; waiting and running jobs
can be cancelled; only finished jobs are offered for download."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from client.job_files import JobFiles
from client.webui_queue import PageQueue, page_job_files
from framepack_backend.presets import FLOW_PRESETS, PRESETS
from framepack_backend.settings import describe_settings
from framepack_wire import DescribeMeta


class GatedRun:
    """A stand-in for client.queue.run_job: each job waits for its gate, or its stop flag."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.jobs: list = []
        self.gates: dict[int, threading.Event] = {}

    def __call__(self, endpoint, job, outcome, *, stop):
        self.started.append(job.line)
        self.jobs.append(job)
        gate = self.gates.setdefault(job.line, threading.Event())
        while not gate.wait(0.01):
            if stop.is_set():
                outcome.status, outcome.message = "cancelled", "stopped before it finished"
                return outcome
        outcome.status, outcome.message = "done", f"seed {job.settings.get('seed')}"
        return outcome


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_jobs_run_in_order_can_be_cancelled_and_only_finished_ones_are_offered(tmp_path):
    run = GatedRun()
    jobs = PageQueue("localhost:1", tmp_path, run=run)
    for seed in (1, 2, 3):
        jobs.add(JobFiles(image=tmp_path / "start.png"), f"prompt {seed}", {"seed": seed}, 16)
    wait_for(lambda: run.started == [1])
    assert [row[2] for row in jobs.rows()] == ["running", "waiting", "waiting"]
    assert jobs.cancel(3) == "Job 3 cancelled."
    run.gates.setdefault(1, threading.Event()).set()
    wait_for(lambda: run.started == [1, 2])
    assert jobs.cancel(2) == "Job 2 cancelled."
    wait_for(lambda: jobs.rows()[1][2] == "cancelled")
    assert jobs.rows() == [[1, "prompt 1", "done", "seed 1"],
                           [2, "prompt 2", "cancelled", "stopped before it finished"],
                           [3, "prompt 3", "cancelled", "before it started"]]
    assert run.started == [1, 2]  # job 3 never ran
    assert jobs.results() == [str(tmp_path / "queue" / "job_001.mp4")]
    assert jobs.cancel(1) == "Job 1 is done; nothing to cancel."
    assert jobs.cancel(9) == "There is no job 9."


def test_a_queued_job_takes_the_pages_inputs_as_the_generate_button_would(tmp_path):
    pytest.importorskip("gradio")
    from client.webui import page_job

    keyframes = [(1.5, tmp_path / "k.png")]
    assert page_job_files("s.png", None, False, "e.png") == JobFiles(image=Path("s.png"), end_image=Path("e.png"))
    assert page_job_files(None, "clip.mp4", False, None) == JobFiles(video=Path("clip.mp4"))
    assert page_job_files("s.png", None, True, None) == JobFiles()  # ticked text to video: no start image
    with pytest.raises(ValueError, match="not both"):
        page_job_files("s.png", "clip.mp4", False, None)
    with pytest.raises(ValueError, match="Upload a start image"):
        page_job_files(None, None, False, "e.png")
    # Generate and Add to queue read the page alike: keyframes paired with their times, the sliders' LoRAs.
    names, loras = ["seed", "keyframe_times"], ["style"]
    files, settings, crf, times = page_job(names, loras, None, "clip.mp4", None, False, "e.png",
                                           [str(tmp_path / "k.png")], [5, "1.5", 0.8])
    assert files == JobFiles(video=Path("clip.mp4"), end_image=Path("e.png"), keyframes=tuple(keyframes))
    assert (settings, crf, times) == ({"seed": 5, "loras": "style:0.8"}, 16, "1.5")
    with pytest.raises(ValueError, match="^Upload a start image"):  # the uploads first, even with bad times
        page_job(names, loras, None, None, None, False, None, [], [5, "1, 2", 0])
    with pytest.raises(ValueError, match="^Error: keyframe times '1, 2'"):
        page_job(names, loras, "s.png", None, None, False, None, [str(tmp_path / "k.png")], [5, "1, 2", 0])
    run = GatedRun()
    jobs = PageQueue("localhost:1", tmp_path, run=run)
    jobs.add(files, "he walks on", {"loras": "style:0.8"}, 16)
    wait_for(lambda: run.started == [1])
    assert run.jobs[0].files == files and run.jobs[0].settings == {"loras": "style:0.8"}
    run.gates[1].set()
    wait_for(lambda: jobs.rows()[0][2] == "done")


def test_a_job_whose_run_raises_fails_and_the_queue_goes_on(tmp_path):
    def run(endpoint, job, outcome, *, stop):
        if job.line == 1:
            raise AttributeError("a bug")
        outcome.status, outcome.message = "done", "ok"
        return outcome

    jobs = PageQueue("localhost:1", tmp_path, run=run)
    for seed in (1, 2):
        jobs.add(JobFiles(image=tmp_path / "start.png"), f"prompt {seed}", {"seed": seed}, 16)
    wait_for(lambda: jobs.rows()[1][2] == "done")
    assert jobs.rows()[0][2:] == ["failed", "internal error in the page's queue: AttributeError: a bug"]


def test_the_page_builds_with_the_queue_and_the_settings_record(tmp_path):
    pytest.importorskip("gradio")
    from client import webui

    description = DescribeMeta(describe_settings(), {n: p.as_settings() for n, p in PRESETS.items()},
                               list(FLOW_PRESETS))
    app = webui.build_app("localhost:1", description, tmp_path)
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"enqueue", "queue", "results", "used", "load"} <= ids
    settings, crf = webui.page_settings(["seed", "crf", "steps"], "Dance", [7, 20, None])
    assert (settings, crf) == ({"seed": 7, "preset": "Dance"}, 20)
    record = {"crf": 20, "image": {"path": "/a.png", "sha256": "0" * 64},
              "final": {"seed": 7, "parameters": {"seed": 7}, "model": {"sha256": "f" * 64}, "versions": {"t": "1"},
                        "settings": {}}}
    assert webui.shown_record(record) == {"seed": 7, "parameters": {"seed": 7}, "crf": 20, "model": "f" * 64,
                                          "versions": {"t": "1"}, "image": {"path": "/a.png", "sha256": "0" * 64}}
