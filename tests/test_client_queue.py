"""`framepack queue`'s jobs file (client/queue.py): every bad line is named with its field;
retries wait for the server's hint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client import queue as jobs_queue
from client import stream
from client.connection import Endpoint
from client.job_files import JobFiles
from client.provenance import read_record
from client.queue import JobsFileError, parse_job, read_jobs
from client.stream import ServerError

GOOD = '{"image": "a.png", "prompt": "a cat", "settings": {"seconds": 1, "teacache": false}, "output": "out/a.mp4"}'


def test_a_jobs_file_resolves_paths_beside_it_and_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(f"# two jobs\n{GOOD}\n\n" + GOOD.replace("a.mp4", "b.mp4").replace("}, ", ', "seed": 4}, ')
                    + "\n")
    jobs = read_jobs(path)
    assert [(job.line, job.output) for job in jobs] == [(2, tmp_path / "out/a.mp4"), (4, tmp_path / "out/b.mp4")]
    assert jobs[0].files == JobFiles(image=tmp_path / "a.png") and jobs[0].prompt == "a cat" and jobs[0].crf == 16
    assert jobs[0].settings == {"seconds": 1, "teacache": False}
    assert jobs[1].settings == {"seconds": 1, "teacache": False, "seed": 4}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "a.png", "prompt": "p", "output": "x.mp4"', "jobs.jsonl:3: not JSON"),
        ('["a.png"]', "jobs.jsonl:3: expected a JSON object, got list"),
        ('{"image": "a.png", "output": "x.mp4"}', "jobs.jsonl:3: field 'prompt' is missing"),
        ('{"image": "a.png", "prompt": "", "output": "x.mp4"}', "jobs.jsonl:3: field 'prompt': \"\" is not allowed"),
        ('{"image": "a.png", "prompt": "p", "output": 5}', "jobs.jsonl:3: field 'output': 5 is not allowed"),
        ('{"image": "a.png", "prompt": "p", "output": "x.mp4", "setings": {}}',
         "jobs.jsonl:3: field 'setings' is not a job field"),
        ('{"image": "a.png", "prompt": "p", "output": "x.mp4", "settings": [1]}', "jobs.jsonl:3: field 'settings'"),
        ('{"image": "a.png", "prompt": "p", "output": "x.mp4", "settings": {"steps": [1]}}',
         "setting 'steps'"),
        ('{"image": "a.png", "prompt": "p", "output": "x.mp4", "settings": {"seed": "random"}}',
         "a number for 'seed'"),
        ('{"image": "a.png", "prompt": "p", "output": "x.mp4", "crf": 99}', "jobs.jsonl:3: field 'crf': 99"),
        ('{"image": "a.png", "video": "a.mp4", "prompt": "p", "output": "x.mp4"}',
         "jobs.jsonl:3: field 'video' is not allowed with field 'image'"),
        (GOOD, "jobs.jsonl:3: field 'output': .*a.mp4 is also the output of line 1"),
    ],
    ids=["not-json", "not-object", "no-prompt", "empty-prompt", "output-not-string", "unknown-field",
         "settings-not-object", "setting-not-scalar", "random-seed", "crf-range", "video-and-image", "same-output"],
)
def test_a_bad_line_is_named_with_its_number_and_field(tmp_path, line, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n")
    with pytest.raises(JobsFileError, match=message):
        read_jobs(path)


def test_an_empty_or_missing_jobs_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("# nothing\n")
    with pytest.raises(JobsFileError, match="no jobs"):
        read_jobs(tmp_path / "empty.jsonl")
    with pytest.raises(JobsFileError, match="missing.jsonl: cannot be read"):
        read_jobs(tmp_path / "missing.jsonl")


def test_retries_wait_for_the_servers_hint_or_back_off():
    busy = ServerError("UNAVAILABLE", "the server is busy (1 running, 4 waiting); retry in about 42 s "
                       "(an estimate from how long the last 5 jobs ran)")
    assert jobs_queue.retry_delay(busy, 1) == 42.0
    lost = ServerError("UNAVAILABLE", "lost the connection")
    assert [jobs_queue.retry_delay(lost, n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 60.0]
    assert jobs_queue.retry_delay(ServerError("UNAVAILABLE", "retry in about 1 s"), 4) == 8.0


def test_server_lists():
    assert jobs_queue.server_list("a:1, b:2") == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="separated by commas"):
        jobs_queue.server_list("a:1,,b")


def test_parse_job_alone_names_the_line(tmp_path):
    with pytest.raises(JobsFileError, match="line 7: field 'output' is missing"):
        parse_job('{"prompt": "p"}', 7, tmp_path)


class FlakyServer:
    """A stand-in for stream.generate: refuses as `errors` say, then streams a 3-frame video."""

    def __init__(self, *errors: ServerError):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, endpoint, request, cancel=None):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        frames = np.full((3, 32, 32, 3), 100, np.uint8)
        yield stream.Section(1, 1, 0, 3, 30, frames)
        yield stream.Final(3, 30, 32, 32, 5, {}, {}, parameters={"prompt": request.prompt, "seed": 5})


@pytest.fixture
def one_job(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    return parse_job('{"image": "a.png", "prompt": "p", "output": "a.mp4", "settings": {"seed": 5}}', 1, tmp_path)


def test_unavailable_is_retried_after_the_hint_and_the_video_written_once(monkeypatch, one_job):
    busy = ServerError("UNAVAILABLE", "the server is busy; retry in about 0 s (an estimate)")
    server = FlakyServer(busy, ServerError("UNAVAILABLE", "lost the connection"))
    monkeypatch.setattr(jobs_queue.stream, "generate", server)
    monkeypatch.setattr(jobs_queue, "FIRST_BACKOFF_S", 0.01)
    outcome = jobs_queue.run_job(Endpoint("localhost:1"), one_job, jobs_queue.Outcome(one_job), retries=2)
    assert (outcome.status, outcome.attempts, server.calls) == ("done", 3, 3)
    assert read_record(one_job.output)["final"]["seed"] == 5
    again = jobs_queue.run_job(Endpoint("localhost:1"), one_job, jobs_queue.Outcome(one_job))
    assert (again.status, server.calls) == ("skipped", 3)  # its output records this very job


def test_other_errors_and_spent_retries_fail_the_job(monkeypatch, one_job):
    monkeypatch.setattr(jobs_queue, "FIRST_BACKOFF_S", 0.01)
    server = FlakyServer(ServerError("INVALID_ARGUMENT", "steps=0 is not allowed"))
    monkeypatch.setattr(jobs_queue.stream, "generate", server)
    outcome = jobs_queue.run_job(Endpoint("localhost:1"), one_job, jobs_queue.Outcome(one_job), retries=3)
    assert (outcome.status, outcome.message, server.calls) == ("failed", "INVALID_ARGUMENT: steps=0 is not allowed", 1)
    server = FlakyServer(*[ServerError("UNAVAILABLE", "down")] * 3)
    monkeypatch.setattr(jobs_queue.stream, "generate", server)
    outcome = jobs_queue.run_job(Endpoint("localhost:1"), one_job, jobs_queue.Outcome(one_job), retries=2)
    assert (outcome.status, outcome.message, server.calls) == ("failed", "UNAVAILABLE: down", 3)
    assert not one_job.output.exists()
