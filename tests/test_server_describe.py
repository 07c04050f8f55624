"""The `describe` request: the server hands out the engine's settings spec and preset
tables, so front ends (the web UI) show the same values without importing the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import stream
from framepack_backend.presets import FLOW_PRESETS, PRESETS
from framepack_backend.settings import SamplingSettings, SettingsError, describe_settings
from framepack_server.protocol import describe_response, is_describe_request, request_parameters
from framepack_wire import WireRequest


def test_describe_response_carries_the_engine_tables_as_one_final_json_event():
    response = describe_response()
    assert response.final and response.tensors == {}
    event = json.loads(response.event_bytes().tobytes().decode("utf-8"))
    assert event["kind"] == "describe"
    assert event["presets"]["Dance"] == {
        "teacache": False, "steps": 30, "gs": 12.0, "gpu_memory_preservation": 6.0, "flow_preset": "dance",
    }
    assert event["presets"] == {name: preset.as_settings() for name, preset in PRESETS.items()}
    assert event["flow_presets"] == list(FLOW_PRESETS)
    assert event["settings"] == json.loads(json.dumps(describe_settings()))
    assert event["settings"]["steps"] == {
        "type": "int", "default": 25, "low": 1, "high": 100, "choices": None, "doc": "sampling steps per section",
    }


@pytest.mark.parametrize("parameters, expected", [
    ({"describe": True}, True), ({"describe": "true"}, True), ({"prompt": "x", "steps": 3}, False), ({}, False),
])
def test_describe_requests_are_recognised(parameters, expected):
    assert is_describe_request(parameters) is expected


@pytest.mark.parametrize("value", [False, "yes", 2])
def test_describe_with_another_value_names_the_parameter(value):
    with pytest.raises(SettingsError) as caught:
        is_describe_request({"describe": value})
    assert caught.value.field == "describe" and "true" in caught.value.allowed


def test_request_parameters_must_be_a_json_object():
    assert request_parameters('{"describe": true}') == {"describe": True}
    assert request_parameters("") == {}
    with pytest.raises(SettingsError, match="parameters="):
        request_parameters("[1, 2]")


@pytest.mark.server
def test_the_server_describes_its_settings_and_presets(triton_server):
    description = stream.describe(triton_server.grpc_address)
    assert description.presets == {name: preset.as_settings() for name, preset in PRESETS.items()}
    assert description.flow_presets == list(FLOW_PRESETS)
    assert description.settings["resolution"]["default"] == SamplingSettings().resolution
    assert list(description.settings) == list(describe_settings())


@pytest.mark.server
def test_a_request_without_an_image_is_text_to_video_and_its_settings_are_checked(triton_server):
    errors = []
    client = grpcclient.InferenceServerClient(triton_server.grpc_address)
    client.start_stream(callback=lambda result, error: errors.append(error))
    client.async_stream_infer("framepack", [], parameters={"prompt": "x", "latent_init": "green"},
                              enable_empty_final_response=True)
    client.stop_stream()  # waits for the request's responses
    client.close()
    assert len(errors) == 1 and errors[0] is not None
    assert errors[0].message() == (
        "INVALID_ARGUMENT: latent_init='green' is not allowed: expected one of 'black', 'white', 'noise'"
    )


@pytest.mark.server
def test_a_bad_describe_value_is_refused(triton_server):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(stream.ServerError) as caught:
        list(stream.generate(triton_server.grpc_address, WireRequest(image, "x", {"describe": "yes"})))
    assert caught.value.status == "INVALID_ARGUMENT" and caught.value.message.startswith("describe='yes'")
