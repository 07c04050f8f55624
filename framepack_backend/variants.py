"""The two sampling variants of FramePack, named once (torch-free, so launchers can import it).

- inverted: anti-drifting sampling, sections from the video's end back to its start
  (the FramePackI2V_HY checkpoint, sub-folder transformer/);
- f1: forward sampling, sections from the start (FramePack_F1_I2V_HY, sub-folder transformer_f1/).

A served model instance loads one of them; planner.py says how each lays out its sections.
"""

from __future__ import annotations

from enum import Enum


class SamplingVariant(str, Enum):
    INVERTED = "inverted"
    F1 = "f1"

    def __str__(self) -> str:  # the plain name in messages and f-strings, on every Python version
        return self.value

    @property
    def transformer_folder(self) -> str:
        """The model directory's sub-folder holding this variant's transformer."""
        return {SamplingVariant.INVERTED: "transformer", SamplingVariant.F1: "transformer_f1"}[self]


VARIANT_NAMES: tuple[str, ...] = tuple(variant.value for variant in SamplingVariant)
