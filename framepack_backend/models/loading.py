"""Safetensors checkpoints in the diffusers / transformers file layout.

A folder holds either one `<prefix>.safetensors` or shards
`<prefix>-00001-of-0000N.safetensors` plus `<prefix>.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}`), with
prefix `diffusion_pytorch_model` (diffusers) or `model` (transformers).

Pickle checkpoints (.bin/.pt/.ckpt/.pth) are refused: loading them runs code.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_PREFIXES = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of the checkpoint in `folder`, sharded or single."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    for prefix in CHECKPOINT_PREFIXES:
        index = folder / f"{prefix}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
            return shards
        single = folder / f"{prefix}.safetensors"
        if single.is_file():
            return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); they are refused because loading "
            "them can run arbitrary code. Convert them to safetensors."
        )
    expected = ", ".join(f"{p}.safetensors(.index.json)" for p in CHECKPOINT_PREFIXES)
    raise FileNotFoundError(f"no safetensors checkpoint in {folder}: expected {expected}")


def load_safetensors_state_dict(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint in `folder`, memory-mapped, one tensor at a time.

    Floating-point tensors are cast to `dtype` when given; tensors are created on
    `device` directly (safetensors copies from the mapped file to the GPU), so the
    peak extra memory is one tensor, not one checkpoint.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for shard in checkpoint_files(folder):
        with safe_open(shard, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key in state_dict:
                    raise ValueError(f"tensor {key!r} appears in more than one shard of {folder}")
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state_dict[key] = tensor
    return state_dict


def save_sharded_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | Path,
    max_shard_bytes: int,
    prefix: str = "diffusion_pytorch_model",
) -> list[Path]:
    """Write `state_dict` as diffusers does: one file if it fits, else shards + index json.

    Tensors go to shards in key order; a tensor larger than `max_shard_bytes` gets a
    shard of its own. Returns the files written.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        shard_bytes += size

    # The HF loaders check this metadata to know the tensors are torch-layout.
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = folder / f"{prefix}.safetensors"
        save_file(shards[0], path, metadata=metadata)
        return [path]

    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        path = folder / f"{prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path, metadata=metadata)
        weight_map.update({key: path.name for key in shard})
        paths.append(path)
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = folder / f"{prefix}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    return [*paths, index]


def check_state_dict_matches(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    source: str,
    shown: int = 5,
) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped keys (the first `shown` of each)."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshaped = sorted(
        f"{key} {tuple(found[key].shape)} (model wants {tuple(expected[key].shape)})"
        for key in expected.keys() & found.keys()
        if found[key].shape != expected[key].shape
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            more = f", … {len(items) - shown} more" if len(items) > shown else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:shown])}{more}")
    if problems:
        raise ValueError(f"checkpoint {source} does not match the model config: " + "; ".join(problems))
