"""What a running job is doing and how long it has left, from its stream of events.

Both front ends (the CLI's bar and the web UI's status box) read it. The remaining time
counts decoding too: after a section's steps the VAE decodes it, which on a real GPU
takes about as long as a dozen steps, and a bar that sat at 100 % through the decodes
told users nothing. So

    remaining ≈ remaining steps × measured s/step + remaining decodes × measured s/decode

where a step's time is measured within the sampling phases and a decode's from the first
section's decode on. Until the first decode has been measured the decode part is unknown,
and the text says so ("+ decoding"). Times are this client's clock (`now`), from the
arrival of the events; a server too old to send phase events gives only steps, and then
the rate is the server's elapsed time over the steps done, as before.
"""

from __future__ import annotations

import time
from typing import Callable

from . import stream

PHASE_NAMES = {
    "text": "encoding the prompt",
    "image": "encoding the image",
    "sampling": "sampling",
    "decode": "decoding",
}


def clock(seconds: float) -> str:
    """1:05, or 1:02:03 from an hour on."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def plan_text(plan: stream.Plan) -> str:
    """E.g. "video: 37 frames = 1.23 s (1 section of 9 latent frames) at 144×112"."""
    sections = "1 section" if plan.sections == 1 else f"{plan.sections} sections"
    return (
        f"video: {plan.frame_count} frames = {plan.seconds:.2f} s ({sections} of {plan.window} latent frames) "
        f"at {plan.width}×{plan.height}"
    )


def queued_text(event: stream.Queued) -> str:
    ahead = "next in line" if event.position == 1 else f"{event.position - 1} jobs ahead of it"
    return f"Queued on the server ({ahead}), waiting for {clock(event.waited_s)}"


class JobClock:
    """Follows one job's events; `phase`, `eta_s` and `text` say where it stands."""

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self._now = now
        self.sections = 0
        self.steps = 0
        self.phase = ""
        self.section = 0
        self.step = 0
        self.elapsed_s = 0.0  # the server's, from the last event that carried it
        self.plan: stream.Plan | None = None
        self._step_s = 0.0  # measured time within sampling phases …
        self._steps_timed = 0  # … over the steps it covers
        self._steps_done = 0
        self._last_step_at: float | None = None
        self._decode_started_at: float | None = None
        self._decode_s = 0.0
        self._decodes_done = 0
        self._phase_events = False

    def update(self, event: stream.Event) -> None:
        now = self._now()
        if isinstance(event, stream.Plan):
            self.plan, self.sections = event, event.sections
        elif isinstance(event, stream.Phase):
            self._phase_events = True
            self.phase, self.section, self.sections, self.elapsed_s = (
                event.phase, event.section, event.sections, event.elapsed_s)
            self.step = 0
            self._last_step_at = now if event.phase == "sampling" else None
            self._decode_started_at = now if event.phase == "decode" else None
        elif isinstance(event, stream.Progress):
            self.phase = "sampling"
            self.section, self.sections, self.step, self.steps = (
                event.section, event.sections, event.step, event.steps)
            self.elapsed_s = event.elapsed_s
            self._steps_done = (event.section - 1) * event.steps + event.step
            if self._last_step_at is not None:
                self._step_s += now - self._last_step_at
                self._steps_timed += 1
                self._last_step_at = now
        elif isinstance(event, stream.Section):
            if self._decode_started_at is not None:
                self._decode_s += now - self._decode_started_at
                self._decode_started_at = None
            self._decodes_done = event.section

    def _seconds_per_step(self) -> float | None:
        if self._steps_timed:
            return self._step_s / self._steps_timed
        if not self._phase_events and self._steps_done:
            return self.elapsed_s / self._steps_done  # an older server: its clock includes encoding
        return None

    def eta_s(self) -> tuple[float, bool] | None:
        """(seconds left, whether that includes the decodes); None before the first step is timed."""
        per_step = self._seconds_per_step()
        if per_step is None or not self.sections or not self.steps:
            return None
        left = per_step * (self.sections * self.steps - self._steps_done)
        decodes_left = self.sections - self._decodes_done
        if not self._phase_events:
            return left, False
        if not self._decodes_done:
            return left, decodes_left == 0
        per_decode = self._decode_s / self._decodes_done
        in_progress = 0.0 if self._decode_started_at is None else self._now() - self._decode_started_at
        return left + max(decodes_left * per_decode - in_progress, 0.0), True

    def eta_text(self) -> str:
        eta = self.eta_s()
        if eta is None:
            return ""
        seconds, with_decodes = eta
        return f"ETA {clock(seconds)}" + ("" if with_decodes or not self._phase_events else " + decoding")

    def phase_text(self) -> str:
        """E.g. "Section 2/3 · step 4/25", "Section 2/3 · decoding", "Encoding the image"."""
        name = PHASE_NAMES.get(self.phase, self.phase)
        if self.phase == "sampling" and self.step and self.sections:
            return f"Section {self.section}/{self.sections} · step {self.step}/{self.steps}"
        if self.section and self.sections:
            return f"Section {self.section}/{self.sections} · {name}"
        return name[:1].upper() + name[1:]

    def text(self) -> str:
        parts = [self.phase_text(), f"{clock(self.elapsed_s)} elapsed"]
        eta = self.eta_text()
        return " · ".join(parts + ([eta] if eta else []))
