"""A job's LoRAs beside the adapted layers, for that job only; the base weights are never written.

Several LoRAs on one layer are stacked once per job: A holds their down matrices, B their
up matrices, each scaled by strength · alpha / rank, so any number of them costs one
low-rank product per layer. Each adapted layer then runs one of two ways:

- `unmerged` (a forward hook): output += (x · Aᵀ) · Bᵀ. Costs two thin GEMMs plus one
  more read of x and a read and write of the output, per call: it grows with the tokens.
  FP8 layers (models/fp8.py) always run this way: their weights are e4m3 with
  per-channel scales, and adding B·A to them would mean requantizing (lossy for the base).
  An FP8 layer reads an `Fp8Activation`; the low-rank path reads the same rounded input.
- `merged` (a forward pre-hook and a forward hook): just before the layer runs, its weight
  tensor's data is pointed at a fresh W + B·A, and back at W right after, the device-side
  swap the memory manager already does (memory/host.py). Costs one read of W and one
  write of a temporary per call, whatever the number of tokens: cheaper than `unmerged`
  when tokens · (in + 2·out) > 2 · in · out, i.e. above about 2 000 tokens for a 3072×3072
  layer; a 640-bucket FramePack section has about 20 000.

Why not merge into W once per job and undo it after: undoing a bf16 merge by subtracting
is not exact (rounding), so the originals must be kept; `resident` has no host copy of
them (about 25 GB for the 13B model), and `stream` reads the blocks from packed host
buffers each forward, so a merge there means rewriting those buffers. Both per-call
forms work unchanged in every memory mode (in `stream`, the pre-hook runs after the block
was copied into its slot), with FP8 and with the fused kernels, and leave W untouched, so
a job after a LoRA job is bit-identical to one before it. The fused path runs adapted
layers as plain module calls (models/fused.py: `_is_plain_linear`), giving up its GEMM-
epilogue GELU and split output projection on them. benchmarks/lora.py measures both
forms against no LoRA and the time to apply and remove; FLOAT_LAYERS picks the form.
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
            # e4m3 values are exact in bf16; the per-row scale is applied to the rank-wide product.
            low_rank = ((x.values.to(self.down.dtype) @ self.down.t()).float() * x.scale).to(self.down.dtype)
        else:
            low_rank = x.reshape(-1, x.shape[-1]).to(self.down.dtype) @ self.down.t()
        output.view(-1, output.shape[-1]).addmm_(low_rank, self.up.t())
        return output


class MergedWeight:
    """The pre-hook and hook of one adapted float layer: W + up · down while it runs."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up
        self._original: torch.Tensor | None = None

    def before(self, module: nn.Linear, args: tuple) -> None:
        original = module.weight.data
        self._original = original
        module.weight.data = torch.addmm(original, self.up, self.down)

    def after(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        assert self._original is not None, "a LoRA weight swap ended without starting"
        module.weight.data = self._original
        self._original = None


# How float (bf16/fp32) layers take a LoRA; FP8 layers are always unmerged. Per-call merging
# costs do not grow with the tokens (see the module docstring); benchmarks/lora.py compares.
FLOAT_LAYERS = "merged"
FORMS = ("merged", "unmerged")


def _compute_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a layer's output has: its weight's, or for FP8 its bias's (the activation dtype)."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.is_floating_point() and weight.element_size() > 1:
        return weight.dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else default


@contextmanager
def loras_applied(model: nn.Module, loras: Sequence[tuple[LoraFile, float]], device: torch.device,
                  dtype: torch.dtype, float_layers: str = FLOAT_LAYERS) -> Iterator[int]:
    """Add `loras` ((file, strength) pairs) to `model` for the block's duration, float layers
    `merged` or `unmerged` per call; yields how many layers were adapted. The factors go to
    `device` now (small: rank × (in + out) per layer) and are freed on exit."""
    if float_layers not in FORMS:
        raise ValueError(f"float_layers={float_layers!r} is not allowed: expected one of {FORMS}")
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for lora, strength in loras:
        for name, layer in lora.layers.items():
            per_layer.setdefault(name, []).append((layer.down, layer.up, strength))
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, parts in per_layer.items():
            module = modules[name]
            layer_dtype = _compute_dtype(module, dtype)
            # Stacked and scaled on the device, in fp32, then rounded once to the layer's dtype.
            down = torch.cat([d.to(device) for d, _, _ in parts]).to(layer_dtype)
            up = torch.cat([u.to(device) * s for _, u, s in parts], dim=1).to(layer_dtype)
            if float_layers == "merged" and not isinstance(module, Fp8Linear):
                merged = MergedWeight(down, up)
                handles.append(module.register_forward_pre_hook(merged.before))
                handles.append(module.register_forward_hook(merged.after))
            else:
                handles.append(module.register_forward_hook(LowRankPath(down, up)))
        yield len(per_layer)
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
