"""One generation request as the client sends it: the start image (or a clip to extend), the prompt, parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .contract import IMAGE_INPUT, PROMPT_PARAMETER, VIDEO_INPUT

ParameterValue = str | int | float | bool


@dataclass(frozen=True, eq=False)
class WireRequest:
    """What one request carries: input `image` (uint8 H×W×3) or `video` (uint8 T×H×W×3,
    the last frames of a clip to extend) and request parameters.

    `parameters` are the settings by their request-parameter names, passed as given:
    the server parses and checks them, and the names and ranges it accepts come from its
    `describe` answer. Client-side options (the MP4's crf) do not belong here.
    """

    image: np.ndarray | None
    prompt: str
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    video: np.ndarray | None = None

    def __post_init__(self) -> None:
        if PROMPT_PARAMETER in self.parameters:
            raise ValueError(f"the prompt goes in WireRequest.prompt, not in parameters[{PROMPT_PARAMETER!r}]")

    def request_parameters(self) -> dict[str, ParameterValue]:
        """The gRPC request parameters: the prompt and the settings."""
        return {PROMPT_PARAMETER: self.prompt, **self.parameters}

    def image_array(self) -> np.ndarray:
        """The image as the contiguous uint8 array the `image` input sends."""
        return np.ascontiguousarray(self.image, dtype=np.uint8)

    def inputs(self) -> dict[str, np.ndarray]:
        """The tensor inputs by name: `image` and `video` where given, contiguous uint8."""
        arrays = {IMAGE_INPUT: self.image, VIDEO_INPUT: self.video}
        return {name: np.ascontiguousarray(a, dtype=np.uint8) for name, a in arrays.items() if a is not None}
