"""Random LoRA files for tests and benchmarks, one set of factors written in every
supported convention (framepack_backend/lora/formats.py).

Factors are drawn per linear layer of the original HunyuanVideo blocks (fused q/k/v,
single-block `linear1`), then split onto our projections the way a converter must: a
fused layer's A is shared by its parts and its B is split by rows. So the same matrices
written as `diffusers`, `hunyuan` and `kohya` files must give the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (rank, in), B (out, rank))


def hunyuan_factors(dim: int, mlp: int, double_blocks: int, single_blocks: int, rank: int, seed: int = 0,
                    std: float = 0.1) -> Factors:
    """A and B for every linear layer of the blocks, in the original HunyuanVideo names."""
    generator = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(double_blocks):
        for stream in ("img", "txt"):
            shapes.update({
                f"double_blocks.{i}.{stream}_attn_qkv": (dim, 3 * dim),
                f"double_blocks.{i}.{stream}_attn_proj": (dim, dim),
                f"double_blocks.{i}.{stream}_mlp.fc1": (dim, mlp),
                f"double_blocks.{i}.{stream}_mlp.fc2": (mlp, dim),
                f"double_blocks.{i}.{stream}_mod.linear": (dim, 6 * dim),
            })
    for i in range(single_blocks):
        shapes.update({
            f"single_blocks.{i}.linear1": (dim, 3 * dim + mlp),
            f"single_blocks.{i}.linear2": (dim + mlp, dim),
            f"single_blocks.{i}.modulation.linear": (dim, 3 * dim),
        })
    return {name: (torch.randn(rank, n_in, generator=generator) * std,
                   torch.randn(n_out, rank, generator=generator) * std)
            for name, (n_in, n_out) in shapes.items()}


_DOUBLE_PARTS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp.fc1": ("ff.net.0.proj",), "img_mlp.fc2": ("ff.net.2",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",), "txt_mlp.fc2": ("ff_context.net.2",),
    "img_mod.linear": ("norm1.linear",), "txt_mod.linear": ("norm1_context.linear",),
}
_SINGLE_PARTS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation.linear": ("norm.linear",),
}


def diffusers_factors(original: Factors, dim: int) -> Factors:
    """The same factors on our (diffusers) module names: fused layers split by rows of B."""
    ours: Factors = {}
    for name, (a, b) in original.items():
        kind, index, local = name.split(".", 2)
        parts = (_DOUBLE_PARTS if kind == "double_blocks" else _SINGLE_PARTS)[local]
        prefix = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}"
        sizes = [dim] * (len(parts) - 1) + [b.shape[0] - dim * (len(parts) - 1)]
        for part, b_part in zip(parts, torch.split(b, sizes)):
            ours[f"{prefix}.{part}"] = (a.clone(), b_part.clone())
    return ours


def save_diffusers(path: Path, factors: Factors, alpha: float | None = None) -> Path:
    """PEFT keys `transformer.<module>.lora_A/B.weight`; alpha in diffusers' header metadata."""
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"transformer.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = b.contiguous()
    metadata = {"format": "pt"}
    if alpha is not None:
        rank = next(iter(factors.values()))[0].shape[0]
        metadata["lora_adapter_metadata"] = json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})
    save_file(tensors, str(path), metadata=metadata)
    return path


def save_hunyuan(path: Path, original: Factors) -> Path:
    """The original HunyuanVideo layout, `diffusion_model.<module>.lora_A/B.weight` (no alpha: scale 1)."""
    tensors = {}
    for name, (a, b) in original.items():
        tensors[f"diffusion_model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"diffusion_model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(path))
    return path


def save_kohya(path: Path, factors: Factors, alpha: float) -> Path:
    """Kohya / musubi-tuner: `lora_unet_<module, '.' as '_'>.lora_down/lora_up.weight` and `.alpha`."""
    tensors = {}
    for name, (a, b) in factors.items():
        flat = "lora_unet_" + name.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = a.contiguous()
        tensors[f"{flat}.lora_up.weight"] = b.contiguous()
        tensors[f"{flat}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path
