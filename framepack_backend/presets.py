"""Generation presets and flow presets: the one table every front end reads.

Values are the seed application's. One deliberate change: the flow preset's mu
offset is applied *after* the ln 7 cap on mu (see `schedule.schedule_for`); the
seed added it before the cap, so at normal resolutions it had no effect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlowPreset:
    mu_offset: float
    sigma: float


FLOW_PRESETS: dict[str, FlowPreset] = {
    "standard": FlowPreset(mu_offset=0.0, sigma=1.0),
    "dance": FlowPreset(mu_offset=-0.15, sigma=1.03),
    "talking": FlowPreset(mu_offset=-0.15, sigma=1.05),
    "action": FlowPreset(mu_offset=0.1, sigma=0.95),
    "subtle": FlowPreset(mu_offset=-0.3, sigma=1.15),
    "hand_detail": FlowPreset(mu_offset=-0.45, sigma=1.25),
}

# Clamps applied to (mu + offset, sigma) after the preset is chosen.
FLOW_SIGMA_RANGE = (0.7, 1.3)
FLOW_MU_MIN = 0.3


@dataclass(frozen=True)
class Preset:
    teacache: bool
    steps: int
    gs: float
    gpu_memory_preservation: float
    flow_preset: str

    def as_settings(self) -> dict[str, object]:
        return {
            "teacache": self.teacache,
            "steps": self.steps,
            "gs": self.gs,
            "gpu_memory_preservation": self.gpu_memory_preservation,
            "flow_preset": self.flow_preset,
        }


PRESETS: dict[str, Preset] = {
    "Default": Preset(teacache=True, steps=25, gs=10.0, gpu_memory_preservation=6.0, flow_preset="standard"),
    "Dance": Preset(teacache=False, steps=30, gs=12.0, gpu_memory_preservation=6.0, flow_preset="dance"),
    "Talking": Preset(teacache=True, steps=22, gs=8.0, gpu_memory_preservation=6.0, flow_preset="talking"),
    "Action": Preset(teacache=False, steps=30, gs=12.0, gpu_memory_preservation=6.0, flow_preset="action"),
    "Subtle Movement": Preset(teacache=True, steps=20, gs=7.0, gpu_memory_preservation=6.0, flow_preset="subtle"),
    "Hand Movement": Preset(teacache=False, steps=35, gs=14.0, gpu_memory_preservation=8.0, flow_preset="hand_detail"),
}
