"""One generation request, parsed once at the boundary and carried whole.

`parse_request(image, parameters)` is the only place a request's input is checked: the
start image, the prompt and the settings (through `settings.split_settings`). It raises
`SettingsError` naming the field; past it, the engine trusts the request, and its own
internal checks raise ValueError (a bug, reported as INTERNAL by the server).

The request is what the server queues (`framepack_server/jobs.py: Job`) and what
`Pipeline.generate(request, cancel)` takes. Inputs still to come land here, each checked
by `parse_request` and given to the pipeline in the request:

- an end image and keyframes (images at latent positions; the planner places their latents);
- an input video to extend (its latents seed the history);
- a timed prompt schedule (prompts from given seconds on, mapped to sections by the planner);
- LoRA choices (names from an allow-listed folder, with scales);
- no start image at all, for text-to-video (`image` is already optional in the type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, Mapping

import numpy as np

from framepack_wire import (
    MAX_IMAGE_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_VIDEO_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
    MIN_IMAGE_SIDE,
    PROMPT_PARAMETER,
    VIDEO_INPUT,
)

from .lora.choices import LORAS_FIELD, LoraChoice, parse_lora_choices
from .settings import EngineOverrides, SamplingSettings, SettingsError, split_settings, validate_prompt


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """A checked request: what to generate from, and how.

    `image` is the start frame, uint8 H×W×3. Its type allows None for text-to-video,
    which is not built yet: `parse_request` refuses a request without an image.
    `settings` are the job's own; `engine` its overrides of the instance's options.
    The coming inputs (end image, keyframes, input video, timed prompts, LoRA choices;
    see the module docstring) become fields here, checked by `parse_request`.
    """

    image: np.ndarray | None
    prompt: str
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    engine: EngineOverrides = field(default_factory=EngineOverrides)
    loras: tuple[LoraChoice, ...] = ()  # LoRAs of the server's folder, applied for this job only
    # A clip to extend instead of a start image: uint8 T×H×W×3, its last frames
    # (framepack_backend/extension.py says which ones a job uses).
    video: np.ndarray | None = None
    parameters: Mapping[str, object] = field(default_factory=dict)  # as accepted, for to_parameters

    def to_parameters(self) -> dict[str, object]:
        """The request parameters that ask for this job again (every setting resolved;
        see provenance.request_parameters)."""
        from .provenance import request_parameters

        return request_parameters(self)

    @classmethod
    def parse(cls, image: object, prompt: object = "", loras_available: Container[str] | None = None, *,
              video: object = None, **settings: object) -> GenerationRequest:
        """`parse_request` with the settings as keyword arguments (tests, scripts)."""
        return parse_request(image, {PROMPT_PARAMETER: prompt, **settings}, loras_available, video=video)


def parse_request(image: object, parameters: Mapping[str, object],
                  loras_available: Container[str] | None = None, *, video: object = None) -> GenerationRequest:
    """A request from raw input: the image array (or the `video` clip to extend) and the
    request parameters (the prompt and settings by name, loosely typed). Raises
    SettingsError naming the first bad field. `loras_available`: the names of the
    instance's LoRA folder (None: it has none), the allow-list the `loras` parameter is
    checked against."""
    values = dict(parameters)
    accepted = dict(values)
    if PROMPT_PARAMETER not in values:
        raise SettingsError(PROMPT_PARAMETER, None, "a text prompt in the request parameter 'prompt'")
    prompt = validate_prompt(values.pop(PROMPT_PARAMETER))
    loras = parse_lora_choices(values.pop(LORAS_FIELD, None), loras_available)
    settings, engine = split_settings(values)
    if video is not None:
        if image is not None:
            raise SettingsError(VIDEO_INPUT, "a video and an image", "either a start image or a video to extend")
        return GenerationRequest(None, prompt, settings, engine, loras, video=validate_video(video),
                                 parameters=accepted)
    return GenerationRequest(validate_image(image), prompt, settings, engine, loras, parameters=accepted)


def validate_image(image: object, field_name: str = "image") -> np.ndarray:
    """Check an H×W×3 uint8 RGB image (the serving contract's `image` input)."""
    if image is None:  # text-to-video is not built yet: every request needs a start image
        raise SettingsError(field_name, None, "a UINT8 H×W×3 input tensor 'image'")
    if not isinstance(image, np.ndarray):
        raise SettingsError(field_name, type(image).__name__, "a uint8 array of shape H×W×3")
    if image.dtype != np.uint8:
        raise SettingsError(field_name, f"dtype {image.dtype}", "dtype uint8")
    if image.ndim != 3 or image.shape[2] != 3:
        raise SettingsError(field_name, f"shape {tuple(image.shape)}", "shape H×W×3 (RGB)")
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"both sides at least {MIN_IMAGE_SIDE} pixels")
    if h * w > MAX_IMAGE_PIXELS:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"at most {MAX_IMAGE_PIXELS} pixels")
    if max(h, w) > MAX_IMAGE_ASPECT * min(h, w):
        raise SettingsError(field_name, f"{w}×{h} pixels", f"the long side at most {MAX_IMAGE_ASPECT}× the short one")
    return image


def validate_video(video: object, field_name: str = VIDEO_INPUT) -> np.ndarray:
    """Check a T×H×W×3 uint8 clip to extend: 1..MAX_VIDEO_FRAMES frames, each within the
    image's side and aspect limits and MAX_VIDEO_FRAME_PIXELS."""
    if not isinstance(video, np.ndarray):
        raise SettingsError(field_name, type(video).__name__, "a uint8 array of shape T×H×W×3")
    if video.dtype != np.uint8:
        raise SettingsError(field_name, f"dtype {video.dtype}", "dtype uint8")
    if video.ndim != 4 or video.shape[3] != 3:
        raise SettingsError(field_name, f"shape {tuple(video.shape)}", "shape T×H×W×3 (RGB frames)")
    if not 1 <= len(video) <= MAX_VIDEO_FRAMES:
        raise SettingsError(field_name, f"{len(video)} frames", f"1 to {MAX_VIDEO_FRAMES} frames (the clip's last)")
    h, w = video.shape[1:3]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"both sides at least {MIN_IMAGE_SIDE} pixels")
    if h * w > MAX_VIDEO_FRAME_PIXELS:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"at most {MAX_VIDEO_FRAME_PIXELS} pixels a frame")
    if max(h, w) > MAX_IMAGE_ASPECT * min(h, w):
        raise SettingsError(field_name, f"{w}×{h} pixels", f"the long side at most {MAX_IMAGE_ASPECT}× the short one")
    return video
