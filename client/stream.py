"""One generation request over Triton's gRPC stream, as an iterator of typed events.

The wire protocol (see framepack_server/protocol.py on the server side): input `image`
UINT8 H×W×3; `prompt` and settings as request parameters; every response carries
`event` (JSON bytes) and, for progress and section events, `preview` or `frames`.
Errors arrive as one message `STATUS: text` (the stream carries no status code).
A request with the parameter `describe` (and no image) is answered by one `describe`
event: the settings spec and the preset tables.
"""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL_NAME = "framepack"
STATUSES = ("INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL")
# How often the waiting loop wakes up, so Ctrl-C and `cancel` are handled promptly.
POLL_S = 0.2


@dataclass(frozen=True)
class Progress:
    section: int
    sections: int
    step: int
    steps: int
    elapsed_s: float
    preview: np.ndarray | None  # uint8 h×w×3


@dataclass(frozen=True)
class Section:
    section: int
    sections: int
    start_frame: int
    total_frames: int
    fps: int
    frames: np.ndarray  # uint8 T×H×W×3, video frames [start_frame, start_frame + T)


@dataclass(frozen=True)
class Final:
    frame_count: int
    fps: int
    width: int
    height: int
    seed: int
    settings: dict
    timings: dict


Event = Progress | Section | Final


@dataclass(frozen=True)
class Description:
    """What the server accepts, so front ends show the engine's values without importing it."""

    settings: dict[str, dict]  # name -> type, default, low, high, choices, doc
    presets: dict[str, dict]  # preset name -> the settings it sets
    flow_presets: list[str]


class ServerError(Exception):
    """The server refused or failed the request; `status` is e.g. INVALID_ARGUMENT."""

    def __init__(self, status: str, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


def _server_error(text: str) -> ServerError:
    status, _, rest = text.partition(": ")
    if status in STATUSES:
        return ServerError(status, rest)
    return ServerError("UNKNOWN", text)


def _parse(result) -> Event:
    try:
        return _parse_event(result)
    except (KeyError, TypeError, ValueError) as e:
        raise ServerError("UNKNOWN", f"unexpected response from the server ({type(e).__name__}: {e})") from None


def _event_meta(result) -> dict:
    return json.loads(bytes(result.as_numpy("event")).decode("utf-8"))


def _parse_event(result) -> Event:
    meta = _event_meta(result)
    kind = meta["kind"]
    if kind == "progress":
        return Progress(
            meta["section"], meta["sections"], meta["step"], meta["steps"], meta["elapsed_s"],
            result.as_numpy("preview"),
        )
    if kind == "section":
        return Section(
            meta["section"], meta["sections"], meta["start_frame"], meta["total_frames"], meta["fps"],
            result.as_numpy("frames"),
        )
    if kind == "final":
        return Final(
            meta["frame_count"], meta["fps"], meta["width"], meta["height"], meta["seed"], meta["settings"],
            meta["timings"],
        )
    raise ServerError("UNKNOWN", f"unexpected event kind {kind!r} from the server")


def generate(
    server: str,
    image: np.ndarray,
    prompt: str,
    settings: Mapping[str, str | int | float | bool],
    *,
    request_id: str = "",
    cancel: Callable[[], bool] | None = None,
) -> Iterator[Event]:
    """Stream one job's events; ends after `Final` or raises ServerError.

    Leaving the iteration early (an exception, Ctrl-C, `break`) cancels the job on the
    server. So does `cancel` returning True (it is polled at least every POLL_S, also
    while no response arrives): the iteration then ends without `Final`.
    """
    image_input = grpcclient.InferInput("image", list(image.shape), "UINT8")
    image_input.set_data_from_numpy(np.ascontiguousarray(image, dtype=np.uint8))
    parameters = {"prompt": prompt, **settings}
    for result in _responses(server, [image_input], parameters, request_id, cancel):
        yield _parse(result)


def describe(server: str) -> Description:
    """The settings the server accepts and its preset tables (a `describe` request)."""
    for result in _responses(server, [], {"describe": True}):
        try:
            meta = _event_meta(result)
            if meta["kind"] != "describe":
                raise ValueError(f"event kind {meta['kind']!r}")
            return Description(meta["settings"], meta["presets"], meta["flow_presets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError("UNKNOWN", f"unexpected answer to a describe request ({type(e).__name__}: {e})") from None
    raise ServerError("UNKNOWN", "the server answered a describe request with nothing")


def _responses(
    server: str,
    inputs: list[grpcclient.InferInput],
    parameters: Mapping[str, str | int | float | bool],
    request_id: str = "",
    cancel: Callable[[], bool] | None = None,
) -> Iterator[grpcclient.InferResult]:
    """Send one request on a gRPC stream and yield its responses that carry outputs."""
    client = grpcclient.InferenceServerClient(server)
    try:
        _check_ready(client, server)
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        finished = False
        try:
            client.async_stream_infer(
                MODEL_NAME, inputs, request_id=request_id, parameters=dict(parameters),
                enable_empty_final_response=True,
            )
            while not finished:
                if cancel is not None and cancel():
                    return
                try:
                    result, error = responses.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if error is not None:
                    finished = True  # an error is the request's last response
                    raise _server_error(error.message())
                response = result.get_response()
                finished = response.parameters["triton_final_response"].bool_param
                if response.outputs:
                    yield result
        finally:
            # Stopping a stream with the request still running cancels it on the server.
            client.stop_stream(cancel_requests=not finished)
    finally:
        client.close()


def _check_ready(client: grpcclient.InferenceServerClient, server: str) -> None:
    try:
        ready = client.is_model_ready(MODEL_NAME)
    except InferenceServerException as e:
        raise ServerError("UNAVAILABLE", f"cannot reach the server at {server}: {e.message()}") from None
    if not ready:
        raise ServerError("UNAVAILABLE", f"the server at {server} has no ready model {MODEL_NAME!r}")
