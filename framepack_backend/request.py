"""One generation request, parsed once at the boundary and carried whole.

`parse_request(image, parameters)` is the only place a request's input is checked: the
start image, the prompt and the settings (through `settings.split_settings`). It raises
`SettingsError` naming the field; past it, the engine trusts the request, and its own
internal checks raise ValueError (a bug, reported as INTERNAL by the server).

The request is what the server queues (`framepack_server/jobs.py: Job`) and what
`Pipeline.generate(request, cancel)` takes. It carries the creative
controls too: an end image (or `loop`), keyframes at given seconds, a timed prompt schedule,
and no start image at all for text-to-video (docs/creative-controls.md). Inputs still to come
land here, each checked by `parse_request` and given to the pipeline in the request:

- an input video to extend (its latents seed the history);
- LoRA choices (names from an allow-listed folder, with scales).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from framepack_wire import MAX_IMAGE_ASPECT, MAX_IMAGE_PIXELS, MAX_KEYFRAMES, MIN_IMAGE_SIDE, PROMPT_PARAMETER

from . import guides, planner, prompt_schedule
from .prompt_schedule import TimedPrompt
from .settings import EngineOverrides, SamplingSettings, SettingsError, split_settings, validate_prompt


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """A checked request: what to generate from, and how.

    `image` is the start frame, uint8 H×W×3, or None for text-to-video (the start frame is
    then the `latent_init` picture).
    `settings` are the job's own; `engine` its overrides of the instance's options.
    The coming inputs (end image, keyframes, input video, timed prompts, LoRA choices;
    see the module docstring) become fields here, checked by `parse_request`.
    """

    image: np.ndarray | None
    prompt: str
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    engine: EngineOverrides = field(default_factory=EngineOverrides)
    # Creative controls (framepack_backend/guides.py, prompt_schedule.py); parse_request fills them.
    end_image: np.ndarray | None = None  # the loop setting's end image is the start image itself
    keyframes: tuple[tuple[float, np.ndarray], ...] = ()  # (seconds, image)
    prompts: tuple[TimedPrompt, ...] = ()  # the prompt parsed (prompt_schedule); empty: `prompt` from 0 s

    @classmethod
    def parse(cls, image: object, prompt: object = "", *, end_image: object = None, keyframes: object = None,
              **settings: object) -> GenerationRequest:
        """`parse_request` with the settings as keyword arguments (tests, scripts)."""
        return parse_request(image, {PROMPT_PARAMETER: prompt, **settings}, end_image, keyframes)

    @property
    def schedule(self) -> tuple[TimedPrompt, ...]:
        return self.prompts or (TimedPrompt(0.0, self.prompt),)

    @property
    def end_frame(self) -> np.ndarray | None:
        """The image the video should end on: the end image, or with `loop` the start image."""
        return self.image if self.settings.loop else self.end_image


def parse_request(image: object, parameters: Mapping[str, object], end_image: object = None,
                  keyframes: object = None) -> GenerationRequest:
    """A request from raw input: the start image (None: text-to-video), the request parameters
    (the prompt and settings by name, loosely typed), and the optional end image and keyframe
    images (K×H×W×3, at the `keyframe_times` setting's seconds). Raises SettingsError naming
    the first bad field."""
    values = dict(parameters)
    if PROMPT_PARAMETER not in values:
        raise SettingsError(PROMPT_PARAMETER, None, "a text prompt in the request parameter 'prompt'")
    prompt = validate_prompt(values.pop(PROMPT_PARAMETER))
    settings, engine = split_settings(values)
    sections = planner.section_count(settings.seconds, settings.window)
    schedule = prompt_schedule.parse_prompt_schedule(prompt)
    prompt_schedule.check_schedule_fits(schedule, sections, settings.window)
    start = None if image is None else validate_image(image)
    end = None if end_image is None else validate_image(end_image, "end_image")
    if settings.loop and (end is not None or start is None):
        raise SettingsError("loop", True, "a start image and no end image (a loop ends on the start image)")
    guide_frames = _keyframe_images(keyframes)
    timed = guides.keyframe_schedule(settings.keyframe_times, guide_frames, sections, settings.window)
    return GenerationRequest(start, prompt, settings, engine, end, timed, schedule)


def _keyframe_images(keyframes: object) -> list[np.ndarray]:
    """The `keyframes` input (K×H×W×3 uint8) as K checked images."""
    if keyframes is None:
        return []
    if not isinstance(keyframes, np.ndarray) or keyframes.ndim != 4:
        shown = f"shape {tuple(keyframes.shape)}" if isinstance(keyframes, np.ndarray) else type(keyframes).__name__
        raise SettingsError("keyframes", shown, "a uint8 array of shape K×H×W×3")
    if not 1 <= len(keyframes) <= MAX_KEYFRAMES:
        raise SettingsError("keyframes", f"{len(keyframes)} images", f"1 to {MAX_KEYFRAMES} keyframe images")
    return [validate_image(frame, f"keyframes[{i}]") for i, frame in enumerate(keyframes)]


def validate_image(image: object, field_name: str = "image") -> np.ndarray:
    """Check an H×W×3 uint8 RGB image (the serving contract's `image` input)."""
    if image is None:
        raise SettingsError(field_name, None, "a UINT8 H×W×3 input tensor")
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
