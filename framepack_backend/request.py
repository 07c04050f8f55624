"""One generation request, parsed once at the boundary and carried whole.

`parse_request(image, parameters)` is the only place a request's input is checked: the
start image, the prompt and the settings (through `settings.split_settings`). It raises
`SettingsError` naming the field; past it, the engine trusts the request, and its own
internal checks raise ValueError (a bug, reported as INTERNAL by the server).

The request is what the server queues (`framepack_server/jobs.py: Job`) and what
`Pipeline.generate(request, cancel)` takes. Besides the start image, prompt and settings it
carries the creative controls: an end image (or `loop`), keyframes at given seconds, a timed
prompt schedule, and no start image at all for text-to-video (docs/creative-controls.md); a
clip to extend instead of a start image (docs/video-extension.md); the LoRAs of the server's
folder with their strengths (framepack_backend/lora/); and the parameters as accepted, which
`to_parameters` resolves into a request for the same video (provenance.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, Mapping

import numpy as np

from framepack_wire import (
    MAX_IMAGE_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_KEYFRAMES,
    MAX_VIDEO_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
    MIN_IMAGE_SIDE,
    PROMPT_PARAMETER,
    VIDEO_INPUT,
)

from . import guides, planner, prompt_schedule
from .lora.choices import LORAS_FIELD, LoraChoice, parse_lora_choices
from .prompt_schedule import TimedPrompt
from .settings import EngineOverrides, SamplingSettings, SettingsError, split_settings, validate_prompt


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """A checked request: what to generate from, and how.

    `image` is the start frame, uint8 H×W×3, or None for text-to-video (the start frame is
    then the `latent_init` picture) and for a video extension (`video`).
    `settings` are the job's own; `engine` its overrides of the instance's options.
    The other inputs (module docstring) are fields below, each checked by `parse_request`.
    """

    image: np.ndarray | None
    prompt: str
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    engine: EngineOverrides = field(default_factory=EngineOverrides)
    loras: tuple[LoraChoice, ...] = ()  # LoRAs of the server's folder, applied for this job only
    # A clip to extend instead of a start image: uint8 T×H×W×3, its last frames
    # (framepack_backend/extension.py says which ones a job uses).
    video: np.ndarray | None = None
    # Creative controls (framepack_backend/guides.py, prompt_schedule.py); parse_request fills them.
    end_image: np.ndarray | None = None  # the loop setting's end image is the start image itself
    keyframes: tuple[tuple[float, np.ndarray], ...] = ()  # (seconds, image)
    prompts: tuple[TimedPrompt, ...] = ()  # the prompt parsed (prompt_schedule); empty: `prompt` from 0 s
    parameters: Mapping[str, object] = field(default_factory=dict)  # as accepted, for to_parameters

    def to_parameters(self) -> dict[str, object]:
        """The request parameters that ask for this job again (every setting resolved;
        see provenance.request_parameters)."""
        from .provenance import request_parameters

        return request_parameters(self)

    @classmethod
    def parse(cls, image: object, prompt: object = "", loras_available: Container[str] | None = None, *,
              video: object = None, end_image: object = None, keyframes: object = None,
              **settings: object) -> GenerationRequest:
        """`parse_request` with the settings as keyword arguments (tests, scripts)."""
        return parse_request(image, {PROMPT_PARAMETER: prompt, **settings}, loras_available, video=video,
                             end_image=end_image, keyframes=keyframes)

    @property
    def schedule(self) -> tuple[TimedPrompt, ...]:
        return self.prompts or (TimedPrompt(0.0, self.prompt),)

    @property
    def end_frame(self) -> np.ndarray | None:
        """The image the video should end on: the end image, or with `loop` the start image."""
        return self.image if self.settings.loop else self.end_image


def parse_request(image: object, parameters: Mapping[str, object], loras_available: Container[str] | None = None,
                  *, video: object = None, end_image: object = None, keyframes: object = None) -> GenerationRequest:
    """A request from raw input: the start image (None: text-to-video, or `video`, a clip
    to extend), the request parameters (the prompt and settings by name, loosely typed),
    and the optional end image and keyframe images (K×H×W×3, at the `keyframe_times`
    setting's seconds). Raises SettingsError naming the first bad field.
    `loras_available`: the names of the instance's LoRA folder (None: it has none), the
    allow-list the `loras` parameter is checked against."""
    values = dict(parameters)
    accepted = dict(values)
    if PROMPT_PARAMETER not in values:
        raise SettingsError(PROMPT_PARAMETER, None, "a text prompt in the request parameter 'prompt'")
    prompt = validate_prompt(values.pop(PROMPT_PARAMETER))
    loras = parse_lora_choices(values.pop(LORAS_FIELD, None), loras_available)
    settings, engine = split_settings(values)
    sections = planner.section_count(settings.seconds, settings.window)
    schedule = prompt_schedule.parse_prompt_schedule(prompt)
    prompt_schedule.check_schedule_fits(schedule, sections, settings.window)
    clip = None
    if video is not None:
        if image is not None:
            raise SettingsError(VIDEO_INPUT, "a video and an image", "either a start image or a video to extend")
        clip = validate_video(video)
    start = None if image is None else validate_image(image)
    end = None if end_image is None else validate_image(end_image, "end_image")
    if settings.loop and (end is not None or start is None):
        raise SettingsError("loop", True, "a start image and no end image (a loop ends on the start image)")
    guide_frames = _keyframe_images(keyframes)
    timed = guides.keyframe_schedule(settings.keyframe_times, guide_frames, sections, settings.window)
    return GenerationRequest(start, prompt, settings, engine, loras, clip, end, timed, schedule, parameters=accepted)


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
    _check_frame_size(field_name, *image.shape[:2], MAX_IMAGE_PIXELS, "pixels")
    return image


def _check_frame_size(field_name: str, h: int, w: int, max_pixels: int, pixels_unit: str) -> None:
    """The side, pixel-count and aspect limits of an image or of a clip's frames."""
    if min(h, w) < MIN_IMAGE_SIDE:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"both sides at least {MIN_IMAGE_SIDE} pixels")
    if h * w > max_pixels:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"at most {max_pixels} {pixels_unit}")
    if max(h, w) > MAX_IMAGE_ASPECT * min(h, w):
        raise SettingsError(field_name, f"{w}×{h} pixels", f"the long side at most {MAX_IMAGE_ASPECT}× the short one")


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
    _check_frame_size(field_name, *video.shape[1:3], MAX_VIDEO_FRAME_PIXELS, "pixels a frame")
    return video
