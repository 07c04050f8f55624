"""Section planning for FramePack (SPEC §5): pure functions over integers and tensors.

A video is generated `window` latent frames at a time. Each section sees the
start latent plus a fixed-size, progressively compressed context of already
generated latents (1 frame at 1x, 2 at 2x, 16 at 4x), so the cost per section does
not grow with the video's length.

Two variants:
- "inverted" (anti-drifting, the default model): sections run from the end of the
  video backwards; history grows at the *front*; each section's position layout is
  [start | padding | window | 1x | 2x | 4x], the context being the video that follows.
- "f1" (forward): sections run from the start; history grows at the *end*; the layout
  is [start | 4x | 2x | 1x | window], the context being the most recent frames.

Latent tensors are (B, C, T, H, W); video tensors (B, C, frames, H, W). Time is dim 2.
"""

from dataclasses import dataclass

import torch

from .variants import SamplingVariant

Variant = SamplingVariant | str  # a SamplingVariant or its name
VARIANTS: tuple[SamplingVariant, ...] = tuple(SamplingVariant)

FPS = 30  # frames per second of every video the checkpoints were trained on
VAE_TIME_STRIDE = 4  # one latent frame after the first stands for 4 video frames
VAE_SPATIAL_STRIDE = 8  # one latent pixel stands for 8×8 video pixels

# Context frames at each compression, fixed by the released checkpoints.
CONTEXT_1X, CONTEXT_2X, CONTEXT_4X = 1, 2, 16
CONTEXT_FRAMES = CONTEXT_1X + CONTEXT_2X + CONTEXT_4X

_TIME = 2


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def _check_positive_int(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def section_count(seconds: float, window: int, fps: int = FPS) -> int:
    """Sections for a video of `seconds`: max(round(seconds·fps / (window·4)), 1).

    Python's round (half to even) as in the reference, so 3 s at window 9 gives 2.
    """
    _check_positive_int("window", window)
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return max(round(seconds * fps / (window * VAE_TIME_STRIDE)), 1)


def latent_frame_count(sections: int, window: int) -> int:
    """Latent frames of the finished video: every section's window plus the start latent."""
    return sections * window + 1


def video_frame_count(sections: int, window: int) -> int:
    """Video frames the VAE makes of latent_frame_count(...) latents: 36n + 1 at window 9."""
    return VAE_TIME_STRIDE * (latent_frame_count(sections, window) - 1) + 1


def blend_latent_count(window: int, blend_latents: int | None = None) -> int:
    """Previous-section latents re-decoded with each new section: `blend_latents`, at most `window`.

    None means the reference's choice, the whole previous section (k = window).
    """
    _check_positive_int("window", window)
    if blend_latents is None:
        return window
    _check_positive_int("blend_latents", blend_latents)
    return min(blend_latents, window)


def blend_frames(blend_latents: int) -> int:
    """Video frames cross-faded by soft_append when k previous latents are re-decoded: 4(k−1)+1.

    In a decode of [new section | k previous latents] (inverted; f1 mirrors it) the previous
    section's latent i lands on frames 4(window+i)−3..4(window+i), so the existing front
    frame f is decode frame f + 4·window: the decodes share latent 0's last frame and
    4 frames for each further latent. Whatever k, a middle section adds 4·window frames.
    """
    _check_positive_int("blend_latents", blend_latents)
    return VAE_TIME_STRIDE * (blend_latents - 1) + 1


def overlap_frames(window: int, blend_latents: int | None = None) -> int:
    """Video frames two consecutive decodes share, cross-faded by soft_append.

    The reference's 4·window−3 (33 at window 9) unless fewer `blend_latents` are re-decoded.
    """
    return blend_frames(blend_latent_count(window, blend_latents))


def padding_schedule(sections: int) -> list[int]:
    """Blank windows between the start frame and the section, per inverted section.

    The first sections generated (the video's end) are placed far from the start
    frame, the last one right after it. Past 4 sections the reference does not keep
    counting down: it uses 3, then 2 for every middle section, then 1 and 0.
    """
    _check_positive_int("sections", sections)
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no single truth value
class SectionPlan:
    """One section in generation order. Index tensors are 1-D int64 frame positions."""

    index: int  # 0-based generation order
    sections: int
    padding: int  # blank windows before the section (inverted); 0 for f1
    is_last: bool  # the last generated: for inverted, the video's start
    indices_latents: torch.Tensor  # (window,) positions of the latents being generated
    indices_clean: torch.Tensor  # (2,) start latent, then the 1x context frame
    indices_2x: torch.Tensor  # (2,)
    indices_4x: torch.Tensor  # (16,)

    @property
    def is_first(self) -> bool:
        return self.index == 0


def _section_plan(index: int, sections: int, window: int, padding: int, variant: Variant) -> SectionPlan:
    if variant == "inverted":
        sizes = [1, padding * window, window, CONTEXT_1X, CONTEXT_2X, CONTEXT_4X]
        start, _, latents, clean_1x, context_2x, context_4x = torch.arange(sum(sizes)).split(sizes)
    else:
        sizes = [1, CONTEXT_4X, CONTEXT_2X, CONTEXT_1X, window]
        start, context_4x, context_2x, clean_1x, latents = torch.arange(sum(sizes)).split(sizes)
    return SectionPlan(
        index=index,
        sections=sections,
        padding=padding,
        is_last=index == sections - 1,
        indices_latents=latents,
        indices_clean=torch.cat([start, clean_1x]),
        indices_2x=context_2x,
        indices_4x=context_4x,
    )


def plan_sections(seconds: float, window: int, variant: Variant = "inverted") -> list[SectionPlan]:
    """Every section of a video of `seconds`, in generation order."""
    _check_variant(variant)
    sections = section_count(seconds, window)
    paddings = padding_schedule(sections) if variant == "inverted" else [0] * sections
    return [_section_plan(i, sections, window, pad, variant) for i, pad in enumerate(paddings)]


def initial_history(start_latent: torch.Tensor, variant: Variant = "inverted") -> torch.Tensor:
    """History before the first section: zero context frames (f1: followed by the start latent).

    fp32 on the start latent's device, shape (B, C, 19 or 20, H, W).
    """
    _check_variant(variant)
    b, c, _, h, w = start_latent.shape
    zeros = torch.zeros(b, c, CONTEXT_FRAMES, h, w, dtype=torch.float32, device=start_latent.device)
    if variant == "inverted":
        return zeros
    return torch.cat([zeros, start_latent.to(zeros)], dim=_TIME)


def context_from_history(
    history: torch.Tensor, start_latent: torch.Tensor, variant: Variant = "inverted"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean_latents, latents_2x, latents_4x) for the next section: 2, 2 and 16 frames.

    clean_latents is the start latent followed by the 1x context frame. Inverted takes
    the context from the front of history (the video right after the new section),
    f1 from the end (the video right before it).
    """
    _check_variant(variant)
    if variant == "inverted":
        context_1x, context_2x, context_4x = history[:, :, :CONTEXT_FRAMES].split(
            [CONTEXT_1X, CONTEXT_2X, CONTEXT_4X], dim=_TIME
        )
    else:
        context_4x, context_2x, context_1x = history[:, :, -CONTEXT_FRAMES:].split(
            [CONTEXT_4X, CONTEXT_2X, CONTEXT_1X], dim=_TIME
        )
    clean = torch.cat([start_latent.to(context_1x), context_1x], dim=_TIME)
    return clean, context_2x, context_4x


def append_section(
    history: torch.Tensor,
    new_latents: torch.Tensor,
    start_latent: torch.Tensor,
    is_last: bool,
    variant: Variant = "inverted",
) -> torch.Tensor:
    """History after a section: inverted prepends (and the last section, the video's
    start, brings the start latent in front of it); f1 appends."""
    _check_variant(variant)
    new_latents = new_latents.to(history)
    if variant == "f1":
        return torch.cat([history, new_latents], dim=_TIME)
    if is_last:
        new_latents = torch.cat([start_latent.to(history), new_latents], dim=_TIME)
    return torch.cat([new_latents, history], dim=_TIME)


def generated_latent_count(plan: SectionPlan, window: int, variant: Variant = "inverted") -> int:
    """Real (non-padding) latent frames in history after `plan`'s section, start latent included."""
    _check_variant(variant)
    generated = (plan.index + 1) * window
    if variant == "f1" or plan.is_last:
        generated += 1
    return generated


def decode_range(
    plan: SectionPlan,
    history: torch.Tensor,
    window: int,
    variant: Variant = "inverted",
    blend_latents: int | None = None,
) -> tuple[int, int]:
    """(first, count): the history frames to VAE-decode after `plan`'s section.

    After the first section all real latents; after a later one the new section plus
    the k = blend_latent_count(window, blend_latents) latents of the previous section
    next to it, so the seam is decoded with context on both sides — plus the start
    latent for the last inverted section. The default k = window is the reference's
    2·window; a smaller k re-decodes less and cross-fades over overlap_frames(window, k).
    """
    _check_variant(variant)
    if plan.is_first:
        count = generated_latent_count(plan, window, variant)
    else:
        count = window + blend_latent_count(window, blend_latents)
        count += 1 if variant == "inverted" and plan.is_last else 0
    first = 0 if variant == "inverted" else history.shape[_TIME] - count
    return first, count


def max_decode_latents(sections: int, window: int, variant: Variant = "inverted",
                       blend_latents: int | None = None) -> int:
    """The most latent frames one decode_range of a job with `sections` sections asks for."""
    _check_variant(variant)
    first = window + (1 if variant == "f1" or sections == 1 else 0)
    if sections == 1:
        return first
    later = window + blend_latent_count(window, blend_latents) + (1 if variant == "inverted" else 0)
    return max(first, later)


def soft_append(
    history_pixels: torch.Tensor, new_pixels: torch.Tensor, overlap: int, variant: Variant = "inverted"
) -> torch.Tensor:
    """Join a new decode onto the video with a linear cross-fade over `overlap` frames.

    Inverted puts the new frames in front, f1 at the end. Across the overlap the
    earlier piece's weight falls linearly from 1 (first overlapped frame) to 0 (last);
    a single overlapped frame is the earlier piece's. The result has the history's dtype.
    """
    _check_variant(variant)
    front, back = (new_pixels, history_pixels) if variant == "inverted" else (history_pixels, new_pixels)
    if not 0 <= overlap <= min(front.shape[_TIME], back.shape[_TIME]):
        raise ValueError(
            f"overlap must be between 0 and the shorter clip's {min(front.shape[_TIME], back.shape[_TIME])} "
            f"frames, got {overlap}"
        )
    work = torch.promote_types(history_pixels.dtype, torch.float32)
    front, back = front.to(work), back.to(work)
    kept = front.shape[_TIME] - overlap
    weight = torch.linspace(1.0, 0.0, overlap, dtype=work, device=front.device).view(1, 1, -1, 1, 1)
    seam = weight * front[:, :, kept:] + (1.0 - weight) * back[:, :, :overlap]
    joined = torch.cat([front[:, :, :kept], seam, back[:, :, overlap:]], dim=_TIME)
    return joined.to(history_pixels.dtype)


# Video time of the sections. A video section k (0-based, in playback order) holds latents
# 1 + k·window .. (k+1)·window, i.e. video frames 4k·window + 1 .. 4(k+1)·window; the first
# section also shows frame 0, the start latent. Generation order differs: inverted runs
# make the video's end first.


def video_section(index: int, sections: int, variant: Variant = "inverted") -> int:
    """The playback position (0 = the video's first section) of the section generated `index`-th."""
    _check_variant(variant)
    if not 0 <= index < sections:
        raise ValueError(f"section index must be in [0, {sections}), got {index}")
    return sections - 1 - index if variant == "inverted" else index


def section_seconds(section: int, window: int, fps: int = FPS) -> tuple[float, float]:
    """(start, end) in video seconds of playback section `section`: frames 4k·window .. 4(k+1)·window."""
    frames = VAE_TIME_STRIDE * window
    return section * frames / fps, (section + 1) * frames / fps


def video_seconds(sections: int, window: int, fps: int = FPS) -> float:
    """The time of the video's last frame: (36n + 1 − 1) / 30 s at window 9."""
    return (video_frame_count(sections, window) - 1) / fps


def section_at(seconds: float, sections: int, window: int, fps: int = FPS) -> int:
    """The playback section that shows the frame at `seconds` (0 ≤ seconds ≤ video_seconds).

    Frame f > 0 belongs to section (f − 1) // (4·window); frame 0 (the start latent) to section 0.
    """
    if not 0 <= seconds <= video_seconds(sections, window, fps):
        raise ValueError(f"seconds must be in [0, {video_seconds(sections, window, fps):g}], got {seconds!r}")
    frame = round(seconds * fps)
    return min(max(frame - 1, 0) // (VAE_TIME_STRIDE * window), sections - 1)
