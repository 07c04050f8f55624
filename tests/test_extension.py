"""Video extension on the CPU with the tiny bundle: which latents seed the history, the clean
context of the first new section, the new frames a job sends, determinism."""

import numpy as np
import pytest
import torch

from framepack_backend import conditioning, extension, planner
from framepack_backend.buckets import bucket_for, resize_and_center_crop
from framepack_backend.events import GenerationResult, SectionFinished, VideoPlanned
from framepack_backend.pipeline import Pipeline
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SettingsError
from framepack_wire import MAX_VIDEO_FRAME_PIXELS, MAX_VIDEO_FRAMES

FAST = {"resolution": 128, "steps": 2, "seconds": 1, "teacache": False, "preview": False}


def moving_clip(frames: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A gradient that slides right one step per frame, uint8 T×H×W×3."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [np.stack([(x * 2 + 5 * t) % 256, y * 2, (x + y + 3 * t) % 256], axis=-1) for t in range(frames)]
    ).astype(np.uint8)


@pytest.fixture(scope="module")
def pipelines(tiny_bundle):
    return {variant: Pipeline.from_pretrained(tiny_bundle, device="cpu", sampling=variant)
            for variant in ("inverted", "f1")}


def first_context(pipeline, request, monkeypatch):
    """The events of a job and the (clean, 2x, 4x) latents its first section was given."""
    seen = []
    original = planner.context_from_history

    def recording(history, start_latent, variant="inverted"):
        context = original(history, start_latent, variant)
        seen.append(context)
        return context

    monkeypatch.setattr(planner, "context_from_history", recording)
    events = list(pipeline.generate(request))
    return events, seen[0]


def bucket_frames(frames: np.ndarray) -> np.ndarray:
    height, width = bucket_for(frames.shape[1], frames.shape[2], FAST["resolution"])
    return np.stack([resize_and_center_crop(frame, width, height) for frame in frames])


def test_the_most_frames_a_context_reads_is_the_wire_limit():
    assert extension.context_video_frames("f1") == 1 + 4 * (planner.CONTEXT_FRAMES - 1) == MAX_VIDEO_FRAMES == 73
    assert extension.context_video_frames("inverted") == 1


@pytest.mark.parametrize("sent, variant, used", [
    (1, "f1", 1), (4, "f1", 1), (5, "f1", 5), (13, "f1", 13), (16, "f1", 13), (73, "f1", 73), (200, "f1", 73),
    (1, "inverted", 1), (73, "inverted", 1),
])
def test_a_job_uses_the_clip_s_last_1_plus_4j_frames_up_to_its_context(sent, variant, used):
    assert extension.used_frame_count(sent, variant) == used
    clip = extension.source_clip(moving_clip(sent, 16, 16), variant)
    assert np.array_equal(clip.frames, moving_clip(sent, 16, 16)[sent - used:])


def test_f1_history_is_the_clip_s_latents_and_the_first_section_s_context_reads_them(pipelines, monkeypatch):
    clip = moving_clip(15)  # 13 used: 4 latents
    vae = pipelines["f1"].components.vae
    expected = conditioning.encode_video_latents(vae, bucket_frames(clip[2:]), "cpu").float()
    assert expected.shape[2] == 4
    events, (clean, latents_2x, latents_4x) = first_context(
        pipelines["f1"], GenerationRequest.parse(None, "waves", video=clip, **FAST), monkeypatch)
    assert torch.equal(clean[:, :, 0], expected[:, :, 0])  # start slot: the first frame used
    assert torch.equal(clean[:, :, 1], expected[:, :, 3])  # 1x: the clip's last latent
    assert torch.equal(latents_2x, expected[:, :, 1:3])
    assert torch.equal(latents_4x[:, :, -1], expected[:, :, 0]) and not latents_4x[:, :, :-1].any()
    assert events[-1].settings["video_frames"] == 13


def test_inverted_start_slot_is_the_clip_s_last_frame_and_the_rest_is_zero(pipelines, monkeypatch):
    clip = moving_clip(9)
    vae = pipelines["inverted"].components.vae
    expected = conditioning.encode_video_latents(vae, bucket_frames(clip[-1:]), "cpu").float()
    events, (clean, latents_2x, latents_4x) = first_context(
        pipelines["inverted"], GenerationRequest.parse(None, "waves", video=clip, **FAST), monkeypatch)
    assert torch.equal(clean[:, :, :1], expected)
    assert not clean[:, :, 1].any() and not latents_2x.any() and not latents_4x.any()
    assert events[-1].settings["video_frames"] == 1


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_an_extension_sends_only_the_new_frames_36_per_section(pipelines, variant):
    events = list(pipelines[variant].generate(
        GenerationRequest.parse(None, "waves", video=moving_clip(9), **{**FAST, "seconds": 2})))
    plan, result = events[0], events[-1]
    assert isinstance(plan, VideoPlanned) and isinstance(result, GenerationResult)
    sections = planner.section_count(2, 9)
    assert plan.frames == planner.video_frame_count(sections, 9) - 1 == 36 * sections == len(result.frames)
    assert result.frames.shape[1:] == (112, 144, 3)
    video = np.zeros_like(result.frames)
    for event in events:
        if isinstance(event, SectionFinished):
            assert event.total_frames == len(result.frames) and event.start_frame >= 0
            video[event.start_frame : event.start_frame + len(event.frames)] = event.frames
    assert np.array_equal(video, result.frames)


def test_the_same_extension_twice_gives_the_same_frames_and_an_image_job_differs(pipelines):
    clip = moving_clip(9)
    job = GenerationRequest.parse(None, "waves", video=clip, **FAST)
    first = list(pipelines["f1"].generate(job))[-1].frames
    again = list(pipelines["f1"].generate(job))[-1].frames
    assert np.array_equal(first, again)
    # The same job from the frame in the start slot as an image: the clip's context changes the video.
    from_image = list(pipelines["f1"].generate(GenerationRequest.parse(clip[0], "waves", **FAST)))[-1].frames
    assert from_image.shape[0] == first.shape[0] + 1
    assert not np.array_equal(from_image[1:], first)
    assert np.abs(from_image[1:].astype(int) - first.astype(int)).mean() > 0.1


def test_an_inverted_extension_is_image_to_video_from_the_last_frame_without_repeating_it(pipelines):
    clip = moving_clip(9)
    extended = list(pipelines["inverted"].generate(GenerationRequest.parse(None, "waves", video=clip, **FAST)))
    from_last = list(pipelines["inverted"].generate(GenerationRequest.parse(clip[-1], "waves", **FAST)))
    assert np.array_equal(extended[-1].frames, from_last[-1].frames[1:])
    from_first = list(pipelines["inverted"].generate(GenerationRequest.parse(clip[0], "waves", **FAST)))
    assert not np.array_equal(extended[-1].frames, from_first[-1].frames[1:])


@pytest.mark.parametrize("video, value, allowed", [
    (np.zeros((0, 96, 128, 3), np.uint8), "0 frames", "1 to 73 frames"),
    (np.zeros((MAX_VIDEO_FRAMES + 1, 32, 32, 3), np.uint8), "74 frames", "1 to 73 frames"),
    (np.zeros((2, 1081, 1920, 3), np.uint8), "1920×1081 pixels", f"at most {MAX_VIDEO_FRAME_PIXELS} pixels"),
    (np.zeros((2, 96, 128), np.uint8), "shape (2, 96, 128)", "T×H×W×3"),
    (np.zeros((2, 96, 128, 3), np.float32), "dtype float32", "uint8"),
    (np.zeros((2, 8, 128, 3), np.uint8), "128×8 pixels", "at least 16"),
])
def test_a_bad_clip_is_refused_naming_the_video_field(video, value, allowed):
    with pytest.raises(SettingsError) as info:
        GenerationRequest.parse(None, "x", video=video)
    assert info.value.field == "video" and value in str(info.value) and allowed in str(info.value)


def test_an_image_and_a_video_together_are_refused(image):
    with pytest.raises(SettingsError) as info:
        GenerationRequest.parse(image, "x", video=moving_clip(5))
    assert info.value.field == "video" and "either" in str(info.value)


@pytest.mark.gpu
def test_a_full_f1_context_at_the_default_resolution_extends_on_the_gpu(tiny_bundle):
    """73 frames at the 640 bucket through the CUDA path (bf16 transformer, the clip's
    encode on the GPU): 36 new frames at the clip's 640 bucket (544×704 for 480×640); the peak
    is printed (tiny weights: not the real VAE's)."""
    f1 = Pipeline.from_pretrained(tiny_bundle, device="cuda", sampling="f1")
    torch.cuda.reset_peak_memory_stats()
    clip = moving_clip(MAX_VIDEO_FRAMES, 480, 640)
    events = list(f1.generate(GenerationRequest.parse(None, "waves", video=clip, steps=2, seconds=1)))
    result = events[-1]
    assert bucket_for(480, 640) == (544, 704)
    assert result.frames.shape == (36, 544, 704, 3) and result.settings["video_frames"] == 73
    peak = result.timings["memory"]["peak_allocated_bytes"]
    print(f"f1 extension, 73 frames of a 480×640 clip at 544×704: peak {peak / 2**30:.2f} GiB, "
          f"encode {result.timings['encode_s']:.2f} s")
