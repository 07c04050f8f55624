"""One generation request as the client sends it: the start image, the prompt, parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .contract import PROMPT_PARAMETER

ParameterValue = str | int | float | bool


@dataclass(frozen=True, eq=False)
class WireRequest:
    """What one request carries: input `image` (uint8 H×W×3) and request parameters.

    `parameters` are the settings by their request-parameter names, passed as given:
    the server parses and checks them, and the names and ranges it accepts come from its
    `describe` answer. Client-side options (the MP4's crf) do not belong here.
    """

    image: np.ndarray
    prompt: str
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if PROMPT_PARAMETER in self.parameters:
            raise ValueError(f"the prompt goes in WireRequest.prompt, not in parameters[{PROMPT_PARAMETER!r}]")

    def request_parameters(self) -> dict[str, ParameterValue]:
        """The gRPC request parameters: the prompt and the settings."""
        return {PROMPT_PARAMETER: self.prompt, **self.parameters}

    def image_array(self) -> np.ndarray:
        """The image as the contiguous uint8 array the `image` input sends."""
        return np.ascontiguousarray(self.image, dtype=np.uint8)
