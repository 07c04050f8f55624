"""A job's LoRAs on the adapted layers, for that job only; the base weights are exactly as before after it.

Several LoRAs on one layer are stacked once per job: A holds their down matrices, B their
up matrices, each scaled by strength · alpha / rank, so any number of them costs one
low-rank product per layer. Each adapted layer then runs one of three ways:

- `merged_once` (float layers whose weights stay on the device for the whole job, memory
  mode `resident`): W ← round(W + B·A) in place at the job's first forward, undone bit for
  bit when the job ends, is cancelled or fails, without a copy of W: lora/merge.py
  recomputes B·A and keeps the few original values its subtraction misses. No per-call
  cost, and the layer stays a plain linear layer, so the fused kernels keep their
  GEMM-epilogue GELU and split output projection on it (models/fused.py: `_is_plain_linear`)
  and CUDA graphs replay it.
- `merged` per call (float layers in `offload` and `stream`, where W is copied in per phase
  or per forward, so a merge once would be lost with the copy or, in `stream`, would mean
  rewriting the packed host buffers): a forward pre-hook points the weight tensor's data at
  a fresh W + B·A just before the layer runs, and a hook points it back at W right after,
  the device-side swap the memory manager already does (memory/host.py; in `stream` the
  pre-hook runs after the block was copied into its slot). Costs one read of W and one
  write of a temporary per call, whatever the number of tokens: cheaper than `unmerged`
  when tokens · (in + 2·out) > 2 · in · out, i.e. above about 2 000 tokens for a 3072×3072
  layer; a 640-bucket FramePack section has about 20 000.
- `unmerged` (a forward hook): output += (x · Aᵀ) · Bᵀ. Costs two thin GEMMs plus one
  more read of x and a read and write of the output, per call: it grows with the tokens.
  FP8 layers (models/fp8.py) always run this way: their weights are e4m3 with
  per-channel scales, and adding B·A to them would mean requantizing (lossy for the base).
  An FP8 layer reads an `Fp8Activation`; the low-rank path reads the same rounded input.

`float_layers_for` is the one place that picks the float layers' form. Per-call layers run
as plain module calls under the fused kernels, giving up their fast paths. Every form leaves
W as it was, so a job after a LoRA job is bit-identical to one before it. A job's LoRAs are
applied at its first forward (`job_loras`): only then are its weights placed for its memory
mode (`MemoryManager.prepare` in the pipeline's `_run`). benchmarks/lora.py times each form
against no LoRA, the time to apply and remove, and the size of the merge's correction.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ..models.fp8 import Fp8Activation, Fp8Linear
from ..settings import SettingsError
from .choices import LORAS_FIELD, LoraChoice
from .folder import LoraFolder
from .footprint import device_bytes, layer_factors, stacked
from .formats import LoraFile, LoraFileError
from .merge import MergedInPlace


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


FORMS = ("merged_once", "merged", "unmerged")


def float_layers_for(resident: bool) -> str:
    """The form of a job's float (bf16/fp32) layers: merged once where their weights stay on
    the device for the job, else merged per call (see the module docstring; FP8 layers are
    always `unmerged`). benchmarks/lora.py measures the forms."""
    return "merged_once" if resident else "merged"


@dataclass
class Adapted:
    """What `loras_applied` did: layers adapted, and for `merged_once` how many weight
    elements were merged and how many the exact undo keeps (lora/merge.py)."""

    layers: int
    merged_elements: int = 0
    kept_elements: int = 0
    kept_bytes: int = 0


def _compute_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a layer's output has: its weight's, or for FP8 its bias's (the activation dtype)."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.is_floating_point() and weight.element_size() > 1:
        return weight.dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else default


@contextmanager
def loras_applied(model: nn.Module, loras: Sequence[tuple[LoraFile, float]], device: torch.device,
                  dtype: torch.dtype, float_layers: str = "merged") -> Iterator[Adapted]:
    """Add `loras` ((file, strength) pairs) to `model` for the block's duration, float layers in
    the form `float_layers` (FORMS; FP8 layers unmerged); yields what was adapted. The factors
    go to `device` now (small: rank × (in + out) per layer) and are freed on exit; whatever
    ends the block, the weights merged so far are restored and the hooks removed."""
    if float_layers not in FORMS:
        raise ValueError(f"float_layers={float_layers!r} is not allowed: expected one of {FORMS}")
    per_layer = layer_factors(loras)
    modules = dict(model.named_modules())
    adapted = Adapted(layers=len(per_layer))
    merges: list[MergedInPlace] = []
    with ExitStack() as undo:  # every undo runs even if one fails
        undo.callback(_check_restored, merges)  # registered first, so it runs after every undo
        for name, parts in per_layer.items():
            module = modules[name]
            down, up = stacked(parts, device)
            form = "unmerged" if isinstance(module, Fp8Linear) else float_layers
            if form == "merged_once":
                merged = MergedInPlace(module.weight, down, up)
                merges.append(merged)
                undo.callback(merged.undo)
                adapted.merged_elements += module.weight.numel()
                adapted.kept_elements += merged.kept.numel()
                adapted.kept_bytes += merged.kept_bytes
                continue
            # Per call: rounded once to the layer's dtype.
            layer_dtype = _compute_dtype(module, dtype)
            down, up = down.to(layer_dtype), up.to(layer_dtype)
            if form == "merged":
                per_call = MergedWeight(down, up)
                undo.callback(module.register_forward_pre_hook(per_call.before).remove)
                undo.callback(module.register_forward_hook(per_call.after).remove)
            else:
                undo.callback(module.register_forward_hook(LowRankPath(down, up)).remove)
        yield adapted


class LoraUndoError(RuntimeError):
    """A LoRA merged into the weights was not undone exactly: the base weights changed."""


def _check_restored(merges: Sequence[MergedInPlace]) -> None:
    """Every undone merge gave back its weight's checksum (one host sync for all of them)."""
    undone = [merge.restored for merge in merges if merge.restored is not None]
    if undone and not bool(torch.stack(undone).all()):
        raise LoraUndoError("a LoRA merged into the weights was not undone exactly: the base weights changed; "
                            "restart the server to reload them")


@dataclass(frozen=True)
class JobLoras:
    """What `job_loras` yields: how many layers the job's LoRAs adapt and, per form of the
    float layers (FORMS), the device bytes they hold while applied (footprint.py)."""

    layers: int
    bytes_by_form: Mapping[str, int]

    def bytes_held(self, resident: bool) -> int:
        """The device bytes they hold in a job whose weights stay on the device (`resident`) or not."""
        return self.bytes_by_form.get(float_layers_for(resident), 0)


@contextmanager
def job_loras(model: nn.Module, folder: LoraFolder | None, choices: Sequence[LoraChoice], device: torch.device,
              dtype: torch.dtype, resident: Callable[[], bool] = lambda: False) -> Iterator[JobLoras]:
    """The pipeline's per-job entry: load (cached) and check the request's LoRAs now, apply
    them at the model's first forward, when the job's weights are placed (`resident()` then
    says whether they stay on the device for the job: float_layers_for), remove them on
    exit. Yields their JobLoras, for the memory planner to count before it places the weights."""
    loaded = load_choices(folder, choices, lora_targets(model)) if choices else []
    if not loaded:
        yield JobLoras(0, {})
        return
    with ExitStack() as applied:
        def apply_at_first_forward(module: nn.Module, args: tuple) -> None:
            first_forward.remove()
            applied.enter_context(loras_applied(model, loaded, device, dtype, float_layers_for(resident())))

        first_forward = model.register_forward_pre_hook(apply_at_first_forward)
        applied.callback(first_forward.remove)
        yield JobLoras(len({name for lora, _ in loaded for name in lora.layers}), device_bytes(model, loaded))
