"""Timed prompts (pure): parsing, errors with their position, video time → generation order, blends."""

import pytest

from framepack_backend import planner
from framepack_backend.prompt_schedule import (
    TimedPrompt,
    check_schedule_fits,
    distinct_prompts,
    parse_prompt_schedule,
    section_prompt_weights,
)
from framepack_backend.settings import SettingsError


def test_plain_text_is_one_prompt_from_zero_kept_verbatim():
    assert parse_prompt_schedule("  a cat [sits] ") == (TimedPrompt(0.0, "  a cat [sits] "),)


def test_timed_entries_parse_with_their_seconds():
    assert parse_prompt_schedule("[0s: a cat sits] [2.5s: the cat jumps]") == (
        TimedPrompt(0.0, "a cat sits"), TimedPrompt(2.5, "the cat jumps"),
    )
    assert parse_prompt_schedule("[0s: a cat]") == (TimedPrompt(0.0, "a cat"),)


@pytest.mark.parametrize("prompt, position", [
    ("[0s: a cat] [2s the cat jumps]", 12),  # no colon
    ("[0s: a cat] jumps", 12),  # text outside an entry
    ("[0s: a cat", 0),  # unclosed
    ("[0s: a cat] [1s: ]", 12),  # empty prompt
    ("[0s: a] [2s: b] [1s: c]", 16),  # not ascending
    ("[0s: a] [0s: b]", 8),  # duplicate time
])
def test_a_malformed_schedule_is_refused_with_the_position(prompt, position):
    with pytest.raises(SettingsError) as error:
        parse_prompt_schedule(prompt)
    assert error.value.field == "prompt"
    assert f"character {position}" in error.value.allowed


def test_the_first_prompt_must_start_at_zero():
    with pytest.raises(SettingsError, match="must start at 0s"):
        parse_prompt_schedule("[1s: a cat]")


def test_a_prompt_after_the_video_is_refused():
    sections = planner.section_count(5, 9)  # 4 sections, 145 frames: the last at 4.8 s
    check_schedule_fits(parse_prompt_schedule("[0s: a] [4.8s: b]"), sections, 9)
    with pytest.raises(SettingsError, match="0 to 4.8 s"):
        check_schedule_fits(parse_prompt_schedule("[0s: a] [5s: b]"), sections, 9)


def test_distinct_prompts_are_listed_once_in_order_of_use():
    schedule = parse_prompt_schedule("[0s: a] [1s: b] [2s: a] [3s: c]")
    assert distinct_prompts(schedule) == ("a", "b", "c")


def test_sections_take_the_prompt_at_their_middle_and_inverted_runs_generate_the_end_first():
    # 4 sections of 1.2 s (window 9): middles 0.6, 1.8, 3.0, 4.2 s.
    schedule = parse_prompt_schedule("[0s: sit] [2.5s: jump] [4s: land]")
    by_generation = section_prompt_weights(schedule, 4, 9, "inverted")
    assert by_generation == [((2, 1.0),), ((1, 1.0),), ((0, 1.0),), ((0, 1.0),)]
    assert section_prompt_weights(schedule, 4, 9, "f1") == list(reversed(by_generation))


def test_a_blend_mixes_linearly_over_the_sections_after_a_change():
    schedule = parse_prompt_schedule("[0s: a] [1.3s: b]")  # 5 sections; b from the second (middle 1.8 s)
    playback = section_prompt_weights(schedule, 5, 9, "f1", blend_sections=2)
    assert playback == [
        ((0, 1.0),),
        ((0, 1 - 1 / 3), (1, 1 / 3)),
        ((0, 1 - 2 / 3), (1, 2 / 3)),
        ((1, 1.0),),
        ((1, 1.0),),
    ]


def test_time_maps_to_the_section_showing_it():
    # window 9: section k shows frames 36k+1 .. 36(k+1); frame 0 is section 0's.
    assert [planner.section_at(s, 4, 9) for s in (0, 1.2, 1.25, 2.4, 4.8)] == [0, 0, 1, 1, 3]
    assert [planner.video_section(i, 4, "inverted") for i in range(4)] == [3, 2, 1, 0]
    assert [planner.video_section(i, 4, "f1") for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        planner.section_at(4.9, 4, 9)
