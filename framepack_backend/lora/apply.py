"""A job's LoRAs as a low-rank path beside the adapted layers, never merged into them.

Each adapted layer gets a forward hook that adds `(x · Aᵀ) · Bᵀ` to its output, where A
stacks the down matrices of every LoRA that adapts the layer and B their up matrices,
each scaled by strength · alpha / rank: several LoRAs cost one pair of thin GEMMs per
layer, whatever their number. Leaving the job removes the hooks; the base weights are
never written, so a job after a LoRA job is bit-identical to one before it.

Why unmerged, not merged into W and undone after:
- the memory modes keep the block weights in packed host buffers that `stream` and
  `offload` copy from (memory/host.py); merging per job means rewriting those buffers
  (about 25 GB for the 13B model) and a copy of the originals to undo it;
- undoing a bf16 merge by subtracting is not exact (W + ΔW − ΔW ≠ W after rounding), so a
  merge needs the original weights kept anyway;
- FP8 layers hold e4m3 weights with per-channel scales (models/fp8.py): merging means
  dequantize, add, requantize (the scales change), which is lossy for the base too;
- the hooks work the same in every memory mode, with FP8 and with the fused kernels.
The price: two GEMMs with K or N = rank per adapted layer and forward, and the fused
path gives up its GEMM-epilogue GELU and split output projection on adapted layers (they
run as plain module calls so the hook sees them). benchmarks/lora.py measures both the
per-forward overhead and the time to apply and remove.

FP8 layers take an `Fp8Activation` (quantized once, shared by q, k, v and the MLP); the
low-rank path reads its dequantized value, i.e. the same rounded input the base GEMM
reads, in the activation's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..models.fp8 import Fp8Activation, Fp8Linear
from ..settings import SettingsError
from .choices import LORAS_FIELD, LoraChoice
from .folder import LoraFolder
from .formats import LoraFile, LoraFileError


def lora_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every layer a LoRA may adapt: the
    model's linear layers, FP8 ones included."""
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Fp8Linear))}


def load_choices(folder: LoraFolder | None, choices: Sequence[LoraChoice],
                 targets: dict[str, tuple[int, int]]) -> list[tuple[LoraFile, float]]:
    """The files of the choices with a nonzero strength; a file this model cannot use is the
    request's fault (SettingsError on `loras`, naming the file and its first offending key)."""
    active = [choice for choice in choices if choice.strength != 0]
    if not active:
        return []
    if folder is None:
        raise SettingsError(LORAS_FIELD, ",".join(map(str, active)), "no LoRA: this server has no LoRA folder")
    loaded = []
    for choice in active:
        try:
            loaded.append((folder.load(choice.name, targets), choice.strength))
        except LoraFileError as e:
            raise SettingsError(LORAS_FIELD, choice.name, f"a LoRA file this model can use; {e}") from None
    return loaded


class LowRankPath:
    """The forward hook of one adapted layer: output += (x · downᵀ) · upᵀ, in place."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if isinstance(x, Fp8Activation):
            x = (x.values.float() * x.scale).to(x.dtype)
        rows = x.reshape(-1, x.shape[-1]).to(self.down.dtype)
        output.view(-1, output.shape[-1]).addmm_(rows @ self.down.t(), self.up.t())
        return output


def _compute_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a layer's output has: its weight's, or for FP8 its bias's (the activation dtype)."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.is_floating_point() and weight.element_size() > 1:
        return weight.dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else default


@contextmanager
def loras_applied(model: nn.Module, loras: Sequence[tuple[LoraFile, float]], device: torch.device,
                  dtype: torch.dtype) -> Iterator[int]:
    """Add the low-rank path of `loras` ((file, strength) pairs) to `model` for the block's
    duration; yields how many layers were adapted. The factors go to `device` now (small:
    rank × (in + out) per layer) and are freed on exit."""
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora, strength in loras:
        for name, layer in lora.layers.items():
            per_layer.setdefault(name, []).append((layer.down, layer.up * strength))
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, parts in per_layer.items():
            module = modules[name]
            layer_dtype = _compute_dtype(module, dtype)
            down = torch.cat([d for d, _ in parts]).to(device, layer_dtype)
            up = torch.cat([u for _, u in parts], dim=1).to(device, layer_dtype)
            handles.append(module.register_forward_hook(LowRankPath(down, up)))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def job_loras(model: nn.Module, folder: LoraFolder | None, choices: Sequence[LoraChoice], device: torch.device,
              dtype: torch.dtype) -> Iterator[int]:
    """The pipeline's per-job entry: load (cached) and apply the request's LoRAs; yields how many layers."""
    loaded = load_choices(folder, choices, lora_targets(model)) if choices else []
    with loras_applied(model, loaded, device, dtype) as adapted:
        yield adapted
