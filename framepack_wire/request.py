"""One generation request as the client sends it: the start image (or a clip to extend), the prompt, parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .contract import END_IMAGE_INPUT, IMAGE_INPUT, KEYFRAMES_INPUT, PROMPT_PARAMETER, VIDEO_INPUT

KEYFRAME_TIMES_PARAMETER = "keyframe_times"  # the seconds of the `keyframes` input's images, comma-separated

ParameterValue = str | int | float | bool


@dataclass(frozen=True, eq=False)
class WireRequest:
    """What one request carries: input `image` (uint8 H×W×3; None: text-to-video) or `video`
    (uint8 T×H×W×3, the last frames of a clip to extend) and request parameters, and
    optionally an `end_image` and `keyframes` ((seconds, uint8 H×W×3), all of one size).

    `parameters` are the settings by their request-parameter names, passed as given:
    the server parses and checks them, and the names and ranges it accepts come from its
    `describe` answer. Client-side options (the MP4's crf) do not belong here.
    """

    image: np.ndarray | None
    prompt: str
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    video: np.ndarray | None = None
    end_image: np.ndarray | None = None
    keyframes: tuple[tuple[float, np.ndarray], ...] = ()

    def __post_init__(self) -> None:
        if PROMPT_PARAMETER in self.parameters:
            raise ValueError(f"the prompt goes in WireRequest.prompt, not in parameters[{PROMPT_PARAMETER!r}]")

    def request_parameters(self) -> dict[str, ParameterValue]:
        """The gRPC request parameters: the prompt, the settings and the keyframes' times."""
        times = {KEYFRAME_TIMES_PARAMETER: ",".join(f"{s:g}" for s, _ in self.keyframes)} if self.keyframes else {}
        return {PROMPT_PARAMETER: self.prompt, **self.parameters, **times}

    def image_array(self) -> np.ndarray | None:
        """The image as the contiguous uint8 array the `image` input sends (None: text-to-video)."""
        return None if self.image is None else np.ascontiguousarray(self.image, dtype=np.uint8)

    def input_arrays(self) -> dict[str, np.ndarray]:
        """Every tensor input by its name, those given: `image`, `video`, `end_image`, `keyframes` (K×H×W×3)."""
        arrays = {IMAGE_INPUT: self.image, VIDEO_INPUT: self.video, END_IMAGE_INPUT: self.end_image}
        if self.keyframes:
            arrays[KEYFRAMES_INPUT] = np.stack([image for _, image in self.keyframes])
        return {name: np.ascontiguousarray(a, dtype=np.uint8) for name, a in arrays.items() if a is not None}
