"""The typed events `Pipeline.generate` yields, in order (see docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StepProgress:
    section: int  # 1-based, in generation order
    sections: int
    step: int  # 1-based
    steps: int
    elapsed_s: float
    computed: bool = True  # False when TeaCache reused the cached residual
    preview: np.ndarray | None = None  # small uint8 H×W×3


@dataclass(frozen=True)
class SectionFinished:
    """Decoded frames [start_frame, start_frame + len(frames)) of the final video.

    They supersede frames received earlier for the same indices (the soft-append
    blend rewrites the overlap); frames after that range are final.
    """

    section: int
    sections: int
    start_frame: int
    frames: np.ndarray  # uint8 T×H×W×3
    total_frames: int
    fps: int  # of the video these frames belong to


@dataclass(frozen=True)
class GenerationResult:
    frames: np.ndarray  # uint8 T×H×W×3
    fps: int
    width: int
    height: int
    seed: int
    settings: dict
    timings: dict = field(default_factory=dict)


Event = StepProgress | SectionFinished | GenerationResult
