"""What a job reports so it can be repeated (framepack_backend/provenance.py), through the
final event (framepack_server/protocol.py, framepack_wire), into the client's record
(client/provenance.py: the MP4's tag and the JSON beside it), and back into a request."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from client import provenance
from client.job_files import JobFiles, input_record
from client.provenance import ImageFile, RecordError, job_inputs, job_record, read_record, repeat_request, save_video
from framepack_backend import provenance as engine_provenance
from framepack_backend.events import GenerationResult
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest, parse_request
from framepack_server.protocol import to_wire
from framepack_wire import FinalMeta, WireRequest, event_from_json

COMPONENTS = ("text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer")


# --- model identity ----------------------------------------------------------------------


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_model_identity_names_every_component_and_is_stable_across_loads(tiny_bundle):
    first = Pipeline.from_pretrained(tiny_bundle, device="cpu").model_identity
    second = Pipeline.from_pretrained(tiny_bundle, device="cpu").model_identity
    assert first == second == engine_provenance.model_identity(tiny_bundle)
    assert tuple(first["components"]) == COMPONENTS
    assert all(len(digest) == 64 for digest in [first["sha256"], *first["components"].values()])
    assert len(set(first["components"].values())) == len(COMPONENTS)


def test_model_identity_changes_with_a_config(bundle_copy):
    before = engine_provenance.model_identity(bundle_copy)
    config_path = bundle_copy / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = config.get("scaling_factor", 1.0) + 0.5
    config_path.write_text(json.dumps(config))
    after = engine_provenance.model_identity(bundle_copy)
    assert after["sha256"] != before["sha256"]
    changed = [name for name in COMPONENTS if after["components"][name] != before["components"][name]]
    assert changed == ["vae"]


def test_model_identity_changes_with_a_safetensors_header_not_with_other_files(bundle_copy):
    before = engine_provenance.model_identity(bundle_copy)
    (bundle_copy / "transformer" / "README.md").write_text("notes")  # not config, not weights
    assert engine_provenance.model_identity(bundle_copy) == before
    weights = sorted((bundle_copy / "transformer").glob("*.safetensors"))[0]
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = {**header.get("__metadata__", {}), "note": "fine-tuned"}
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    weights.write_bytes(struct.pack("<Q", len(new_header)) + new_header + data[8 + length :])
    after = engine_provenance.model_identity(bundle_copy)
    changed = [name for name in COMPONENTS if after["components"][name] != before["components"][name]]
    assert changed == ["transformer"]


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="header cut short"):
        engine_provenance.safetensors_header(bad)


# --- the request's parameters --------------------------------------------------------------


def test_to_parameters_resolves_every_setting_and_asks_for_the_same_job(image):
    request = GenerationRequest.parse(image, "a cat", preset="Dance", steps="7", attention="sdpa", crf=20)
    parameters = request.to_parameters()
    assert parameters["prompt"] == "a cat"
    assert parameters["steps"] == 7 and parameters["seed"] == 31337 and parameters["seconds"] == 5.0
    assert parameters["preset"] == "Dance" and parameters["attention"] == "sdpa"
    assert "crf" not in parameters  # the client's own: it records it itself
    again = parse_request(image, json.loads(json.dumps(parameters)))
    assert again.settings == request.settings and again.engine == request.engine and again.prompt == "a cat"
    assert again.to_parameters() == parameters


def test_parameters_the_engine_does_not_resolve_travel_as_accepted(image):
    request = GenerationRequest(image, "a cat", parameters={"prompt": "a cat", "future_field": "x:0.5"})
    assert request.to_parameters()["future_field"] == "x:0.5"


def test_the_pipelines_result_carries_parameters_model_and_versions(tiny_bundle, image):
    pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu")
    request = GenerationRequest.parse(image, "a cat", resolution=128, steps=1, seconds=0.5, seed=5)
    result = list(pipeline.generate(request))[-1]
    assert isinstance(result, GenerationResult)
    assert result.parameters == request.to_parameters() and result.parameters["seed"] == 5
    assert result.model == pipeline.model_identity
    assert set(result.versions) == {"framepack-serving", "torch", "diffusers", "transformers"}
    assert result.versions["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]


def test_the_final_event_carries_them_over_the_wire_and_older_servers_send_none():
    result = GenerationResult(np.zeros((3, 8, 8, 3), np.uint8), 30, 8, 8, 9, {"steps": 1}, {"total_s": 1.0},
                              parameters={"prompt": "p", "seed": 9}, model={"sha256": "ab"},
                              versions={"torch": "2"})
    meta = event_from_json(json.loads(to_wire(result).event_bytes().tobytes()))
    assert isinstance(meta, FinalMeta)
    assert (meta.parameters, meta.model, meta.versions) == ({"prompt": "p", "seed": 9}, {"sha256": "ab"},
                                                            {"torch": "2"})
    old = {k: v for k, v in meta.to_json().items() if k not in ("parameters", "model", "versions")}
    assert event_from_json(old) == FinalMeta(3, 30, 8, 8, 9, {"steps": 1}, {"total_s": 1.0})
    with pytest.raises(ValueError, match="model"):
        event_from_json({**old, "model": "x"})


# --- the client's record -------------------------------------------------------------------


def final_meta(**parameters) -> FinalMeta:
    return FinalMeta(4, 30, 64, 48, 123, {"steps": 2}, {"total_s": 0.5},
                     parameters={"prompt": "a dog", "seed": 123, "steps": 2, **parameters},
                     model={"sha256": "f" * 64}, versions={"torch": "2.9"})


@pytest.fixture
def start_image(tmp_path) -> Path:
    path = tmp_path / "start.png"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(path)
    return path


def video() -> np.ndarray:
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([np.stack([x * 3 + t, y * 4, (x + y + 10 * t) % 256], -1) for t in range(4)]).astype(np.uint8)


def test_the_record_round_trips_through_the_mp4_tag_and_the_json_beside_it(tmp_path, start_image):
    request = WireRequest(np.zeros((48, 64, 3), np.uint8), "a dog", {"steps": "2"})
    record = job_record(request, ImageFile.of(start_image), 18, final_meta())
    saved = save_video(tmp_path / "out.mp4", video(), 30, 18, record)
    assert saved.path == tmp_path / "out.mp4" and not saved.fell_back
    assert read_record(tmp_path / "out.mp4") == read_record(tmp_path / "out.json") == record
    assert record["final"] == final_meta().to_json()
    assert record["image"] == {"path": str(start_image.absolute()), "sha256": provenance.file_sha256(start_image)}
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert json.loads(container.metadata["comment"]) == record
        assert len(list(container.decode(video=0))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.mp4", "start.png"]  # no temporary left
    inputs = input_record(JobFiles(image=start_image))
    assert provenance.same_job(record, "a dog", {"steps": "2"}, inputs, 18)
    assert not provenance.same_job(record, "a dog", {"steps": "2"}, inputs, 19)
    assert not provenance.same_job(record, "a dog", {"steps": 3}, inputs, 18)


def test_an_mp4_without_a_record_is_refused_by_name(tmp_path):
    from client.video import write_mp4

    plain = write_mp4(tmp_path / "plain.mp4", video(), 30)
    with pytest.raises(RecordError, match="plain.mp4: cannot read its record"):
        read_record(plain)
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(RecordError, match="not a FramePack record"):
        read_record(tmp_path / "other.json")


def test_repeat_uses_the_reported_parameters_and_older_servers_the_sent_ones_with_the_seed():
    record = {"sent": {"prompt": "a dog", "parameters": {"steps": "2"}}, "final": final_meta().to_json()}
    assert repeat_request(record) == ("a dog", {"seed": 123, "steps": 2})
    old_final = {**final_meta().to_json(), "parameters": {}}
    assert repeat_request({**record, "final": old_final}) == ("a dog", {"steps": "2", "seed": 123})


def recorded(tmp_path: Path, start_image: Path) -> Path:
    request = WireRequest(np.zeros((48, 64, 3), np.uint8), "a dog", {"steps": "2"})
    save_video(tmp_path / "out.mp4", video(), 30, 18, job_record(request, ImageFile.of(start_image), 18, final_meta()))
    return tmp_path / "out.mp4"


def test_from_repeats_the_job_and_options_given_win(tmp_path, start_image):
    source = recorded(tmp_path, start_image)
    job = job_inputs(source, JobFiles(), None, {}, None)
    assert (job.files, job.prompt, job.parameters, job.crf) == (JobFiles(image=start_image.absolute()), "a dog",
                                                                {"seed": 123, "steps": 2}, 18)
    job = job_inputs(source.with_suffix(".json"), JobFiles(), "a cat", {"steps": "5"}, 30)
    assert (job.prompt, job.parameters, job.crf, job.drawn_seed) == ("a cat", {"seed": 123, "steps": "5"}, 30, None)


def test_an_older_record_without_the_end_images_file_is_refused_unless_one_is_given(tmp_path, start_image):
    image = np.zeros((48, 64, 3), np.uint8)
    request = WireRequest(image, "a dog", {"end_strength": 1}, end_image=image)
    path = tmp_path / "ends.mp4"
    save_video(path, video(), 30, 18, job_record(request, ImageFile.of(start_image), 18, final_meta()))
    assert read_record(path)["inputs"] == ["end_image", "image"] and "end_image" not in read_record(path)
    with pytest.raises(RecordError, match="does not keep the end image the job was made from; give --end-image"):
        job_inputs(path, JobFiles(), None, {}, None)
    assert job_inputs(path, JobFiles(end_image=start_image), None, {}, None).files == JobFiles(
        image=start_image.absolute(), end_image=start_image)


def test_from_refuses_a_missing_or_changed_image_unless_one_is_given(tmp_path, start_image):
    source = recorded(tmp_path, start_image)
    Image.fromarray(np.full((48, 64, 3), 91, np.uint8)).save(start_image)
    with pytest.raises(RecordError, match=r"out.mp4: the start image .*start.png changed since .*give --image"):
        job_inputs(source, JobFiles(), None, {}, None)
    start_image.unlink()
    with pytest.raises(RecordError, match=r"the start image .*start.png is missing; give --image"):
        job_inputs(source, JobFiles(), None, {}, None)
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(other)
    assert job_inputs(source, JobFiles(image=other), None, {}, None).files == JobFiles(image=other)


def test_seed_random_draws_a_seed_and_reports_it(tmp_path, start_image):
    files = JobFiles(image=start_image)
    drawn = {job_inputs(None, files, "p", {"seed": "random"}, None).parameters["seed"] for _ in range(5)}
    assert len(drawn) > 1 and all(isinstance(seed, int) and 0 <= seed < 2**32 for seed in drawn)
    job = job_inputs(recorded(tmp_path, start_image), JobFiles(), None, {"seed": "Random"}, None)
    assert job.parameters["seed"] == job.drawn_seed != 123
    assert job_inputs(None, JobFiles(), "p", {}, None).files == JobFiles()  # no image: text-to-video
    with pytest.raises(ValueError, match="--prompt is required"):
        job_inputs(None, files, None, {}, None)


def test_the_prompt_travels_as_sent(image):
    assert GenerationRequest.parse(image, "  a cat  ").to_parameters()["prompt"] == "  a cat  "
    assert GenerationRequest.parse(image, "a cat".encode()).to_parameters()["prompt"] == "a cat"
