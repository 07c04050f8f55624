"""MagCache: skip the transformer blocks on steps whose residual barely changes in magnitude.

MagCache (Ma et al. 2025, arXiv 2506.09045) observed that the ratio of the norms of
consecutive steps' block residuals, ‖r_t‖ / ‖r_{t-1}‖ averaged over tokens, follows
almost the same curve for every input. It calibrates that curve once per model (the
magnitude ratio table) and skips a step while the error of reusing an old residual,
estimated from the table alone, stays small:

  after the first `retention` fraction of the steps, each step multiplies the ratios
  accumulated since the last computed step, adds |1 − product| to an error sum, and is
  skipped when that sum is ≤ threshold, at most `max_skips` steps in a row have been
  skipped, and its own ratio is within 0.06 of 1; otherwise it is computed and the
  product, sum and count restart.

The decisions read only the table, never the activations: each section's whole schedule
is known before its first step (`magcache_schedule`), so deciding costs no GPU work and
no host sync.

Differences from the authors' FramePack port (MagCache4FramePack), on purpose, as in
teacache.py: decisions are per sampling step, not per forward call (with real CFG the
port's counter would advance twice per step and read the wrong table entries), and each
CFG branch keeps its own residual. With cfg = 1, the FramePack default, the skipped
steps are the port's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .variants import SamplingVariant

# Magnitude ratio per step for 25 steps, first entry for step 0 (never read), as the
# MagCache authors calibrated them for each FramePack transformer (MagCache4FramePack,
# `initialize_magcache`). Other step counts take the nearest entries (`ratios_for_steps`).
MAGNITUDE_RATIOS: dict[SamplingVariant, tuple[float, ...]] = {
    SamplingVariant.INVERTED: (
        1.0, 1.26562, 1.23438, 1.03125, 1.02344, 1.03906, 1.01562, 1.03906, 1.05469, 1.02344, 1.03906, 0.99609,
        1.03125, 1.02344, 1.01562, 1.02344, 1.00781, 1.04688, 0.98828, 1.0, 1.00781, 0.98828, 0.94141, 0.94141,
        0.78906,
    ),
    SamplingVariant.F1: (
        1.0, 1.25781, 1.08594, 1.02344, 1.00781, 1.02344, 1.00781, 1.02344, 1.05469, 0.99609, 1.03906, 1.00781,
        1.01562, 1.00781, 1.02344, 1.01562, 0.98047, 1.05469, 0.98047, 0.96875, 1.03125, 0.97266, 0.9375, 0.96484,
        0.78516,
    ),
}
# A step whose own ratio is further than this from 1 is always computed (the authors' bound).
MAX_STEP_RATIO_DEVIATION = 0.06


def ratios_for_steps(ratios: Sequence[float], steps: int) -> np.ndarray:
    """The calibrated table resampled to `steps` entries by nearest index, as the authors do.

    numpy's round (half to even) picks the index, as theirs does, so ties land on the
    same entries. One step takes the last entry.
    """
    table = np.asarray(ratios, dtype=np.float64)
    if steps == 1:
        return table[-1:]
    scale = (len(table) - 1) / (steps - 1)
    return table[np.round(np.arange(steps) * scale).astype(int)]


def magcache_schedule(
    ratios: Sequence[float], steps: int, threshold: float, max_skips: int, retention: float
) -> tuple[bool, ...]:
    """For each of a section's `steps`, whether the blocks run (True) or the cached residual is reused."""
    table = ratios_for_steps(ratios, steps)
    # The authors' int(retention * steps), float product included, so the kept steps match.
    first_skippable = max(1, int(retention * steps))
    compute = []
    product, error, skipped = 1.0, 0.0, 0
    for step in range(steps):
        skip = False
        if step >= first_skippable:
            ratio = float(table[step])
            product *= ratio
            error += abs(1.0 - product)
            skipped += 1
            skip = error <= threshold and skipped <= max_skips and abs(1.0 - ratio) <= MAX_STEP_RATIO_DEVIATION
            if not skip:
                product, error, skipped = 1.0, 0.0, 0
        compute.append(not skip)
    return tuple(compute)


class MagCache:
    """The step cache for one job: the schedule of each section, per-branch residuals.

    Same interface as TeaCache (the transformer's `TeaCacheHook`); `reads_signal` is
    False, so the transformer does not compute TeaCache's change signal for it.
    """

    reads_signal = False

    def __init__(self, ratios: Sequence[float], steps: int, threshold: float, max_skips: int, retention: float):
        self.schedule = magcache_schedule(ratios, steps, threshold, max_skips, retention)
        self.computed_steps = 0
        self.skipped_steps = 0
        self.reset()

    @classmethod
    def for_variant(cls, sampling: SamplingVariant | str, steps: int, threshold: float, max_skips: int,
                    retention: float) -> MagCache:
        """With the authors' calibration of the transformer this sampling variant loads."""
        return cls(MAGNITUDE_RATIOS[SamplingVariant(sampling)], steps, threshold, max_skips, retention)

    def reset(self) -> None:
        """Start of a section: the schedule starts again and no residual is cached."""
        self._residual: dict[int, torch.Tensor] = {}
        self._step = 0
        self._branch = -1

    def begin_step(self, index: int) -> None:
        """Called once per sampling step, before that step's forward calls."""
        self._step = index
        self._branch = -1

    def should_compute(self, modulated: torch.Tensor | None = None) -> bool:
        self._branch += 1
        compute = self._step >= len(self.schedule) or self.schedule[self._step]
        if not compute and self._branch not in self._residual:
            raise RuntimeError("MagCache has no cached residual for this branch")
        if self._branch == 0:
            if compute:
                self.computed_steps += 1
            else:
                self.skipped_steps += 1
        return compute

    def apply_cached(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self._residual[self._branch]

    def remember(self, before: torch.Tensor, after: torch.Tensor) -> None:
        self._residual[self._branch] = after - before


def magnitude_ratio(residual: torch.Tensor, previous_residual: torch.Tensor) -> torch.Tensor:
    """The calibration quantity: mean over tokens of ‖residual‖ / ‖previous residual‖ (last dim = channels).

    Recording it on every step of a run with every step computed gives a new table
    (for another step count or a fine-tuned transformer); 0-dim fp32, no host sync.
    """
    return (residual.float().norm(dim=-1) / previous_residual.float().norm(dim=-1)).mean()
