"""A job's input files (client/job_files.py): kept in its record by path and SHA-256,
read back and checked by `--from`, read from a jobs file's line by the same rules as the
command line's options, and compared by the queue to tell a finished job."""

from __future__ import annotations

import argparse
import json
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mp4_files import mp4_frames
from PIL import Image

from client import cli, stream
from client import queue as jobs_queue
from client.connection import Endpoint
from client.guides import keyframe_argument
from client.job_files import CLI_NAMES, JobFiles, context_frame_count, file_sha256, input_record
from client.provenance import (
    RecordError,
    job_inputs,
    job_record,
    read_record,
    recorded_files,
    recorded_inputs,
    same_job,
    save_video,
)
from client.queue import JobsFileError, parse_job
from client.video import write_mp4
from framepack_wire import FinalMeta, WireRequest

CLIP_FRAMES = 12
READS = 5  # the fake server's sampling variant reads a clip's last 5 frames


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A clip, a start image, an end image and two keyframes on disk."""
    y, x = np.mgrid[0:48, 0:64]
    clip = np.stack([np.stack([(x * 3 + 9 * t) % 256, y * 4, (x + y) % 256], -1) for t in range(CLIP_FRAMES)])
    paths = {"video": write_mp4(tmp_path / "clip.mp4", clip.astype(np.uint8), 30, crf=0)}
    for name, value in (("image", 40), ("end", 200), ("key1", 90), ("key2", 150)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(np.full((48, 64, 3), value, np.uint8)).save(paths[name])
    return paths


def final_meta() -> FinalMeta:
    parameters = {"prompt": "p", "seed": 9, "steps": 1, "keyframe_times": "0.5,1"}
    return FinalMeta(3, 30, 64, 48, 9, {}, {}, parameters=parameters)


def clip_job(files: dict[str, Path], **options) -> JobFiles:
    return JobFiles(video=files["video"], end_image=files["end"],
                    keyframes=((0.5, files["key1"]), (1.0, files["key2"])), **options)


def test_the_record_keeps_each_file_and_from_reads_them_back_checked(tmp_path, files):
    job = clip_job(files, context_frames=7)
    request = WireRequest(None, "p", {"steps": 1}, video=np.zeros((5, 48, 64, 3), np.uint8))
    record = job_record(request, input_record(job), 16, final_meta())
    save_video(tmp_path / "out.mp4", np.zeros((3, 48, 64, 3), np.uint8), 30, 16, record)
    assert read_record(tmp_path / "out.mp4") == read_record(tmp_path / "out.json") == record
    assert record["image"] is None
    assert record["video"] == {"path": str(files["video"]), "sha256": file_sha256(files["video"]),
                               "context_frames": 7, "frames_sent": 5, "extension_only": False}
    assert record["end_image"] == {"path": str(files["end"]), "sha256": file_sha256(files["end"])}
    assert record["keyframes"] == [{"time": 0.5, "path": str(files["key1"]), "sha256": file_sha256(files["key1"])},
                                   {"time": 1.0, "path": str(files["key2"]), "sha256": file_sha256(files["key2"])}]
    # Back: the same files, the clip's frame count as sent (so the same frames are sent again).
    assert recorded_files(record, "out.mp4") == JobFiles(
        None, files["video"], files["end"], ((0.5, files["key1"]), (1.0, files["key2"])), 5, False)
    again = job_inputs(tmp_path / "out.json", JobFiles(extension_only=True), None, {}, None)
    assert again.files.extension_only and again.files.video == files["video"]
    assert "keyframe_times" not in again.parameters  # the keyframes carry their times


@pytest.mark.parametrize("changed, message", [
    ("video", "the clip {path} changed since (its sha256 differs); give --video"),
    ("end", "the end image {path} changed since (its sha256 differs); give --end-image"),
    ("key2", "the keyframe at 1 s {path} changed since (its sha256 differs); give --keyframe"),
])
def test_a_changed_or_missing_file_is_named_and_a_given_one_replaces_it_unchecked(tmp_path, files, changed,
                                                                                  message):
    record = job_record(WireRequest(None, "p", {}, video=np.zeros((5, 48, 64, 3), np.uint8)),
                        input_record(clip_job(files)), 16, final_meta())
    path = files[changed]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(RecordError, match=f"^out.json: {message.format(path=path)}$".replace("(", r"\(")
                       .replace(")", r"\)")):
        recorded_files(record, "out.json")
    path.unlink()
    with pytest.raises(RecordError, match=f"the .* {path} is missing; give --"):
        recorded_files(record, "out.json")
    given = {"video": JobFiles(image=files["image"]), "end": JobFiles(end_image=files["image"]),
             "key2": JobFiles(keyframes=((2.0, files["image"]),))}[changed]
    replaced = recorded_files(record, "out.json", given)
    if changed == "video":  # a start image given replaces the clip and its options
        assert (replaced.image, replaced.video, replaced.context_frames) == (files["image"], None, None)
    elif changed == "end":
        assert replaced.end_image == files["image"] and replaced.video == files["video"]
    else:  # keyframes given replace all the recorded ones
        assert replaced.keyframes == ((2.0, files["image"]),)


def test_an_older_record_of_an_image_job_still_reads_and_counts_as_the_same_job(files):
    image = {"path": str(files["image"]), "sha256": file_sha256(files["image"])}
    old = {"format": "framepack-record/1", "image": image, "crf": 16, "inputs": ["image"],
           "sent": {"prompt": "p", "parameters": {"seed": 1}}, "final": final_meta().to_json()}
    assert recorded_files(old, "old.json") == JobFiles(image=files["image"])
    assert same_job(old, "p", {"seed": 1}, input_record(JobFiles(image=files["image"])), 16)
    older_clip = {**old, "image": None, "inputs": ["video"]}  # a clip job before clips were kept
    with pytest.raises(RecordError, match="the record does not keep the clip the job was made from; give --video"):
        recorded_files(older_clip, "old.json")


def test_same_job_compares_every_files_content_the_times_and_the_clip_options(files):
    job = clip_job(files)
    record = job_record(WireRequest(None, "p", {"seed": 1}, video=np.zeros((5, 48, 64, 3), np.uint8)),
                        input_record(job), 16, final_meta())
    assert same_job(record, "p", {"seed": 1}, input_record(job), 16)
    job = replace(job, end_image=files["end"].rename(files["end"].with_name("moved.png")))
    assert same_job(record, "p", {"seed": 1}, input_record(job), 16)  # moved, the same bytes: the same job
    other_times = replace(job, keyframes=((0.6, files["key1"]), (1.0, files["key2"])))
    assert not same_job(record, "p", {"seed": 1}, input_record(other_times), 16)
    assert not same_job(record, "p", {"seed": 1}, input_record(replace(job, extension_only=True)), 16)
    assert not same_job(record, "p", {"seed": 1}, input_record(replace(job, context_frames=5)), 16)
    files["video"].write_bytes(files["video"].read_bytes() + b"\0")
    assert not same_job(record, "p", {"seed": 1}, input_record(job), 16)


def test_the_files_a_record_names_are_listed_for_the_web_uis_load_settings(files):
    record = job_record(WireRequest(None, "p", {}, video=np.zeros((5, 48, 64, 3), np.uint8)),
                        input_record(clip_job(files)), 16, final_meta())
    assert recorded_inputs(record) == [f"clip {files['video']}", f"end image {files['end']}",
                                       f"keyframe at 0.5 s {files['key1']}", f"keyframe at 1 s {files['key2']}"]
    assert recorded_inputs({**record, "video": None, "end_image": None, "keyframes": []}) == []  # text to video


# --- the jobs file's fields, checked as the command line's options ---------------------------------


def test_a_jobs_line_takes_every_input_kind(tmp_path):
    clip = parse_job('{"video": "c.mp4", "context_frames": 9, "extension_only": true, "prompt": "p", '
                     '"output": "o.mp4"}', 1, tmp_path)
    assert clip.files == JobFiles(video=tmp_path / "c.mp4", context_frames=9, extension_only=True)
    guided = parse_job('{"image": "a.png", "end_image": "b.png", "keyframes": ["2.4:mid.png", "3s:/x/late.png"], '
                       '"prompt": "p", "output": "o.mp4"}', 2, tmp_path)
    assert guided.files == JobFiles(image=tmp_path / "a.png", end_image=tmp_path / "b.png",
                                    keyframes=((2.4, tmp_path / "mid.png"), (3.0, Path("/x/late.png"))))
    text_to_video = parse_job('{"prompt": "a cat", "settings": {"latent_init": "noise"}, "output": "t.mp4"}', 3,
                              tmp_path)
    assert text_to_video.files == JobFiles() and text_to_video.settings == {"latent_init": "noise"}


def cli_message(option: str, parse, text: str) -> str:
    try:
        parse(text)
    except argparse.ArgumentTypeError as e:
        return str(e)
    raise AssertionError(f"{option} {text!r} was accepted")


@pytest.mark.parametrize("fields, message", [
    ('"keyframes": ["mid.png"]', "field 'keyframes': " + cli_message("--keyframe", keyframe_argument, "mid.png")),
    ('"keyframes": "2:mid.png"', "field 'keyframes': \"2:mid.png\" is not allowed: expected a list"),
    ('"video": "c.mp4", "context_frames": 0', "field 'context_frames': " + cli_message(
        "--context-frames", context_frame_count, "0")),
    ('"video": "c.mp4", "context_frames": true', "field 'context_frames': true is not allowed"),
    ('"video": "c.mp4", "extension_only": "yes"', "field 'extension_only': \"yes\" is not allowed: expected true"),
    ('"image": "a.png", "extension_only": true',
     "field 'context_frames' and field 'extension_only' go with field 'video'"),
    ('"end_image": ""', "field 'end_image': \"\" is not allowed: expected a non-empty string"),
])
def test_a_bad_input_field_is_named_with_the_line_as_the_cli_names_its_option(tmp_path, fields, message):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f'# a comment\n{{"prompt": "p", "output": "o.mp4", {fields}}}\n')
    with pytest.raises(JobsFileError) as caught:
        jobs_queue.read_jobs(jobs)
    assert str(caught.value).startswith(f"{jobs}:2: {message}")
    assert "\n" not in str(caught.value)


def test_the_cli_and_the_jobs_file_refuse_the_same_conflict_in_their_own_words(tmp_path, capsys):
    assert JobFiles(image=Path("a"), video=Path("b")).conflict(CLI_NAMES) == "--video is not allowed with --image"
    code = cli.main(["generate", "--image", str(tmp_path / "a.png"), "--extension-only", "--prompt", "p",
                     "--output", str(tmp_path / "o.mp4")])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == (
        "framepack: error: --context-frames and --extension-only go with --video")


# --- through the CLI and the queue's runner, against a stand-in server ------------------------------


class FakeServer:
    """stream.generate and stream.describe: records each request, streams 3 new frames."""

    def __init__(self):
        self.requests: list[WireRequest] = []

    def describe(self, endpoint):
        return types.SimpleNamespace(video={"sampling": "inverted", "context_frames": {"inverted": READS}})

    def generate(self, endpoint, request, cancel=None):
        self.requests.append(request)
        frames = np.full((3, 48, 64, 3), 10 * len(self.requests), np.uint8)
        yield stream.Section(1, 1, 0, 3, 30, frames)
        parameters = {**request.request_parameters(), "seed": 9}
        yield stream.Final(3, 30, 64, 48, 9, {}, {}, parameters=parameters)


@pytest.fixture
def server(monkeypatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(stream, "describe", fake.describe)
    monkeypatch.setattr(stream, "generate", fake.generate)
    return fake


def test_from_sends_the_recorded_clip_end_image_and_keyframes_again(tmp_path, files, server, capsys):
    first = tmp_path / "first.mp4"
    code = cli.main(["generate", "--video", str(files["video"]), "--end-image", str(files["end"]),
                     "--keyframe", f"0.5:{files['key1']}", "--keyframe", f"1:{files['key2']}", "--prompt", "p",
                     "--output", str(first), "--quiet", "--server", "h:1"])
    assert code == 0, capsys.readouterr().err
    assert len(mp4_frames(first)) == CLIP_FRAMES + 3  # the clip, then the new frames
    code = cli.main(["generate", "--from", str(first), "--output", str(tmp_path / "again.mp4"), "--quiet",
                     "--server", "h:1"])
    assert code == 0, capsys.readouterr().err
    sent, again = server.requests
    assert sent.video.shape == (READS, 48, 64, 3)
    assert sent.input_arrays().keys() == again.input_arrays().keys() == {"video", "end_image", "keyframes"}
    for name, array in sent.input_arrays().items():
        assert np.array_equal(array, again.input_arrays()[name]), name
    assert again.request_parameters() == {**sent.request_parameters(), "seed": 9}
    assert len(mp4_frames(tmp_path / "again.mp4")) == CLIP_FRAMES + 3
    assert read_record(tmp_path / "again.mp4")["video"]["frames_sent"] == READS

    files["key1"].write_bytes(files["key1"].read_bytes() + b"\0")
    capsys.readouterr()
    code = cli.main(["generate", "--from", str(first), "--output", str(tmp_path / "third.mp4"), "--server", "h:1"])
    assert code == cli.EXIT_USAGE and len(server.requests) == 2
    assert capsys.readouterr().err.strip() == (f"framepack: error: {first}: the keyframe at 0.5 s {files['key1']} "
                                               "changed since (its sha256 differs); give --keyframe")


def test_the_queue_runs_a_clip_job_and_redoes_it_only_when_the_clip_changed(tmp_path, files, server):
    line = json.dumps({"video": "clip.mp4", "end_image": "end.png", "prompt": "p", "settings": {"seed": 9},
                       "output": "out/clip.mp4"})
    job = parse_job(line, 1, tmp_path)
    outcome = jobs_queue.run_job(Endpoint("h:1"), job, jobs_queue.Outcome(job))
    assert (outcome.status, len(server.requests)) == ("done", 1), outcome.message
    assert len(mp4_frames(tmp_path / "out/clip.mp4")) == CLIP_FRAMES + 3
    assert server.requests[0].video.shape == (READS, 48, 64, 3) and server.requests[0].end_image is not None
    again = jobs_queue.run_job(Endpoint("h:1"), job, jobs_queue.Outcome(job))
    assert (again.status, len(server.requests)) == ("skipped", 1)
    files["video"].write_bytes(files["video"].read_bytes() + b"\0")  # the same frames, other bytes: another job
    redone = jobs_queue.run_job(Endpoint("h:1"), job, jobs_queue.Outcome(job))
    assert (redone.status, len(server.requests)) == ("done", 2)
    missing = parse_job(line.replace("end.png", "gone.png"), 1, tmp_path)
    failed = jobs_queue.run_job(Endpoint("h:1"), missing, jobs_queue.Outcome(missing))
    assert failed.status == "failed" and failed.message.startswith(f"field 'end_image' {tmp_path / 'gone.png'}: ")
