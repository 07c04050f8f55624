"""The wire protocol of the `framepack` Triton model, on the server side.

The names and the event metadata both sides share live in `framepack_wire` (torch-free,
imported by the client too); this module turns requests into a `GenerationRequest` and
the engine's events into responses.

Request: tensor input `image` (UINT8 H×W×3; without it, and without a `video`, the job is
text-to-video from the `latent_init` picture), or instead `video` (UINT8 T×H×W×3, 1 to
MAX_VIDEO_FRAMES of a clip's last frames, which the job extends; it sends only the new
frames, framepack_backend/extension.py), optional `end_image` (UINT8 H×W×3, the video's
last frame; the `loop` setting uses the start image instead) and optional `keyframes`
(UINT8 K×H×W×3, at most 16, at the seconds listed in the `keyframe_times` parameter, e.g.
"1.2,3.6"); each image within the start image's limits. Timed prompts travel inside `prompt`:
`[0s: a cat sits] [2.5s: the cat jumps]` (docs/creative-controls.md). Request parameters: `prompt` (str, required)
and settings by name (str, int, float or bool; strings are parsed by the engine): every
per-job setting (`SamplingSettings`) and the instance-option overrides (`EngineOverrides`:
`attention`, `memory_mode`, `gpu_memory_preservation`, and `sampling`, which must be
`auto` or the loaded variant). Older clients also send `crf`, the MP4's quality, which
is now the client's own option: it is still accepted and range-checked (0..51), then
ignored. Text travels as parameters, not BYTES tensors, because BYTES tensors crash the
Python-backend stub under numpy 2.

Responses (decoupled, one request → many responses), each with output `event`: UTF-8
JSON bytes as a UINT8 vector, `{"kind": ...}` (framepack_wire.events):

- `queued` (sent by the job queue, not the engine; repeated every few seconds while the
  job waits behind others): position (1 = next), waited_s;
- `plan` (a job's first event from the engine, before any model runs): sections, window,
  latent_frames, frame_count, fps, width, height — the video the job will make (sections
  are whole, so it is often longer than the seconds asked for);
- `phase`: phase ("text", "image", then "sampling" and "decode" of each section),
  section (0 before the sections), sections, elapsed_s;
- `progress`: section, sections, step, steps, elapsed_s, computed — plus output
  `preview` (UINT8 h×w×3) when the engine made one;
- `section`: section, sections, start_frame, frame_count, total_frames, fps — plus output
  `frames` (UINT8 T×H×W×3), video frames [start_frame, start_frame + T) that supersede
  earlier ones at those indices;
- `final` (the last response, Triton's FINAL flag): frame_count, fps, width, height,
  seed, settings (all values actually used, the instance options a job ran with
  included), timings, and what repeats the job: parameters (the request's, every setting
  resolved: sent again, they ask for the same video), model (SHA-256 per component of its
  config and safetensors headers), versions (framepack_backend/provenance.py). The frames
  are not repeated: the sections already carried them.

A request with the parameter `describe` true (and no image: the input is optional) is
answered at once by one final `describe` response: `settings` (every setting a request
may carry: type, default, range or choices and help text), `presets` (name → the
settings it sets), `flow_presets`, `loras` (the server's LoRA folder: name,
size_bytes, rank, format; a request names them in `loras` as `NAME[:STRENGTH],...`)
and `video` (the clip limits, and how many of a clip's last frames a job of each
sampling variant reads, with the variant this server loaded),
so front ends show the engine's values without importing it.

Errors travel as Triton errors whose message starts with a status word, e.g.
`INVALID_ARGUMENT: steps='x' is not allowed: expected int in [1, 100]`, because the gRPC
stream carries an error's message but not its status code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from framepack_backend.events import Event, GenerationResult, PhaseStarted, SectionFinished, StepProgress, VideoPlanned
from framepack_backend.extension import describe_video
from framepack_backend.presets import FLOW_PRESETS, PRESETS
from framepack_backend.request import GenerationRequest, parse_request
from framepack_backend.settings import SettingsError, describe_settings
from framepack_wire import (
    DESCRIBE_PARAMETER,
    END_IMAGE_INPUT,
    EVENT_OUTPUT,
    FRAMES_OUTPUT,
    IMAGE_INPUT,
    KEYFRAMES_INPUT,
    MODEL_NAME,
    PREVIEW_OUTPUT,
    PROMPT_PARAMETER,
    VIDEO_INPUT,
    DescribeMeta,
    FinalMeta,
    PhaseMeta,
    PlanMeta,
    ProgressMeta,
    QueuedMeta,
    SectionMeta,
    Status,
    error_message,
)

__all__ = [
    "DESCRIBE_PARAMETER", "END_IMAGE_INPUT", "KEYFRAMES_INPUT",
    "EVENT_OUTPUT", "FRAMES_OUTPUT", "IMAGE_INPUT", "MODEL_NAME", "PREVIEW_OUTPUT",
    "PROMPT_PARAMETER", "VIDEO_INPUT", "Status", "error_message", "GenerationRequest", "parse_request",
    "request_parameters",
    "is_describe_request", "describe_response", "WireResponse", "to_wire", "queued_response",
]


def request_parameters(text: str) -> dict[str, object]:
    """`request.parameters()` is a JSON object in the Python backend."""
    try:
        parameters = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise SettingsError("parameters", text, "a JSON object") from None
    if not isinstance(parameters, dict):
        raise SettingsError("parameters", parameters, "a JSON object")
    return parameters


def is_describe_request(parameters: Mapping[str, object]) -> bool:
    """Whether the request asks what the server accepts instead of for a video."""
    if DESCRIBE_PARAMETER not in parameters:
        return False
    value = parameters[DESCRIBE_PARAMETER]
    if value is not True and value != "true":
        raise SettingsError(DESCRIBE_PARAMETER, value, "true, or no such parameter for a video request")
    return True


def describe_response(loras: list[dict] | None = None, sampling: str | None = None) -> WireResponse:
    """What the server accepts. `loras`: the instance's LoRA folder listing
    (framepack_backend/lora/folder.py); `sampling`: the loaded variant (None: not said)."""
    meta = DescribeMeta(
        settings=describe_settings(),
        presets={name: preset.as_settings() for name, preset in PRESETS.items()},
        flow_presets=list(FLOW_PRESETS),
        loras=loras or [],
        video=describe_video(sampling),
    )
    return WireResponse(_jsonable(meta.to_json()), {}, final=True)


@dataclass(frozen=True)
class WireResponse:
    """One streamed response: the event's metadata and its named image tensors."""

    event: dict
    tensors: dict[str, np.ndarray]
    final: bool = False

    def event_bytes(self) -> np.ndarray:
        # A writable buffer, so torch.from_numpy can wrap it for DLPack without a copy.
        return np.frombuffer(bytearray(json.dumps(self.event).encode("utf-8")), dtype=np.uint8)


def queued_response(position: int, waited_s: float) -> WireResponse:
    """A waiting job's news: `position` jobs run or wait before it."""
    return WireResponse(QueuedMeta(position=position, waited_s=round(waited_s, 1)).to_json(), {})


def to_wire(event: Event) -> WireResponse:
    if isinstance(event, VideoPlanned):
        plan = PlanMeta(
            sections=event.sections, window=event.window, latent_frames=event.latent_frames,
            frame_count=event.frames, fps=event.fps, width=event.width, height=event.height,
        )
        return WireResponse(plan.to_json(), {})
    if isinstance(event, PhaseStarted):
        phase = PhaseMeta(phase=event.phase, section=event.section, sections=event.sections,
                          elapsed_s=round(event.elapsed_s, 4))
        return WireResponse(phase.to_json(), {})
    if isinstance(event, StepProgress):
        progress = ProgressMeta(
            section=event.section, sections=event.sections, step=event.step, steps=event.steps,
            elapsed_s=round(event.elapsed_s, 4), computed=event.computed,
        )
        tensors = {} if event.preview is None else {PREVIEW_OUTPUT: _rgb(event.preview, 3)}
        return WireResponse(progress.to_json(), tensors)
    if isinstance(event, SectionFinished):
        section = SectionMeta(
            section=event.section, sections=event.sections, start_frame=event.start_frame,
            frame_count=len(event.frames), total_frames=event.total_frames, fps=event.fps,
        )
        return WireResponse(section.to_json(), {FRAMES_OUTPUT: _rgb(event.frames, 4)})
    if isinstance(event, GenerationResult):
        final = FinalMeta(
            frame_count=len(event.frames), fps=event.fps, width=event.width, height=event.height,
            seed=event.seed, settings=_jsonable(event.settings), timings=_jsonable(event.timings),
            parameters=_jsonable(event.parameters), model=_jsonable(event.model), versions=_jsonable(event.versions),
        )
        return WireResponse(final.to_json(), {}, final=True)
    raise TypeError(f"not a generation event: {type(event).__name__}")


def _rgb(array: np.ndarray, ndim: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        raise ValueError(f"engine produced {array.dtype} {array.shape}, expected uint8 with {ndim} dims ending in 3")
    return np.ascontiguousarray(array)


def _jsonable(value: dict) -> dict:
    """A dict of settings, timings or a description as plain JSON (numpy scalars and tuples included)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
