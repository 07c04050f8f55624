"""The wire contract both sides import (framepack_wire): names, status words, event metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import framepack_wire as wire
from client import connection, stream
from framepack_backend.events import GenerationResult, PhaseStarted, SectionFinished, StepProgress, VideoPlanned
from framepack_server import protocol

ROOT = Path(__file__).resolve().parent.parent


def test_the_wire_module_and_the_client_import_neither_torch_nor_the_engine():
    check = ("import sys, framepack_wire, client, client.stream, client.cli; "
             "print(sorted(m for m in ('torch', 'framepack_backend', 'framepack_server') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_both_sides_use_the_one_set_of_names():
    assert (protocol.MODEL_NAME, protocol.IMAGE_INPUT, protocol.EVENT_OUTPUT) == ("framepack", "image", "event")
    assert (protocol.FRAMES_OUTPUT, protocol.PREVIEW_OUTPUT) == ("frames", "preview")
    assert protocol.MODEL_NAME is wire.MODEL_NAME and connection.MODEL_NAME is wire.MODEL_NAME
    assert protocol.Status is wire.Status and stream.Description is wire.DescribeMeta
    assert [s.value for s in wire.Status] == ["INVALID_ARGUMENT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"]
    assert [k.value for k in wire.EventKind] == [
        "progress", "section", "final", "describe", "queued", "plan", "phase"]


@pytest.mark.parametrize("status", list(wire.Status))
def test_error_messages_round_trip_their_status_word(status):
    message = wire.error_message(status, "steps=0 is not allowed: expected int in [1, 100]")
    assert message == f"{status.value}: steps=0 is not allowed: expected int in [1, 100]"
    assert wire.parse_error_message(message) == (status, "steps=0 is not allowed: expected int in [1, 100]")
    error = stream._server_error(InferenceServerException(message), "h:1")
    assert (error.status, error.message) == (status.value, "steps=0 is not allowed: expected int in [1, 100]")


@pytest.mark.parametrize("message", ["", "something else", "NOT_A_STATUS: text", "INTERNAL without a colon"])
def test_messages_without_a_status_word_are_not_parsed(message):
    assert wire.parse_error_message(message) is None


def test_the_server_s_events_are_read_back_by_the_wire_dataclasses():
    progress = protocol.to_wire(StepProgress(2, 3, 4, 5, elapsed_s=1.5, computed=False))
    assert wire.event_from_json(progress.event) == wire.ProgressMeta(2, 3, 4, 5, 1.5, computed=False)
    frames = np.zeros((33, 8, 10, 3), np.uint8)
    section = protocol.to_wire(SectionFinished(1, 2, start_frame=40, frames=frames, total_frames=73, fps=24))
    assert wire.event_from_json(section.event) == wire.SectionMeta(1, 2, 40, 33, 73, fps=24)  # the event's own fps
    final = protocol.to_wire(GenerationResult(np.zeros((73, 8, 10, 3), np.uint8), 30, 10, 8, 5, {"steps": 4}, {}))
    assert wire.event_from_json(json.loads(final.event_bytes().tobytes())) == wire.FinalMeta(
        73, 30, 10, 8, 5, {"steps": 4}, {})
    described = wire.event_from_json(protocol.describe_response().event)
    assert isinstance(described, wire.DescribeMeta) and described.settings["steps"]["default"] == 25


def test_plan_phase_and_queued_events_travel_and_are_read_back():
    planned = protocol.to_wire(VideoPlanned(sections=1, window=9, latent_frames=10, frames=37, fps=30,
                                            width=144, height=112))
    assert planned.event == dict(kind="plan", sections=1, window=9, latent_frames=10, frame_count=37, fps=30,
                                 width=144, height=112)
    plan = wire.event_from_json(planned.event)
    assert plan == wire.PlanMeta(1, 9, 10, 37, 30, 144, 112) and round(plan.seconds, 2) == 1.23
    phase = protocol.to_wire(PhaseStarted("decode", 2, 3, elapsed_s=12.34567))
    assert phase.event == dict(kind="phase", phase="decode", section=2, sections=3, elapsed_s=12.3457)
    assert wire.event_from_json(phase.event) == wire.PhaseMeta("decode", 2, 3, 12.3457)
    queued = protocol.queued_response(position=2, waited_s=10.04)
    assert queued.event == dict(kind="queued", position=2, waited_s=10.0) and queued.tensors == {}
    assert wire.event_from_json(queued.event) == wire.QueuedMeta(2, 10.0)
    with pytest.raises(ValueError, match="^phase=3"):
        wire.event_from_json({**phase.event, "phase": 3})


def test_the_client_skips_kinds_it_does_not_know_and_reads_the_new_ones():
    from test_reliability_units import FakeResult

    assert stream._parse(FakeResult({"kind": "from_the_future", "x": 1})) is None
    assert stream._parse(FakeResult(dict(kind="plan", sections=2, window=9, latent_frames=19, frame_count=73,
                                         fps=30, width=144, height=112))) == stream.Plan(2, 9, 19, 73, 30, 144, 112)
    assert stream._parse(FakeResult(dict(kind="phase", phase="text", section=0, sections=2, elapsed_s=0.5))) == (
        stream.Phase("text", 0, 2, 0.5))
    assert stream._parse(FakeResult(dict(kind="queued", position=1, waited_s=5.0))) == stream.Queued(1, 5.0)
    with pytest.raises(stream.ServerError, match="position="):
        stream._parse(FakeResult(dict(kind="queued", position="1", waited_s=5.0)))


def test_to_json_names_the_kind_first_and_from_json_ignores_unknown_keys():
    meta = wire.SectionMeta(1, 2, 0, 36, 73, 30)
    assert list(meta.to_json()) == ["kind", "section", "sections", "start_frame", "frame_count", "total_frames", "fps"]
    assert wire.SectionMeta.from_json({**meta.to_json(), "added_later": [1]}) == meta


@pytest.mark.parametrize("kind, field, value", [
    ("section", "start_frame", "../x"), ("section", "fps", 29.97), ("progress", "step", True),
    ("final", "seed", "7"), ("final", "width", None), ("progress", "elapsed_s", "1s"),
    ("progress", "computed", 1), ("final", "settings", [1]),
])
def test_from_json_refuses_values_of_the_wrong_type_naming_them(kind, field, value):
    valid = {
        "progress": wire.ProgressMeta(1, 1, 1, 1, 0.5),
        "section": wire.SectionMeta(1, 1, 0, 1, 1, 30),
        "final": wire.FinalMeta(1, 30, 2, 2, 5, {}, {}),
    }[kind].to_json()
    assert wire.event_from_json(valid).to_json() == valid
    with pytest.raises(ValueError, match=f"^{field}="):
        wire.event_from_json({**valid, field: value})


def test_unknown_kinds_and_missing_fields_are_refused():
    with pytest.raises(wire.UnknownEventKind, match="unexpected event kind 'video'"):
        wire.event_from_json({"kind": "video"})
    with pytest.raises(ValueError, match="not a JSON object"):
        wire.event_from_json([1])
    with pytest.raises(KeyError):
        wire.event_from_json({"kind": "final", "fps": 30})


def test_a_wire_request_carries_the_prompt_as_a_parameter():
    image = np.zeros((4, 6, 3), np.uint8)
    request = wire.WireRequest(image, "waves", {"steps": "7"})
    assert request.request_parameters() == {"prompt": "waves", "steps": "7"}
    assert request.image_array().flags.c_contiguous and request.image_array().dtype == np.uint8
    with pytest.raises(ValueError, match="the prompt goes in WireRequest.prompt"):
        wire.WireRequest(image, "waves", {"prompt": "other"})
