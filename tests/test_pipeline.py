"""End to end on the CPU with the tiny bundle: frame counts, determinism, event order, TeaCache."""

import numpy as np
import pytest
import torch

from framepack_backend import conditioning
from framepack_backend.buckets import bucket_for
from framepack_backend.errors import GenerationCancelled
from framepack_backend.events import GenerationResult, PhaseStarted, SectionFinished, StepProgress, VideoPlanned
from framepack_backend.memory.footprint import decode_work_bytes
from framepack_backend.pipeline import Pipeline
from framepack_backend.planner import section_count, soft_append, video_frame_count
from framepack_backend.request import GenerationRequest
from framepack_backend.settings import SettingsError

request = GenerationRequest.parse  # image, prompt, **settings

FAST = {"resolution": 128, "steps": 4}


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    return Pipeline.from_pretrained(tiny_bundle, device="cpu")


def assemble(events):
    """Build the video from SectionFinished events the way a streaming client does."""
    sections = [e for e in events if isinstance(e, SectionFinished)]
    video = np.zeros((sections[0].total_frames,) + sections[0].frames.shape[1:], np.uint8)
    for s in sections:
        video[s.start_frame : s.start_frame + len(s.frames)] = s.frames
    return video


@pytest.fixture(scope="module")
def two_second_run(pipeline, image):
    return list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 2, "teacache": False})))


def test_two_seconds_give_the_planned_frames_at_the_bucket_size(two_second_run, image):
    result = two_second_run[-1]
    assert isinstance(result, GenerationResult)
    n = section_count(2, 9)
    height, width = bucket_for(*image.shape[:2], resolution=128)
    assert result.frames.shape == (video_frame_count(n, 9), height, width, 3) == (73, 112, 144, 3)
    assert (result.width, result.height, result.fps) == (144, 112, 30)
    assert result.frames.std() > 1.0  # not a constant picture


def describe_event(e):
    if isinstance(e, VideoPlanned):
        return ("planned", e.sections, e.frames)
    if isinstance(e, PhaseStarted):
        return (e.phase, e.section, e.sections)
    if isinstance(e, StepProgress):
        return (e.section, e.step)
    return (e.section, "done")


def test_events_arrive_per_phase_step_and_section_in_order(two_second_run):
    order = [describe_event(e) for e in two_second_run[:-1]]
    expected = [("planned", 2, 73), ("text", 0, 2), ("image", 0, 2)] + [
        item for s in (1, 2)
        for item in [("sampling", s, 2), *[(s, k) for k in [1, 2, 3, 4]], ("decode", s, 2), (s, "done")]
    ]
    assert order == expected
    phases = [e for e in two_second_run if isinstance(e, PhaseStarted)]
    assert [e.elapsed_s for e in phases] == sorted(e.elapsed_s for e in phases)
    steps = [e for e in two_second_run if isinstance(e, StepProgress)]
    assert all(e.preview.dtype == np.uint8 and e.preview.ndim == 3 for e in steps)
    assert [e.elapsed_s for e in steps] == sorted(e.elapsed_s for e in steps)


def test_sections_assemble_to_the_final_video(two_second_run):
    result = two_second_run[-1]
    assert np.array_equal(assemble(two_second_run), result.frames)
    starts = [e.start_frame for e in two_second_run if isinstance(e, SectionFinished)]
    assert starts == sorted(starts, reverse=True)  # inverted sampling grows from the end


@pytest.mark.slow
def test_same_seed_gives_identical_frames_and_another_seed_differs(pipeline, image, two_second_run):
    again = list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 2, "teacache": False})))
    assert np.array_equal(again[-1].frames, two_second_run[-1].frames)
    other = list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 1, "seed": 1,
                                                                      "teacache": False})))
    same_len = list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 1, "seed": 2,
                                                                         "teacache": False})))
    assert not np.array_equal(other[-1].frames, same_len[-1].frames)


@pytest.fixture(scope="module")
def full_blend_run(pipeline, image):
    """The two-second run re-decoding the whole previous section (blend_latents = window),
    with every VAE decode's latents and pixels recorded."""
    calls = []
    decode = conditioning.decode_latents

    def recording_decode(vae, latents, **options):
        calls.append((latents.clone(), decode(vae, latents, **options)))
        return calls[-1][1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conditioning, "decode_latents", recording_decode)
        events = list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 2, "teacache": False,
                                                                 "blend_latents": 9})))
    return events, calls


@pytest.mark.slow
def test_full_window_blend_reproduces_the_reference_decode(full_blend_run):
    """blend_latents = window: after the first section decode the newest 2·window latents
    (+ the start latent for the last) and cross-fade 4·window−3 frames, as the reference does."""
    events, calls = full_blend_run
    result = events[-1]
    (first_in, first_out), (last_in, last_out) = calls
    assert first_in.shape[2] == 9 and last_in.shape[2] == 1 + 2 * 9  # start | new section | previous section
    assert torch.equal(last_in[:, :, 10:], first_in)
    reference = soft_append(first_out, last_out, 4 * 9 - 3, "inverted")
    assert np.array_equal(result.frames, conditioning.frames_to_uint8(reference))
    assert np.array_equal(assemble(events), result.frames)
    assert result.timings["decoded_latents"] == 9 + 19


@pytest.mark.slow
def test_by_default_the_whole_previous_section_is_re_decoded_as_the_reference_does(two_second_run, full_blend_run):
    default, full = two_second_run[-1], full_blend_run[0][-1]
    assert default.timings["decoded_latents"] == 9 + 19
    assert np.array_equal(default.frames, full.frames)


@pytest.fixture(scope="module")
def three_blend_run(pipeline, image):
    return list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 2, "teacache": False,
                                                           "blend_latents": 3})))


@pytest.mark.slow
def test_three_blend_latents_decode_less_and_change_frames_only_around_the_seam(three_blend_run, full_blend_run):
    """blend_latents 3 re-decodes 3 previous latents and cross-fades 9 frames instead of 33."""
    reduced, full = three_blend_run[-1], full_blend_run[0][-1]
    assert reduced.settings["blend_latents"] == 3
    assert reduced.timings["decoded_latents"] == 9 + 13  # start | new section | 3 previous latents
    assert reduced.frames.shape == full.frames.shape == (73, 112, 144, 3)
    # The first section's decode is frames 40..72; the reference cross-fades all 33 of them.
    # The VAE decodes in short overlapping temporal tiles, so a frame depends on nearby
    # latents only: frames a latent (4 frames) or more before that seam come out the same.
    differs = np.abs(reduced.frames.astype(int) - full.frames.astype(int)).reshape(73, -1).max(axis=1) > 0
    changed = np.flatnonzero(differs)
    assert changed.min() >= 40 - 4 and changed.max() < 73
    assert differs[40:72].all()  # blended with other weights, or not at all
    assert np.array_equal(reduced.frames[:36], full.frames[:36])


def computed_steps(pipeline, image, **settings):
    result = list(pipeline.generate(request(image, "a robot waves",
                                            **{**FAST, "seconds": 1, "steps": 25, **settings})))[-1]
    return result.timings["computed_steps"]


@pytest.mark.slow
def test_teacache_skips_steps_detail_computes_more_off_computes_all(pipeline, image):
    on = computed_steps(pipeline, image, teacache=True, teacache_threshold=0.15)
    detail = computed_steps(pipeline, image, teacache=True, teacache_threshold=0.15, teacache_mode="detail")
    off = computed_steps(pipeline, image, teacache=False)
    assert 2 <= on < 25
    assert detail >= on
    assert off == 25


@pytest.mark.slow
def test_real_cfg_runs_two_branches_per_step_and_changes_the_output(pipeline, image):
    plain = list(pipeline.generate(request(image, "a robot waves", **{**FAST, "seconds": 1, "teacache": False})))[-1]
    cfg = list(pipeline.generate(request(image, "a robot waves",
                                         **{**FAST, "seconds": 1, "teacache": False, "cfg": 3.0, "rs": 0.5,
                                            "negative_prompt": "blurry"})))[-1]
    assert cfg.frames.shape == plain.frames.shape == (37, 112, 144, 3)
    assert not np.array_equal(cfg.frames, plain.frames)


def test_bad_input_is_rejected_before_any_work(pipeline, image):
    with pytest.raises(SettingsError) as info:
        pipeline.generate(request(image, "x", **{"steps": 0}))
    assert info.value.field == "steps"
    with pytest.raises(SettingsError) as info:
        pipeline.generate(request(image[:, :, :2], "x", **FAST))
    assert info.value.field == "image"


def test_cancel_stops_within_one_step(pipeline, image):
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 2

    events = []
    with pytest.raises(GenerationCancelled):
        for event in pipeline.generate(request(image, "x", **{**FAST, "seconds": 2}), cancel=cancel):
            events.append(event)
    assert len([e for e in events if isinstance(e, StepProgress)]) == 2


@pytest.mark.slow
def test_forward_f1_sampling_grows_the_video_from_its_start(tiny_bundle, image):
    f1 = Pipeline.from_pretrained(tiny_bundle, device="cpu", sampling="f1")
    events = list(f1.generate(request(image, "a robot waves", **{**FAST, "seconds": 2, "teacache": False,
                                                       "blend_latents": 3})))
    result = events[-1]
    assert result.frames.shape == (73, 112, 144, 3) and result.settings["sampling"] == "f1"
    starts = [e.start_frame for e in events if isinstance(e, SectionFinished)]
    assert starts == sorted(starts) and starts[0] == 0  # appended at the end
    assert np.array_equal(assemble(events), result.frames)
    assert result.timings["decoded_latents"] == 10 + 9 + 3  # start + section, then section + 3 blend latents


def test_sampling_must_match_the_loaded_transformer(pipeline, image):
    with pytest.raises(SettingsError) as info:
        pipeline.generate(request(image, "x", **{**FAST, "sampling": "f1"}))
    assert info.value.field == "sampling" and "transformer/" in str(info.value)


def test_the_final_settings_report_the_job_s_effective_options(two_second_run, pipeline):
    from framepack_backend.settings import EngineOptions

    settings = two_second_run[-1].settings
    # the CPU defaults: no Triton kernels, an fp32 model needs no fp32 output projection, diffusers' VAE decode
    assert pipeline.options == EngineOptions(fused_kernels=False, fp32_output=False, fast_vae_decode=False)
    assert {k: settings[k] for k in ("sampling", "attention", "memory_mode", "gpu_memory_preservation", "fp8",
                                     "fused_kernels")} == dict(sampling="inverted", attention="sdpa",
                                                               memory_mode="resident", gpu_memory_preservation=6.0,
                                                               fp8=False, fused_kernels=False)
    assert (settings["steps"], settings["resolution"], settings["seconds"]) == (4, 128, 2.0) and "crf" not in settings


def test_a_job_s_overrides_apply_to_that_job_only(pipeline, image):
    before = pipeline.options
    result = list(pipeline.generate(request(image, "x", **{**FAST, "seconds": 1, "teacache": False,
                                                           "attention": "sdpa", "gpu_memory_preservation": 2})))[-1]
    assert result.settings["gpu_memory_preservation"] == 2.0 and result.settings["attention"] == "sdpa"
    assert pipeline.options is before and before.gpu_memory_preservation == 6.0 and before.attention == "auto"


def test_jobs_on_one_pipeline_run_one_at_a_time(pipeline, image):
    import threading

    first = pipeline.generate(request(image, "x", **{**FAST, "seconds": 1}))
    second = pipeline.generate(request(image, "x", **{**FAST, "seconds": 1}))
    assert isinstance(next(first), VideoPlanned)  # the first job holds the pipeline now
    started = []
    waiting = threading.Thread(target=lambda: started.append(next(second)))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive() and started == []
    first.close()  # the first job ends: the second one runs
    waiting.join(60)
    assert not waiting.is_alive() and isinstance(started[0], VideoPlanned)
    second.close()


def test_the_first_event_is_the_planned_video_whole_sections_at_the_bucket(pipeline, image):
    """0.5 s asks for 15 frames; sections are whole, so the job says up front it makes 37 (1.23 s)."""
    events = pipeline.generate(request(image, "x", **{**FAST, "seconds": 0.5}))
    planned = next(events)
    events.close()
    assert planned == VideoPlanned(sections=1, window=9, latent_frames=10, frames=37, fps=30, width=144, height=112)
    assert round(planned.seconds, 2) == 1.23


class DecoderCalls:
    """Counts the VAE decoder's calls (one per temporal chunk or spatial tile) and whether tiling was on."""

    def __init__(self, vae):
        self.vae = vae
        self.tiled: list[bool] = []  # per call started
        self.finished = 0

    def __enter__(self):
        self.handles = [
            self.vae.decoder.register_forward_pre_hook(lambda m, a: self.tiled.append(self.vae.use_tiling)),
            self.vae.decoder.register_forward_hook(lambda m, a, out: setattr(self, "finished", self.finished + 1)),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_a_decode_that_does_not_fit_whole_runs_tiled_and_one_that_fits_nowhere_is_refused_up_front(tiny_bundle):
    """The whole decode's estimate exceeds the (injected) memory, the tiled one fits: tiled; neither: refused."""
    pipeline = Pipeline.from_pretrained(tiny_bundle, device="cpu")
    wide = np.zeros((240, 320, 3), np.uint8)
    height, width = bucket_for(240, 320, 320)
    assert height * width > 256 * 256  # larger than one VAE tile, so tiling has something to do
    latents = 9 + 1  # one section: its window and the start latent
    untiled = decode_work_bytes(height, width, 9, tiled=False, latent_frames=latents)
    tiled = decode_work_bytes(height, width, 9, tiled=True, latent_frames=latents)
    assert tiled < untiled

    pipeline.memory.available_memory = lambda device: (tiled + untiled) // 2
    job = request(wide, "x", resolution=320, steps=1, seconds=0.5, teacache=False)
    with DecoderCalls(pipeline.components.vae) as calls:
        result = list(pipeline.generate(job))[-1]
    assert result.timings["memory"]["decode"] == {
        "tiled": True, "estimate_bytes": tiled, "untiled_estimate_bytes": untiled,
        "available_bytes": (tiled + untiled) // 2,
    }
    assert calls.tiled and all(calls.tiled)  # the decoder ran on tiles
    assert pipeline.components.vae.use_tiling is False  # for this job only
    assert result.frames.shape == (37, height, width, 3)

    pipeline.memory.available_memory = lambda device: untiled + 1
    with DecoderCalls(pipeline.components.vae) as calls:
        whole = list(pipeline.generate(job))[-1]
    assert whole.timings["memory"]["decode"]["tiled"] is False and not any(calls.tiled)

    pipeline.memory.available_memory = lambda device: tiled - 1
    events = []
    encoded = []
    handle = pipeline.components.text_encoder.register_forward_pre_hook(lambda m, a: encoded.append(1))
    try:
        with pytest.raises(SettingsError) as info:
            events.extend(pipeline.generate(request(wide, "x", resolution=320, steps=1, seconds=0.5)))
    finally:
        handle.remove()
    assert events == [] and encoded == []  # refused before any event or model
    message = str(info.value)
    assert info.value.field == "resolution" and f"{width}×{height}" in message and "seconds=0.5" in message
    assert f"{tiled / 2**30:.1f} GiB" in message


def test_a_cancel_during_the_decode_stops_it_before_the_next_chunk(pipeline, image):
    """The VAE decodes 10 latents in several temporal chunks; a cancel in the first one stops the job there."""
    vae = pipeline.components.vae
    with DecoderCalls(vae) as uncancelled:
        list(pipeline.generate(request(image, "x", **{**FAST, "seconds": 1})))
    assert len(uncancelled.tiled) >= 2  # more than one chunk, so there is a "next" one

    with DecoderCalls(vae) as calls:
        def cancel():
            return calls.finished >= 1  # true once the decode has finished its first chunk

        events = []
        with pytest.raises(GenerationCancelled):
            for event in pipeline.generate(request(image, "x", **{**FAST, "seconds": 1}), cancel=cancel):
                events.append(event)
    assert (len(calls.tiled), calls.finished) == (2, 1)  # the second chunk was asked for and never ran
    assert isinstance(events[-1], PhaseStarted) and events[-1].phase == "decode"
    assert not any(isinstance(e, SectionFinished) for e in events)


def test_a_client_cancel_during_the_decode_counts_as_cancelled(pipeline, image):
    from framepack_server.jobs import Job, Outcome, run_job

    vae = pipeline.components.vae

    class Sink:
        sent: list = []
        closed = False

        def is_cancelled(self):
            return calls.finished >= 1  # the client went away during the decode

        def send(self, response):
            self.sent.append(response.event["kind"])

        def fail(self, status, text):
            raise AssertionError(f"{status}: {text}")

        def close(self):
            self.closed = True

    class Log:
        lines: list = []

        def info(self, message):
            self.lines.append(message)

        error = info

    sink = Sink()
    with DecoderCalls(vae) as calls:
        outcome = run_job(pipeline, Job("1", request(image, "x", **{**FAST, "seconds": 1}), sink), Log())
    assert outcome is Outcome.CANCELLED and sink.closed
    assert calls.finished == 1 and "section" not in sink.sent and "final" not in sink.sent
