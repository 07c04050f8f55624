"""Video extension: the last frames of a source clip seed the history, so the first new
section continues from them.

Which frame fills which clean-latent slot follows the layouts the checkpoints were trained
on (planner.py), never one they were not (docs/video-extension.md compares FramePack-Studio
and pftq's demos, which widen the slots):

- f1 (forward): the history is the one an F1 job would hold had it made the clip itself,
  zero frames then the clip's latents, so the first new section's 1x, 2x and 4x context
  are the clip's last 1, 2 and 16 latent frames. The start slot, the video's first frame
  in image-to-video, holds the first frame used: its latent from the clip's encode (the
  one the history holds, as the image latent is in image-to-video), its SigLIP tokens.
- inverted (anti-drifting): the 1x, 2x and 4x slots hold the video *after* the section
  being made, so the clip's past has no slot but the start one: the clip's last frame is
  the start image the new frames continue from, exactly as an image is in image-to-video
  (latent, SigLIP tokens, its place before the first frame generated).

Either way the decoded video begins with one frame standing for the clip's last (the start
latent, or for f1 the clip's last latent decoded first), which the source already holds:
`new_frames_only` drops it, so a job sends only new frames, 4·window per section (36n at
window 9), and a client shows the source followed by them.

An end frame combines with an inverted extension without touching this module: it fills
the first generated section's 1x slot (the video's end), the clip's last frame the start slot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from framepack_wire import MAX_VIDEO_FRAME_PIXELS, MAX_VIDEO_FRAMES

from . import conditioning
from .buckets import resize_and_center_crop
from .events import Event, GenerationResult, SectionFinished, VideoPlanned
from .planner import CONTEXT_FRAMES, VAE_TIME_STRIDE, VARIANTS, Variant

# The frame every decode starts with, which repeats the clip's last frame.
SEAM_FRAMES = 1
_TIME = 2


def context_video_frames(variant: Variant) -> int:
    """The most source frames a job of `variant` reads: f1 fills all 19 context latents,
    made of 1 + 4·18 = 73 frames; inverted only its start frame."""
    return 1 + VAE_TIME_STRIDE * (CONTEXT_FRAMES - 1) if variant == "f1" else 1


def describe_video(sampling: Variant | None = None) -> dict[str, object]:
    """The `video` input for the describe answer: the limits, the frames each variant reads,
    and the loaded variant (a client sends no more of a clip than that variant reads)."""
    described: dict[str, object] = {
        "max_frames": MAX_VIDEO_FRAMES, "max_frame_pixels": MAX_VIDEO_FRAME_PIXELS,
        "context_frames": {str(variant): context_video_frames(variant) for variant in VARIANTS},
    }
    if sampling is not None:
        described["sampling"] = str(sampling)
    return described


def used_frame_count(frame_count: int, variant: Variant) -> int:
    """How many of the clip's last frames a job uses: at most context_video_frames, and
    1 + 4j of them, so that every latent after the first stands for 4 whole frames."""
    if frame_count < 1:
        raise ValueError(f"a source clip needs at least one frame, got {frame_count}")
    most = min(frame_count, context_video_frames(variant))
    return 1 + VAE_TIME_STRIDE * ((most - 1) // VAE_TIME_STRIDE)


@dataclass(frozen=True, eq=False)  # eq=False: an array has no single truth value
class SourceClip:
    """The frames of a source clip a job uses, uint8 T×H×W×3 as sent (T = 1 + 4j)."""

    frames: np.ndarray

    @property
    def start_frame(self) -> np.ndarray:
        """The frame in the start slot: the bucket, the start latent and the SigLIP tokens come from it."""
        return self.frames[0]


def source_clip(video: np.ndarray, variant: Variant) -> SourceClip:
    """The part of a checked request's `video` a job of `variant` uses: its last frames."""
    return SourceClip(video[len(video) - used_frame_count(len(video), variant) :])


def encode_source(
    vae, clip: SourceClip, width: int, height: int, device: torch.device | str, tiled: bool | None = None
) -> torch.Tensor:
    """The clip's latents (1, 16, 1 + j, height/8, width/8), fp32: its frames resized and
    cropped to the bucket as the start image is, VAE-encoded as one clip."""
    frames = np.stack([resize_and_center_crop(frame, width, height) for frame in clip.frames])
    return conditioning.encode_video_latents(vae, frames, device, tiled=tiled).to(torch.float32)


def seed_history(history: torch.Tensor, source_latents: torch.Tensor, variant: Variant) -> torch.Tensor:
    """The history before the first section (planner.initial_history of the clip's first
    latent) with the clip in it: f1 ends in the clip's latents instead of the start latent
    alone; inverted keeps its zero context (the clip lies before the video it makes)."""
    if variant != "f1":
        return history
    return torch.cat([history[:, :, :-1], source_latents.to(history)], dim=_TIME)


def new_frames_only(events: Iterator[Event], clip: SourceClip) -> Iterator[Event]:
    """A job's events without the seam frame that repeats the clip's last frame; the final
    settings record how many source frames the job used (`video_frames`). Closing this
    closes `events` at once (the job's clean-up runs while it still holds the pipeline)."""
    try:
        for event in events:
            if isinstance(event, VideoPlanned):
                yield dataclasses.replace(event, frames=event.frames - SEAM_FRAMES)
            elif isinstance(event, SectionFinished):
                cut = max(SEAM_FRAMES - event.start_frame, 0)
                yield dataclasses.replace(
                    event, start_frame=max(event.start_frame - SEAM_FRAMES, 0), frames=event.frames[cut:],
                    total_frames=event.total_frames - SEAM_FRAMES,
                )
            elif isinstance(event, GenerationResult):
                used = {**event.settings, "video_frames": len(clip.frames)}
                yield dataclasses.replace(event, frames=event.frames[SEAM_FRAMES:], settings=used)
            else:
                yield event
    finally:
        if isinstance(events, Generator):
            events.close()
