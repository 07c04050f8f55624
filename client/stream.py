"""One generation request over Triton's gRPC stream, as an iterator of typed events.

The wire protocol (names and event metadata in framepack_wire, which the server imports
too; described in framepack_server/protocol.py): input `image` UINT8 H×W×3; `prompt` and
settings as request parameters (a `WireRequest`); every response carries `event` (JSON
bytes) and, for progress and section events, `preview` or `frames`. Errors arrive as one
message `STATUS: text` (the stream carries no status code). Events of a kind this client
does not know (from a newer server) are skipped; older servers send no `queued`, `plan`
or `phase` events.
`server` is an address `HOST:PORT` or a `connection.Endpoint` (TLS, connect timeout);
connecting waits for a (re)starting server with backoff (connection.py).
A request with the parameter `describe` (and no image) is answered by one `describe`
event: the settings spec and the preset tables.
"""

from __future__ import annotations

import json
import queue
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from framepack_wire import (
    DESCRIBE_PARAMETER,
    EVENT_OUTPUT,
    FRAMES_OUTPUT,
    MODEL_NAME,
    PREVIEW_OUTPUT,
    DescribeMeta,
    FinalMeta,
    PhaseMeta,
    PlanMeta,
    ProgressMeta,
    QueuedMeta,
    SectionMeta,
    Status,
    UnknownEventKind,
    WireRequest,
    event_from_json,
    parse_error_message,
)

from .connection import Endpoint, Unreachable, as_endpoint, ready_client

# Requests that break the model config (dtype, shape, name or number of inputs) are
# refused by Triton itself, before our model sees them, with messages such as
# "unexpected shape for input 'image' for model 'framepack'. Expected [-1,-1,3], got
# [64,64]" or "inference input 'image' data-type is 'FP32', but model 'framepack'
# expects 'UINT8'".
TRITON_INPUT_ERROR = re.compile(r"input.*for model '|model '[^']*' expects")
# Triton's answer while the model's backend process is dead (the launcher restarts it).
TRITON_STUB_DIED = re.compile(r"Stub process '[^']*' is not healthy")
# Triton's refusal of a request without the right API key (--grpc-restricted-protocol).
TRITON_RESTRICTED = re.compile(r"This protocol is restricted, expecting header")
API_KEY_REFUSED = ("the server requires an API key and this request carried {what}: pass --api-key-file FILE "
                   "or set FRAMEPACK_API_KEY")
# How often the waiting loop wakes up, so Ctrl-C and `cancel` are handled promptly.
POLL_S = 0.2


# The events without image data are the wire's metadata as they are.
Queued = QueuedMeta  # the job waits on the server: `position` jobs run or wait before it (1: it is next)
Plan = PlanMeta  # the video the job will make (whole sections, so often longer than the seconds asked for)
Phase = PhaseMeta  # a phase begins: "text", "image" (section 0), then "sampling" and "decode" of each section
Final = FinalMeta  # the job's end: the video's size and rate, the seed, every setting used, timings


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


Event = Queued | Plan | Phase | Progress | Section | Final
# What the server accepts: settings (name -> type, default, low, high, choices, doc),
# presets (name -> the settings it sets) and flow_presets.
Description = DescribeMeta


class ServerError(Exception):
    """The server refused or failed the request; `status` is e.g. INVALID_ARGUMENT."""

    def __init__(self, status: str, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


class ServerLost(ServerError):
    """The server, or its model process, went away while answering; it may be back soon."""

    def __init__(self, message: str):
        super().__init__("UNAVAILABLE", message)


def _server_error(error: InferenceServerException, address: str, what_key: str = "none") -> ServerError:
    """The stream's error as a ServerError with a status word.

    Our model prefixes its messages with the status. Triton's own refusals carry none,
    and a broken connection comes as a gRPC status instead of a message from the server.
    """
    text = error.message() or ""
    parsed = parse_error_message(text)
    if parsed is not None:
        status, rest = parsed
        return ServerError(status.value, rest)
    if TRITON_INPUT_ERROR.search(text):
        return ServerError(Status.INVALID_ARGUMENT.value, text)
    if TRITON_RESTRICTED.search(text):
        return ServerError("UNAUTHENTICATED", API_KEY_REFUSED.format(what=what_key))
    if TRITON_STUB_DIED.search(text):
        return ServerLost(f"the server's model process died ({text}); retry once it has restarted")
    if error.status() is not None:  # from gRPC itself: the server went away mid-request
        return ServerLost(f"lost the connection to the server at {address} ({error.status()}: {text})")
    return ServerError("UNKNOWN", text)


def _parse(result) -> Event | None:
    """The response's event; None for a kind this client does not know (skipped)."""
    try:
        return _parse_event(result)
    except UnknownEventKind:
        return None
    except (KeyError, TypeError, ValueError) as e:
        raise ServerError("UNKNOWN", f"unexpected response from the server ({type(e).__name__}: {e})") from None


def _event_meta(result) -> dict:
    return json.loads(bytes(result.as_numpy(EVENT_OUTPUT)).decode("utf-8"))


def _parse_event(result) -> Event:
    """The event of one response; the metadata's numbers are checked by framepack_wire
    (integers only: they end up in file names, so they must not carry a path)."""
    meta = event_from_json(_event_meta(result))
    if isinstance(meta, (QueuedMeta, PlanMeta, PhaseMeta, FinalMeta)):
        return meta
    if isinstance(meta, ProgressMeta):
        return Progress(meta.section, meta.sections, meta.step, meta.steps, meta.elapsed_s,
                        result.as_numpy(PREVIEW_OUTPUT))
    if isinstance(meta, SectionMeta):
        return Section(meta.section, meta.sections, meta.start_frame, meta.total_frames, meta.fps,
                       result.as_numpy(FRAMES_OUTPUT))
    raise ServerError("UNKNOWN", f"unexpected event kind {meta.kind.value!r} from the server")


def generate(
    server: str | Endpoint,
    request: WireRequest,
    *,
    request_id: str = "",
    cancel: Callable[[], bool] | None = None,
) -> Iterator[Event]:
    """Stream one job's events; ends after `Final` or raises ServerError.

    Leaving the iteration early (an exception, Ctrl-C, `break`) cancels the job on the
    server. So does `cancel` returning True (it is polled at least every POLL_S, also
    while no response arrives): the iteration then ends without `Final`.
    """
    inputs = []
    for name, array in request.input_arrays().items():  # image (absent for text-to-video), video, end_image, keyframes
        tensor = grpcclient.InferInput(name, list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    for result in _responses(server, inputs, request.request_parameters(), request_id, cancel):
        event = _parse(result)
        if event is not None:
            yield event


def describe(server: str | Endpoint) -> Description:
    """The settings the server accepts and its preset tables (a `describe` request).

    Idempotent, so asked again once when the server went away while answering.
    """
    try:
        return _describe(server)
    except ServerLost:
        return _describe(server)  # connecting waits for the restarted server


def _describe(server: str | Endpoint) -> Description:
    for result in _responses(server, [], {DESCRIBE_PARAMETER: True}):
        try:
            meta = event_from_json(_event_meta(result))
            if not isinstance(meta, DescribeMeta):
                raise ValueError(f"event kind {meta.kind.value!r}")
            return meta
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError("UNKNOWN", f"unexpected answer to a describe request ({type(e).__name__}: {e})") from None
    raise ServerError("UNKNOWN", "the server answered a describe request with nothing")


def _responses(
    server: str | Endpoint,
    inputs: list[grpcclient.InferInput],
    parameters: Mapping[str, str | int | float | bool],
    request_id: str = "",
    cancel: Callable[[], bool] | None = None,
) -> Iterator[grpcclient.InferResult]:
    """Send one request on a gRPC stream and yield its responses that carry outputs."""
    endpoint = as_endpoint(server)
    try:
        client = ready_client(endpoint)
    except Unreachable as e:
        raise ServerError("UNAVAILABLE", str(e)) from None
    try:
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            headers=endpoint.headers())
        finished = False
        try:
            try:
                client.async_stream_infer(
                    MODEL_NAME, inputs, request_id=request_id, parameters=dict(parameters),
                    enable_empty_final_response=True,
                )
            except InferenceServerException:
                pass  # the stream was refused already (an API key missing): its callback has the reason
            while not finished:
                if cancel is not None and cancel():
                    return
                try:
                    result, error = responses.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if error is not None:
                    finished = True  # an error is the request's last response
                    raise _server_error(error, endpoint.address, "a wrong one" if endpoint.api_key else "none")
                response = result.get_response()
                finished = response.parameters["triton_final_response"].bool_param
                if response.outputs:
                    yield result
        finally:
            # Stopping a stream with the request still running cancels it on the server.
            client.stop_stream(cancel_requests=not finished)
    finally:
        client.close()

