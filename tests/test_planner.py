import pytest
import torch

from framepack_backend.planner import (
    append_section,
    blend_frames,
    blend_latent_count,
    context_from_history,
    decode_range,
    initial_history,
    latent_frame_count,
    overlap_frames,
    padding_schedule,
    plan_sections,
    section_count,
    soft_append,
    video_frame_count,
)

WINDOW = 9


def seconds_for(sections: int, window: int = WINDOW) -> float:
    return sections * window * 4 / 30


def fake_decode(latents: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE: T latents -> 4(T-1)+1 frames; frame 0 shows latent 0, frames
    4j-3..4j show latent j (the causal VAE's time layout). Channels: mean over C."""
    per_latent = latents.mean(dim=1, keepdim=True)
    first, rest = per_latent[:, :, :1], per_latent[:, :, 1:]
    return torch.cat([first, rest.repeat_interleave(4, dim=2)], dim=2)


def test_section_count_by_hand():
    assert section_count(5, 9) == 4  # 150 / 36 = 4.17
    assert section_count(1, 9) == 1  # 0.83
    assert section_count(0.1, 9) == 1  # floor at one section
    assert section_count(3, 9) == 2  # 2.5 rounds half to even, as the reference
    assert section_count(60, 9) == 50
    assert section_count(5, 5) == 8  # 150 / 20 = 7.5 -> 8
    assert section_count(2, 9, fps=60) == 3  # 120 / 36 = 3.33


def test_frame_counts_by_hand():
    assert latent_frame_count(4, 9) == 37
    assert video_frame_count(4, 9) == 145  # SPEC: 5 s -> 4 sections -> 37 latents -> 145 frames
    assert video_frame_count(1, 9) == 37
    assert overlap_frames(9) == 33
    assert overlap_frames(9, 3) == blend_frames(3) == 9
    assert overlap_frames(9, 40) == 33  # more than the window counts as the window
    assert [blend_frames(k) for k in (1, 2, 3, 9)] == [1, 5, 9, 33]
    assert blend_latent_count(9) == 9 and blend_latent_count(9, 3) == 3 and blend_latent_count(4, 9) == 4


@pytest.mark.parametrize(
    "sections,expected",
    [(1, [0]), (2, [1, 0]), (3, [2, 1, 0]), (4, [3, 2, 1, 0]), (5, [3, 2, 2, 1, 0]), (7, [3, 2, 2, 2, 2, 1, 0])],
)
def test_padding_schedule(sections, expected):
    assert padding_schedule(sections) == expected


def test_inverted_index_layout_by_hand():
    plans = plan_sections(seconds_for(3), WINDOW, "inverted")
    assert [p.padding for p in plans] == [2, 1, 0]
    first = plans[0]  # [1 | 18 | 9 | 1 | 2 | 16] -> 47 positions
    assert first.indices_latents.tolist() == list(range(19, 28))
    assert first.indices_clean.tolist() == [0, 28]
    assert first.indices_2x.tolist() == [29, 30]
    assert first.indices_4x.tolist() == list(range(31, 47))
    last = plans[-1]  # no padding: the section sits right after the start frame
    assert last.indices_latents.tolist() == list(range(1, 10))
    assert last.indices_clean.tolist() == [0, 10]
    assert [p.index for p in plans] == [0, 1, 2]
    assert [p.is_last for p in plans] == [False, False, True]
    assert [p.is_first for p in plans] == [True, False, False]
    assert all(p.indices_latents.dtype == torch.int64 for p in plans)


def test_f1_index_layout_by_hand():
    for plan in plan_sections(seconds_for(3), WINDOW, "f1"):  # [1 | 16 | 2 | 1 | 9]
        assert plan.padding == 0
        assert plan.indices_clean.tolist() == [0, 19]
        assert plan.indices_4x.tolist() == list(range(1, 17))
        assert plan.indices_2x.tolist() == [17, 18]
        assert plan.indices_latents.tolist() == list(range(20, 29))


@pytest.mark.parametrize("blend", [1, 2, 3, WINDOW])
@pytest.mark.parametrize("variant", ["inverted", "f1"])
@pytest.mark.parametrize("sections", range(1, 9))
def test_whole_video_loop(variant, sections, blend):
    """Run the section loop with fake latents and a fake VAE.

    Every real latent holds (its position in the finished video) + 1, the start latent
    position 0, so the finished video must show ceil(frame / 4) + 1 at every frame if
    history order, decode ranges and soft-append alignment are all right, whatever the
    number of previous latents re-decoded for the cross-fade.
    """
    plans = plan_sections(seconds_for(sections), WINDOW, variant)
    assert len(plans) == sections
    start = torch.full((1, 2, 1, 3, 4), 1.0)
    history = initial_history(start, variant)
    assert history.shape == (1, 2, 19 if variant == "inverted" else 20, 3, 4)
    video = None
    total_latents = latent_frame_count(sections, WINDOW)
    decoded_latents = 0
    for plan in plans:
        # positions in the finished video of this section's latents
        first_position = 1 + (sections - 1 - plan.index) * WINDOW if variant == "inverted" else 1 + plan.index * WINDOW
        positions = torch.arange(first_position, first_position + WINDOW, dtype=torch.float32)
        new = (positions + 1).view(1, 1, -1, 1, 1).expand(1, 2, WINDOW, 3, 4)

        clean, context_2x, context_4x = context_from_history(history, start, variant)
        assert (clean.shape[2], context_2x.shape[2], context_4x.shape[2]) == (2, 2, 16)
        assert len(plan.indices_latents) == WINDOW and len(plan.indices_clean) == 2
        assert len(plan.indices_2x) == 2 and len(plan.indices_4x) == 16
        assert torch.equal(clean[:, :, :1], start)
        if not plan.is_first:
            # 1x context: the generated frame adjacent to the new section
            neighbour = first_position + WINDOW if variant == "inverted" else first_position - 1
            assert clean[0, 0, 1, 0, 0].item() == neighbour + 1

        history = append_section(history, new, start, plan.is_last, variant)
        first, count = decode_range(plan, history, WINDOW, variant, blend)
        decoded_latents += count
        decoded = fake_decode(history[:, :, first : first + count])
        if video is None:
            video = decoded
        else:
            before = video.shape[2]
            video = soft_append(video, decoded, overlap_frames(WINDOW, blend), variant)
            assert video.shape[2] - before == 4 * WINDOW + (4 if plan.is_last and variant == "inverted" else 0)

    assert history.shape[2] == total_latents + 19  # the zero context frames stay in history
    # every latent once, plus k previous ones again for each section after the first
    assert decoded_latents == total_latents + (sections - 1) * blend
    assert video.shape[2] == video_frame_count(sections, WINDOW) == 36 * sections + 1
    frames = torch.arange(video.shape[2], dtype=torch.float32)
    expected = torch.ceil(frames / 4) + 1
    assert torch.allclose(video[0, 0, :, 0, 0], expected, atol=1e-5)


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_decode_ranges_by_hand(variant):
    plans = plan_sections(seconds_for(3), WINDOW, variant)
    start = torch.zeros(1, 1, 1, 1, 1)
    history = initial_history(start, variant)
    ranges = []
    for plan in plans:
        history = append_section(history, torch.ones(1, 1, WINDOW, 1, 1), start, plan.is_last, variant)
        ranges.append(decode_range(plan, history, WINDOW, variant))
    if variant == "inverted":
        assert ranges == [(0, 9), (0, 18), (0, 19)]
    else:  # history: 19 zeros + start + 9·k
        assert ranges == [(19, 10), (20, 18), (29, 18)]


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_decode_ranges_with_three_blend_latents_by_hand(variant):
    plans = plan_sections(seconds_for(3), WINDOW, variant)
    start = torch.zeros(1, 1, 1, 1, 1)
    history = initial_history(start, variant)
    ranges = []
    for plan in plans:
        history = append_section(history, torch.ones(1, 1, WINDOW, 1, 1), start, plan.is_last, variant)
        ranges.append(decode_range(plan, history, WINDOW, variant, blend_latents=3))
    if variant == "inverted":
        assert ranges == [(0, 9), (0, 12), (0, 13)]
    else:  # history: 19 zeros + start + 9·k; the 3 newest of the previous section lead
        assert ranges == [(19, 10), (26, 12), (35, 12)]


def decoded_latents_for(sections: int, blend: int | None, variant: str) -> int:
    start = torch.zeros(1, 1, 1, 1, 1)
    history = initial_history(start, variant)
    total = 0
    for plan in plan_sections(seconds_for(sections), WINDOW, variant):
        history = append_section(history, torch.ones(1, 1, WINDOW, 1, 1), start, plan.is_last, variant)
        total += decode_range(plan, history, WINDOW, variant, blend)[1]
    return total


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_five_seconds_decode_far_fewer_latents_with_three_blend_latents(variant):
    assert section_count(5, WINDOW) == 4 and latent_frame_count(4, WINDOW) == 37
    reference = decoded_latents_for(4, None, variant)
    assert reference == decoded_latents_for(4, WINDOW, variant) == 64  # 1.73x the 37 the video needs
    assert decoded_latents_for(4, 3, variant) == 46  # 1.24x
    assert decoded_latents_for(4, 1, variant) == 40
    assert decoded_latents_for(4, 33, variant) == reference  # clamped to the window


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_soft_append_with_one_shared_frame_takes_the_earlier_clip(variant):
    history = torch.full((1, 1, 5, 1, 1), 10.0)
    new = torch.full((1, 1, 4, 1, 1), 20.0)
    joined = soft_append(history, new, 1, variant)[0, 0, :, 0, 0]
    if variant == "inverted":  # new frames in front: the shared frame is the new clip's last
        assert joined.tolist() == [20.0] * 4 + [10.0] * 4
    else:  # history first: the shared frame is its last
        assert joined.tolist() == [10.0] * 5 + [20.0] * 3


def test_inverted_contexts_come_from_the_front_of_history():
    start = torch.full((1, 1, 1, 1, 1), -1.0)
    history = torch.arange(30, dtype=torch.float32).view(1, 1, 30, 1, 1)
    clean, context_2x, context_4x = context_from_history(history, start, "inverted")
    assert clean.flatten().tolist() == [-1.0, 0.0]
    assert context_2x.flatten().tolist() == [1.0, 2.0]
    assert context_4x.flatten().tolist() == [float(i) for i in range(3, 19)]


def test_f1_contexts_are_the_most_recent_frames():
    start = torch.full((1, 1, 1, 1, 1), -1.0)
    history = torch.arange(30, dtype=torch.float32).view(1, 1, 30, 1, 1)
    clean, context_2x, context_4x = context_from_history(history, start, "f1")
    assert clean.flatten().tolist() == [-1.0, 29.0]
    assert context_2x.flatten().tolist() == [27.0, 28.0]
    assert context_4x.flatten().tolist() == [float(i) for i in range(11, 27)]


def test_f1_first_context_is_zeros_and_the_start_latent():
    start = torch.full((1, 1, 1, 1, 1), 5.0)
    clean, context_2x, context_4x = context_from_history(initial_history(start, "f1"), start, "f1")
    assert clean.flatten().tolist() == [5.0, 5.0]
    assert context_2x.abs().sum().item() == 0 and context_4x.abs().sum().item() == 0


def test_append_moves_new_latents_to_history_device_and_dtype():
    start = torch.zeros(1, 1, 1, 1, 1)
    history = initial_history(start, "inverted")
    new = torch.ones(1, 1, 2, 1, 1, dtype=torch.float16)
    appended = append_section(history, new, start, is_last=True, variant="inverted")
    assert appended.dtype == torch.float32
    assert appended.flatten()[:4].tolist() == [0.0, 1.0, 1.0, 0.0]  # start latent, new, zeros


@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_soft_append_blend_weights_at_both_ends(variant):
    overlap = 5
    history = torch.full((1, 1, 8, 1, 1), 10.0)
    new = torch.full((1, 1, 7, 1, 1), 20.0)
    joined = soft_append(history, new, overlap, variant)[0, 0, :, 0, 0]
    assert joined.shape == (8 + 7 - overlap,)
    earlier, later = (20.0, 10.0) if variant == "inverted" else (10.0, 20.0)
    earlier_len = 7 if variant == "inverted" else 8
    seam = joined[earlier_len - overlap : earlier_len]
    # weights of the earlier clip: 1, 0.75, 0.5, 0.25, 0
    expected = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]) * earlier + torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]) * later
    assert torch.allclose(seam, expected)
    assert seam[0].item() == earlier and seam[-1].item() == later
    assert (joined[: earlier_len - overlap] == earlier).all() and (joined[earlier_len:] == later).all()


def test_soft_append_keeps_history_dtype_and_rejects_too_long_overlap():
    history = torch.zeros(1, 3, 4, 2, 2, dtype=torch.float16)
    new = torch.ones(1, 3, 6, 2, 2)
    assert soft_append(history, new, 2, "f1").dtype == torch.float16
    assert soft_append(history, new, 0, "f1").shape[2] == 10
    with pytest.raises(ValueError, match="overlap"):
        soft_append(history, new, 5, "f1")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: section_count(0, 9), "seconds"),
        (lambda: section_count(5, 0), "window"),
        (lambda: plan_sections(5, 9, "forward"), "variant"),
        (lambda: padding_schedule(0), "sections"),
        (lambda: overlap_frames(9, 0), "blend_latents"),
        (lambda: blend_frames(0), "blend_latents"),
    ],
)
def test_bad_input_names_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()
