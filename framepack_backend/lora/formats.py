"""LoRA files in the key conventions of the HunyuanVideo / FramePack ecosystem → our layers.

Every supported file becomes `{module name: LoraLayer(down, up)}`, module names being our
transformer's (diffusers' HunyuanVideoFramepackTransformer3DModel keys), `down` the
(rank, in) matrix A and `up` the (out, rank) matrix B with alpha / rank already folded in,
so a layer adds `strength · up · down · x`.

Conventions (one per file; a file mixing them is refused):
- `diffusers`: PEFT keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`; alpha from
  the `lora_adapter_metadata` diffusers writes into the safetensors header, else alpha = rank.
- `hunyuan`: the original HunyuanVideo module names (`diffusion_model.double_blocks.N.img_attn_qkv
  .lora_A.weight`, `single_blocks.N.linear1`, …), renamed and split onto our projections by
  diffusers' `_convert_hunyuan_video_lora_to_diffusers`. That converter splits a single
  block's fused `linear1` with HunyuanVideo's hidden size 3072 written in; we split `linear1`
  ourselves with the model's own size first, so any model size converts.
- `kohya`: Kohya / musubi-tuner keys `lora_unet_<module with '_' for '.'>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`, the module named either in our (diffusers) layout, as
  musubi-tuner's FramePack trainer writes it, or in the original HunyuanVideo layout, as
  its HunyuanVideo trainer does (then converted as `hunyuan`). Diffusers has no converter
  for these two, so the name resolution is ours.

Errors name the file and the first offending key: an unknown key, a layer this model does
not have (or has as something other than a linear layer), a shape that does not fit it,
a half of a pair missing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file

FORMATS = ("diffusers", "hunyuan", "kohya")
KOHYA_PREFIX = "lora_unet_"
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
STRIPPED_PREFIXES = ("transformer.", "diffusion_model.")
# Top-level modules of the original HunyuanVideo transformer: a key under one of them is in
# the `hunyuan` layout.
HUNYUAN_ROOTS = ("double_blocks", "single_blocks", "txt_in", "img_in", "time_in", "guidance_in", "vector_in",
                 "final_layer")
# Kohya writes a module path with '_' for '.'; in the original layout these names keep a dot.
_HUNYUAN_FLAT = [
    (re.compile(r"^(double_blocks|single_blocks)_(\d+)_"), r"\1.\2."),
    (re.compile(r"_(mlp)_(fc[12])$"), r"_\1.\2"),
    (re.compile(r"_mod_linear$"), r"_mod.linear"),
    (re.compile(r"\.modulation_linear$"), r".modulation.linear"),
]


class LoraFileError(ValueError):
    """A LoRA file this model cannot use; `key` is the first offending key (None: the file itself)."""

    def __init__(self, file: str, key: str | None, reason: str):
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: key {key!r}" if key is not None else file
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class LoraLayer:
    down: torch.Tensor  # A, (rank, in), fp32
    up: torch.Tensor  # B · alpha / rank, (out, rank), fp32

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraFile:
    name: str
    format: str  # one of FORMATS
    layers: dict[str, LoraLayer]

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.down, layer.up))


def key_format(key: str) -> str | None:
    """The convention a key belongs to, None for a key of none of them."""
    if key.startswith(KOHYA_PREFIX):
        return "kohya" if key.endswith(KOHYA_SUFFIXES) else None
    if not key.endswith(PEFT_SUFFIXES):
        return None
    for prefix in STRIPPED_PREFIXES:
        key = key.removeprefix(prefix)
    return "hunyuan" if key.split(".")[0] in HUNYUAN_ROOTS else "diffusers"


def file_format(keys: list[str], file: str) -> str:
    """The one convention of all `keys`; LoraFileError at the first unknown or mixed key."""
    if not keys:
        raise LoraFileError(file, None, "holds no tensors")
    first = key_format(keys[0])
    for key in keys:
        fmt = key_format(key)
        if fmt is None:
            raise LoraFileError(file, key, f"is not a LoRA key of a supported convention ({', '.join(FORMATS)}): "
                                "expected …lora_A/lora_B.weight or lora_unet_…lora_down/lora_up.weight/alpha")
        if fmt != first:
            raise LoraFileError(file, key, f"is in the {fmt} convention, the file's first key in the {first} one: "
                                "a file must use one convention")
    assert first is not None
    return first


def peek(path: Path) -> tuple[str, int]:
    """(convention, largest rank) of a LoRA file from its header alone, for `describe`."""
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        fmt = file_format(keys, path.name)
        downs = [k for k in keys if k.endswith((".lora_A.weight", ".lora_down.weight"))]
        rank = max((f.get_slice(k).get_shape()[0] for k in downs), default=0)
    return fmt, rank


def read_lora(path: Path, name: str, targets: Mapping[str, tuple[int, int]]) -> LoraFile:
    """Parse a LoRA file and check it against `targets`: {module name: (in_features, out_features)}
    of every linear layer a LoRA may adapt."""
    file = path.name
    if path.suffix != ".safetensors":
        raise LoraFileError(file, None, "is not a .safetensors file (other formats may run code when loaded)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors reports a malformed header or body in several ways
        raise LoraFileError(file, None, f"is not a readable safetensors file ({e})") from None
    keys = sorted(tensors)
    fmt = file_format(keys, file)
    if fmt == "kohya":
        pairs = _kohya_pairs(tensors, targets, file)
    elif fmt == "hunyuan":
        pairs = _hunyuan_pairs(tensors, _hidden_size(targets), file)
    else:
        pairs = _peft_pairs(tensors, _peft_alpha(metadata), file)
    return LoraFile(name, fmt, {module: _checked_layer(module, *pair, targets, file)
                                for module, pair in sorted(pairs.items())})


# ------------------------------------------------------------------ conventions


Pair = tuple[torch.Tensor | None, torch.Tensor | None, float | None, str]  # down, up, alpha, a key for errors


def _peft_pairs(tensors: Mapping[str, torch.Tensor], alpha: float | None, file: str) -> dict[str, Pair]:
    pairs: dict[str, list] = {}
    for key, tensor in tensors.items():
        stripped = key
        for prefix in STRIPPED_PREFIXES:
            stripped = stripped.removeprefix(prefix)
        module, half = stripped.rsplit(".lora_", 1)
        entry = pairs.setdefault(module, [None, None, alpha, key])
        entry[0 if half == "A.weight" else 1] = tensor
    return {module: tuple(entry) for module, entry in pairs.items()}  # type: ignore[misc]


def _peft_alpha(metadata: Mapping[str, str]) -> float | None:
    """lora_alpha of diffusers' `lora_adapter_metadata` (keys prefixed `transformer.`), None if absent."""
    try:
        adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return None
    for key in ("transformer.lora_alpha", "lora_alpha"):
        if isinstance(adapter.get(key), (int, float)):
            return float(adapter[key])
    return None


def _hunyuan_pairs(tensors: Mapping[str, torch.Tensor], hidden: int, file: str,
                   alphas: Mapping[str, float] | None = None) -> dict[str, Pair]:
    """Original-layout lora_A/lora_B tensors → pairs on our modules, through diffusers' converter.

    `alphas` (kohya files) are per original module; they are folded into lora_B first,
    because the converter renames and splits only lora_A/lora_B tensors.
    """
    original: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for prefix in STRIPPED_PREFIXES:
            key = key.removeprefix(prefix)
        module, half = key.rsplit(".lora_", 1)
        if alphas is not None and half == "B.weight" and module in alphas:
            tensor = tensor.float() * (alphas[module] / tensor.shape[1])
        match = re.fullmatch(r"single_blocks\.(\d+)\.linear1", module)
        if match:
            # The fused [q | k | v | mlp] projection, split by this model's hidden size.
            block = f"single_blocks.{match.group(1)}"
            parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            if half == "A.weight":
                pieces = [tensor] * 4
            else:
                if tensor.shape[0] <= 3 * hidden:
                    raise LoraFileError(file, key, f"has {tensor.shape[0]} output rows; a single block's linear1 "
                                        f"has 3 × {hidden} + MLP rows in this model")
                pieces = list(torch.split(tensor, [hidden, hidden, hidden, tensor.shape[0] - 3 * hidden]))
            for part, piece in zip(parts, pieces):
                original[f"{block}.{part}.lora_{half}"] = piece
        else:
            original[f"{module}.lora_{half}"] = tensor
    # alpha None: scale 1 (no alpha in this layout; a kohya file's alphas are folded in above).
    # Imported here: diffusers' loaders pull in Triton, which must not be imported by merely
    # importing the engine (the kernels decide interpreted or compiled at their import).
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    return _peft_pairs(_convert_hunyuan_video_lora_to_diffusers(original), None, file)


def _kohya_pairs(tensors: Mapping[str, torch.Tensor], targets: Mapping[str, tuple[int, int]],
                 file: str) -> dict[str, Pair]:
    """lora_unet_<flat module> keys → pairs, the flat name resolved against our modules first,
    then read as an original HunyuanVideo module name."""
    ours = {module.replace(".", "_"): module for module in targets}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    first_key: dict[str, str] = {}
    for key, tensor in sorted(tensors.items()):
        flat, part = key.removeprefix(KOHYA_PREFIX).split(".", 1)
        groups.setdefault(flat, {})[part] = tensor
        first_key.setdefault(flat, key)
    layouts = {flat: ("diffusers" if flat in ours else "hunyuan") for flat in groups}
    first_layout = layouts[min(layouts)]
    for flat in sorted(groups):
        if layouts[flat] != first_layout:
            raise LoraFileError(file, first_key[flat], f"names a module in the {layouts[flat]} layout, the file's "
                                f"first module in the {first_layout} one: a file must use one convention")
    alphas = {flat: float(parts["alpha"]) for flat, parts in groups.items() if "alpha" in parts}
    if first_layout == "diffusers":
        pairs: dict[str, Pair] = {}
        for flat, parts in groups.items():
            down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
            pairs[ours[flat]] = (down, up, alphas.get(flat), first_key[flat])
        return pairs
    original: dict[str, torch.Tensor] = {}
    original_alphas: dict[str, float] = {}
    for flat, parts in groups.items():
        dotted = flat
        for pattern, replacement in _HUNYUAN_FLAT:
            dotted = pattern.sub(replacement, dotted)
        if dotted.split(".")[0] not in ("double_blocks", "single_blocks"):
            raise LoraFileError(file, first_key[flat], "names no linear layer of this model's blocks, in either "
                                "our (diffusers) layout or the original HunyuanVideo one")
        for part, half in (("lora_down.weight", "A"), ("lora_up.weight", "B")):
            if part in parts:
                original[f"{dotted}.lora_{half}.weight"] = parts[part]
        if flat in alphas:
            original_alphas[dotted] = alphas[flat]
    return _hunyuan_pairs(original, _hidden_size(targets), file, original_alphas)


def _hidden_size(targets: Mapping[str, tuple[int, int]]) -> int:
    return targets["single_transformer_blocks.0.attn.to_q"][1] if "single_transformer_blocks.0.attn.to_q" in targets \
        else next(iter(targets.values()))[0]


def _checked_layer(module: str, down: torch.Tensor | None, up: torch.Tensor | None, alpha: float | None, key: str,
                   targets: Mapping[str, tuple[int, int]], file: str) -> LoraLayer:
    if module not in targets:
        raise LoraFileError(file, key, f"adapts {module!r}, which is not a linear layer of this model")
    if down is None or up is None:
        raise LoraFileError(file, key, f"is half of a pair: {module!r} needs both its down (A) and up (B) matrices")
    in_features, out_features = targets[module]
    rank = down.shape[0] if down.ndim == 2 else -1
    if down.ndim != 2 or down.shape[1] != in_features or rank < 1:
        raise LoraFileError(file, key, f"down (A) of {module!r} has shape {tuple(down.shape)}; this model's layer "
                            f"needs (rank, {in_features})")
    if up.shape != (out_features, rank):
        raise LoraFileError(file, key, f"up (B) of {module!r} has shape {tuple(up.shape)}; this model's layer "
                            f"needs ({out_features}, {rank})")
    scale = 1.0 if alpha is None else alpha / rank
    return LoraLayer(down.float().contiguous(), (up.float() * scale).contiguous())
