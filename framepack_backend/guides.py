"""Images that guide a video besides its start: the end image, keyframes, and the start
frame of a text-to-video job (docs/creative-controls.md says where each lands and why).

- End image (inverted sampling): its latent, times `end_strength`, is the 1x clean context of
  the first section generated, the video's end (the slot that otherwise holds the zeros of
  the empty history), as diffusers' `last_image` and kijai's `end_latent` place it. Its SigLIP
  tokens are mixed into the start image's with weight end_strength / 2, so at strength 1 the
  two are averaged (FramePack PR #167, diffusers) and at strength 0 nothing changes.
- Keyframes: the latent of a keyframe replaces the start latent in the clean context (index 0)
  of the one section showing its time, as section images do in FramePack-eichi and musubi-tuner:
  that section is generated as if it continued from the keyframe.
- Text-to-video: no start image; a black, white or seeded-noise picture stands in for it
  (FramePack-Studio's latent image), through the same VAE and SigLIP path as a photo.

F1 (forward) sampling has no slot that looks ahead, so end images and keyframes are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import conditioning, planner
from .buckets import bucket_for, resize_and_center_crop
from .settings import SamplingSettings, SettingsError
from .variants import SamplingVariant

_START_SLOT, _CONTEXT_1X_SLOT = 0, 1  # positions in the clean latents: start latent, then 1x context


def keyframe_schedule(
    times: str, images: list[np.ndarray], sections: int, window: int
) -> tuple[tuple[float, np.ndarray], ...]:
    """Keyframes (seconds, image) from the `keyframe_times` setting and the checked images.

    One time per image; each within the planned video; at most one keyframe per section
    (so never more keyframes than sections). SettingsError names the offending value.
    """
    texts = [text.strip() for text in times.split(",")] if times.strip() else []
    if len(texts) != len(images):
        raise SettingsError(
            "keyframe_times", times, f"one time in seconds per keyframe image: {len(images)} image(s) were sent"
        )
    end = planner.video_seconds(sections, window)
    keyframes: list[tuple[float, np.ndarray]] = []
    covered: dict[int, float] = {}
    for text, image in zip(texts, images):
        try:
            seconds = float(text.removesuffix("s"))
        except ValueError:
            raise SettingsError("keyframe_times", text, "a number of seconds, e.g. 2.5") from None
        if not 0 <= seconds <= end:
            raise SettingsError(
                "keyframe_times", text, f"a time within the planned video, 0 to {end:g} s ({sections} sections)"
            )
        section = planner.section_at(seconds, sections, window)
        if section in covered:
            start_s, end_s = planner.section_seconds(section, window)
            raise SettingsError(
                "keyframe_times", text,
                f"at most one keyframe per section: {covered[section]:g} s already guides the section "
                f"{start_s:g}-{end_s:g} s ({sections} sections; a longer video has more)",
            )
        covered[section] = seconds
        keyframes.append((seconds, image))
    return tuple(keyframes)


def check_sampling(end_image: np.ndarray | None, keyframes: tuple, settings: SamplingSettings,
                   sampling: SamplingVariant | str) -> None:
    """Refuse guides the loaded model cannot use: F1 grows the video forwards and never sees its end."""
    if sampling != SamplingVariant.F1:
        return
    allowed = "none with the forward F1 model, which has no context after the section it generates; " \
              "use an inverted (anti-drifting) server"
    if end_image is not None:
        raise SettingsError("end_image", f"{end_image.shape[1]}×{end_image.shape[0]} image", allowed)
    if settings.loop:
        raise SettingsError("loop", True, allowed)
    if keyframes:
        raise SettingsError("keyframes", f"{len(keyframes)} image(s)", allowed)


def start_size(image: np.ndarray | None, resolution: int) -> tuple[int, int]:
    """(height, width) of the video: the start image's bucket; the square bucket without one."""
    if image is None:
        return bucket_for(resolution, resolution, resolution)
    return bucket_for(image.shape[0], image.shape[1], resolution)


def init_pixels(latent_init: str, height: int, width: int, seed: int) -> np.ndarray:
    """The stand-in start frame of a text-to-video job, uint8 height×width×3; noise comes from the job's seed."""
    if latent_init == "black":
        return np.zeros((height, width, 3), np.uint8)
    if latent_init == "white":
        return np.full((height, width, 3), 255, np.uint8)
    if latent_init == "noise":
        return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    raise ValueError(f"latent_init must be one of black, white, noise, got {latent_init!r}")


@dataclass
class Guides:
    """The encoded guides of one job: the end latent (already times its strength) and the
    keyframe latents by the generation index of the section they condition."""

    end_latent: torch.Tensor | None = None
    keyframe_latents: dict[int, torch.Tensor] = field(default_factory=dict)

    def clean_latents(self, clean: torch.Tensor, plan: planner.SectionPlan) -> torch.Tensor:
        """The section's clean latents (start, 1x context) with this job's guides in their slots."""
        keyframe = self.keyframe_latents.get(plan.index)
        end = self.end_latent if plan.is_first else None
        if keyframe is None and end is None:
            return clean
        clean = clean.clone()
        if keyframe is not None:
            clean[:, :, _START_SLOT] = keyframe[:, :, 0].to(clean)
        if end is not None:
            clean[:, :, _CONTEXT_1X_SLOT] = end[:, :, 0].to(clean)
        return clean


def encode_guides(
    components, end_image: np.ndarray | None, keyframes: tuple[tuple[float, np.ndarray], ...],
    settings: SamplingSettings, image_embeds: torch.Tensor, height: int, width: int,
    sections: int, sampling: SamplingVariant | str, device: torch.device,
) -> tuple[Guides, torch.Tensor]:
    """VAE-encode the guide images at the video's size; the start's SigLIP tokens with the end's mixed in."""
    guides = Guides()
    if end_image is not None and settings.end_strength > 0:
        pixels = resize_and_center_crop(end_image, width, height)
        latent = conditioning.encode_image_latent(components.vae, pixels, device).to(torch.float32)
        guides.end_latent = latent * settings.end_strength  # FramePack-eichi's end-frame strength
        end_embeds = conditioning.encode_image_embeds(
            components.feature_extractor, components.image_encoder, pixels, device
        ).to(image_embeds)
        image_embeds = torch.lerp(image_embeds, end_embeds, settings.end_strength / 2)
    for seconds, image in keyframes:
        pixels = resize_and_center_crop(image, width, height)
        section = planner.section_at(seconds, sections, settings.window)
        index = planner.video_section(section, sections, sampling)  # its own inverse
        guides.keyframe_latents[index] = conditioning.encode_image_latent(components.vae, pixels, device).float()
    return guides, image_embeds
