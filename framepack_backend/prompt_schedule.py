"""Timed prompts: `[0s: a cat sits] [2.5s: the cat jumps]` → which prompt conditions which section.

Torch-free. `parse_prompt_schedule` reads the prompt parameter (plain text is one prompt
from 0 s, kept verbatim); `section_prompt_weights` gives each section, in generation order,
the prompts it is conditioned on and their weights (one prompt with weight 1, or a linear mix
for `blend_sections` sections after a change). The mapping of video time to generation order
is the planner's (`planner.video_section`, `planner.section_seconds`).

A section takes the prompt active at its middle: a section spans 4·window frames (1.2 s at
window 9), so its middle is the time most of its frames are nearest to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import planner
from .settings import SettingsError
from .variants import SamplingVariant

# One timed entry: "[", seconds, "s", ":", text, "]". The text may not hold brackets.
_ENTRY = re.compile(r"\[\s*(?P<seconds>\d+(?:\.\d+)?)\s*s\s*:(?P<text>[^\[\]]*)\]")
# A prompt is a schedule when it starts with what looks like an entry's head.
_LOOKS_TIMED = re.compile(r"\s*\[\s*\d+(?:\.\d+)?\s*s\s*:")
_FIELD = "prompt"
_SYNTAX = ("a plain prompt, or timed prompts '[0s: text] [2.5s: text]' "
           "(seconds ascending from 0, no brackets in the text)")


@dataclass(frozen=True)
class TimedPrompt:
    start_s: float
    text: str


def parse_prompt_schedule(prompt: str) -> tuple[TimedPrompt, ...]:
    """The prompts of `prompt` with their start times; SettingsError naming the position of an error."""
    if not _LOOKS_TIMED.match(prompt):
        return (TimedPrompt(0.0, prompt),)
    entries: list[TimedPrompt] = []
    position = 0
    while True:
        while position < len(prompt) and prompt[position].isspace():
            position += 1
        if position == len(prompt):
            break
        match = _ENTRY.match(prompt, position)
        if match is None:
            raise SettingsError(_FIELD, prompt[position:], f"{_SYNTAX}; malformed entry at character {position}")
        start_s, text = float(match["seconds"]), match["text"].strip()
        if not text:
            raise SettingsError(_FIELD, match[0], f"{_SYNTAX}; empty prompt at character {position}")
        if not entries and start_s != 0:
            raise SettingsError(
                _FIELD, match[0], f"{_SYNTAX}; the first prompt must start at 0s (character {position})"
            )
        if entries and start_s <= entries[-1].start_s:
            raise SettingsError(
                _FIELD, match[0],
                f"{_SYNTAX}; {start_s:g}s at character {position} is not after {entries[-1].start_s:g}s",
            )
        entries.append(TimedPrompt(start_s, text))
        position = match.end()
    return tuple(entries)


def check_schedule_fits(schedule: tuple[TimedPrompt, ...], sections: int, window: int) -> None:
    """Refuse a prompt that starts after the video's last frame (it would never be seen)."""
    end = planner.video_seconds(sections, window)
    for entry in schedule:
        if entry.start_s > end:
            raise SettingsError(
                _FIELD, f"[{entry.start_s:g}s: {entry.text}]",
                f"start times within the planned video, 0 to {end:g} s ({sections} sections of {window} latents)",
            )


def distinct_prompts(schedule: tuple[TimedPrompt, ...]) -> tuple[str, ...]:
    """Each prompt text once, in order of first use: what the text phase encodes."""
    return tuple(dict.fromkeys(entry.text for entry in schedule))


def _active_at(schedule: tuple[TimedPrompt, ...], seconds: float) -> str:
    return [entry.text for entry in schedule if entry.start_s <= seconds][-1]


def section_prompt_weights(
    schedule: tuple[TimedPrompt, ...],
    sections: int,
    window: int,
    variant: SamplingVariant | str = "inverted",
    blend_sections: int = 0,
) -> list[tuple[tuple[int, float], ...]]:
    """Per section in generation order: ((index into distinct_prompts, weight), …), weights summing to 1.

    In playback order a section takes the prompt active at its middle. After a change, the
    `blend_sections` sections from the change on mix the previous prompt and the new one,
    the new one's weight rising linearly, (j + 1)/(blend_sections + 1) in the j-th; the
    section after them has the new prompt alone. A change inside a blend starts a new blend
    from the prompt that was fading in.
    """
    texts = distinct_prompts(schedule)
    active = []
    for k in range(sections):
        start, end = planner.section_seconds(k, window)
        active.append(texts.index(_active_at(schedule, (start + end) / 2)))
    by_playback: list[tuple[tuple[int, float], ...]] = []
    previous, since_change = active[0], blend_sections
    for k, prompt in enumerate(active):
        if k > 0 and prompt != active[k - 1]:
            previous, since_change = active[k - 1], 0
        if since_change < blend_sections:
            weight = (since_change + 1) / (blend_sections + 1)
            by_playback.append(((previous, 1.0 - weight), (prompt, weight)))
        else:
            by_playback.append(((prompt, 1.0),))
        since_change += 1
    return [by_playback[planner.video_section(i, sections, variant)] for i in range(sections)]
