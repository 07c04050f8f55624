"""The typed events `Pipeline.generate` yields, in order (see docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class VideoPlanned:
    """The job's first event: the video it will make, before any model runs.

    Sections are whole, so the video is usually longer than the seconds asked for
    (0.5 s asks for 15 frames and gets one section: 37 frames = 1.23 s).
    """

    sections: int
    window: int  # latent frames each section generates
    latent_frames: int
    frames: int
    fps: int
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


# What a job is doing, in the order it happens: the prompt and the image are encoded once,
# then each section is sampled and decoded.
PHASES = ("text", "image", "sampling", "decode")


@dataclass(frozen=True)
class PhaseStarted:
    """A phase of the job begins; `section` is 1-based for sampling and decode, 0 before the sections."""

    phase: str  # one of PHASES
    section: int
    sections: int
    elapsed_s: float


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
    # What repeats the job (framepack_backend/provenance.py): the request's parameters with
    # every setting resolved, the model's identity, the versions of the code that ran.
    parameters: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


Event = VideoPlanned | PhaseStarted | StepProgress | SectionFinished | GenerationResult
