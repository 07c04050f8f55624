"""The device bytes a job's LoRAs hold while applied, for the memory planner.

A job's LoRAs are on the device from its first forward to its end (apply.py: `job_loras`),
so memory/footprint.py counts these bytes beside the sampling and decode phases' working
memory. They depend on the form of the float layers (apply.py), which the memory mode picks:

- every form: each adapted layer's stacked factors in fp32 (the per-call forms round
  them to the layer's dtype, so fp32 bounds them);
- `merged_once` (resident): the exact undo's kept originals and their indices (merge.py),
  about RMS(Δ)/RMS(W) of a layer's elements (estimated with a margin: the fraction depends
  on how W's values spread); and while one layer merges, its Δ and W + Δ
  in fp64 with the merged and the undone copies in W's dtype, for the largest layer;
- `merged` per call (offload, stream): W + B·A of the largest float layer, while it runs.

FP8 layers always run unmerged: their temporaries are tokens × rank, small beside the
activations' estimate. Temporaries are counted on top of the activations, a bound: the
merge's are freed before the first forward's activations exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..models.fp8 import Fp8Linear
from .formats import LoraFile
from .merge import DELTA_DTYPE

# The kept fraction per unit of RMS(Δ)/RMS(W), with a margin over merge.py's measured
# 1.3, 2.3 and 4.6 % at relative changes of 1, 2 and 5 %.
KEPT_PER_RELATIVE_CHANGE = 1.5
DELTA_BYTES = torch.finfo(DELTA_DTYPE).bits // 8


def layer_factors(loras: Sequence[tuple[LoraFile, float]]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """{layer: [(down, up, strength), …]}: the factors of every LoRA on each adapted layer."""
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for lora, strength in loras:
        for name, layer in lora.layers.items():
            per_layer.setdefault(name, []).append((layer.down, layer.up, strength))
    return per_layer


def stacked(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's LoRAs as one pair on `device`, fp32: the down rows (rank, in) stacked, and
    the up columns (out, rank) scaled by each LoRA's strength."""
    return (torch.cat([down.to(device) for down, _, _ in parts]),
            torch.cat([up.to(device) * strength for _, up, strength in parts], dim=1))


def device_bytes(model: nn.Module, loras: Sequence[tuple[LoraFile, float]]) -> dict[str, int]:
    """{form: bytes} for each form of the float layers (apply.FORMS): what `loras` hold on
    the device while applied to `model` that way (see the module docstring)."""
    per_layer = layer_factors(loras)
    modules = dict(model.named_modules())
    held = sum(lora.nbytes for lora, _ in loras)  # stacking concatenates: the same fp32 bytes
    weights = {name: modules[name].weight for name in per_layer if not isinstance(modules[name], Fp8Linear)}
    if not weights:
        return dict.fromkeys(("merged_once", "merged", "unmerged"), held)
    kept = sum(kept_bytes_estimate(modules[name], *stacked(per_layer[name])) for name in weights)
    # One merge's temporaries per element (merge.py: MergedInPlace): Δ and one fp64 sum, the
    # merged and the undone copies in W's dtype, and the comparison's booleans.
    merging = max(w.numel() * (2 * DELTA_BYTES + 2 * w.element_size() + 1) for w in weights.values())
    per_call = max(w.numel() * w.element_size() for w in weights.values())
    return {"merged_once": held + kept + merging, "merged": held + per_call, "unmerged": held}


def kept_bytes_estimate(layer: nn.Module, down: torch.Tensor, up: torch.Tensor) -> int:
    """The bytes a merge once of up · down into `layer` keeps for its exact undo: the kept
    fraction is about RMS(Δ)/RMS(W) on weights like a model's (merge.py), taken with a margin."""
    weight = layer.weight
    change = relative_change(layer, down, up)
    kept = math.ceil(min(1.0, KEPT_PER_RELATIVE_CHANGE * change) * weight.numel())
    index_bytes = 4 if weight.numel() < 2**31 else 8  # merge.py keeps int32 indices where they fit
    return kept * (index_bytes + weight.element_size())


def relative_change(layer: nn.Module, down: torch.Tensor, up: torch.Tensor) -> float:
    """RMS(up · down) / RMS(W), without forming up · down: ‖U D‖² = Σ (UᵀU) ⊙ (D Dᵀ), rank × rank."""
    u, d = up.detach().to(torch.float64), down.detach().to(torch.float64)
    change = float((u.t() @ u).mul(d @ d.t()).sum().clamp(min=0).sqrt()) / math.sqrt(layer.weight.numel())
    weight = _weight_rms(layer.weight.detach())
    return math.inf if weight == 0 else change / weight


# RMS(W) from about this many evenly spaced rows: an estimate with a margin needs no more,
# and reading every weight of a model held in host memory (offload, stream) takes seconds.
SAMPLED_ROWS = 256


def _weight_rms(weight: torch.Tensor) -> float:
    rows = weight[:: max(1, weight.shape[0] // SAMPLED_ROWS)]
    return float(torch.linalg.vector_norm(rows, dtype=torch.float64)) / math.sqrt(rows.numel())
