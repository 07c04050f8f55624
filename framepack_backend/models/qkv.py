"""q, k and v as one GEMM: the attention projections fused, the public checkpoint's keys kept.

Every block projects one normalized input three times (to_q, to_k, to_v) and the
dual-stream blocks project the context three more times (add_q/k/v_proj). Fusing each
triple into one (dim → 3·dim) linear layer reads the input once and launches one GEMM
instead of three, which matters most for the short context (~830 tokens), where three
small GEMMs leave the GPU partly idle. The math is unchanged: each output column is the
same dot product; only the GEMM's tiling (so bf16 rounding) may differ.

gpt-fast's `wqkv` pattern: the module takes the shape the math wants, and state-dict
hooks translate at its boundary, so `load_state_dict` still takes the public
`to_q.weight`… keys (concatenated on load) and `state_dict` still gives them (views of
the fused weight): checkpoints, `save_pretrained` and the memory manager see no change.

An option, off by default (`EngineOptions.fused_qkv`): a low-rank adapter attached to
`to_q`, `to_k` or `to_v` as a module of its own would no longer be reached once they are
fused (merging an adapter into the weights through the state-dict keys still works).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# fused layer → the public layers it replaces, in output order.
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def project_qkv(attn: nn.Module, x: torch.Tensor, fused: str = "to_qkv") -> tuple[torch.Tensor, ...]:
    """(q, k, v) of x: views of one GEMM's output when `attn` is fused, else three GEMMs."""
    layer = attn._modules.get(fused)
    if layer is None:
        return tuple(getattr(attn, name)(x) for name in FUSED_PROJECTIONS[fused])
    return layer(x).chunk(3, dim=-1)


def first_reader(attn: nn.Module, fused: str = "to_qkv") -> nn.Module:
    """The first layer that reads the projections' input (what decides whether it is quantized once)."""
    layer = attn._modules.get(fused)
    return layer if layer is not None else getattr(attn, FUSED_PROJECTIONS[fused][0])


def fuse_qkv_projections(attentions: list[nn.Module]) -> int:
    """Replace each q/k/v triple of these attention modules with one linear layer; returns how many."""
    fused_count = 0
    for attn in attentions:
        fused_here = False
        for fused, parts in FUSED_PROJECTIONS.items():
            layers = [attn._modules.get(name) for name in parts]
            if not all(type(layer) is nn.Linear for layer in layers):
                continue
            first = layers[0]
            with torch.no_grad():
                layer = nn.Linear(first.in_features, 3 * first.out_features, bias=first.bias is not None,
                                  device="meta")
                layer.weight = nn.Parameter(torch.cat([part.weight for part in layers]), requires_grad=False)
                if first.bias is not None:
                    layer.bias = nn.Parameter(torch.cat([part.bias for part in layers]), requires_grad=False)
            for name in parts:
                delattr(attn, name)
            setattr(attn, fused, layer)
            fused_count += 1
            fused_here = True
        if fused_here:
            attn.register_load_state_dict_pre_hook(_fuse_public_keys)
            attn.register_state_dict_post_hook(_split_into_public_keys)
    return fused_count


def _fuse_public_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict: concatenate the public to_q/to_k/to_v entries into the fused layer's."""
    for fused, parts in FUSED_PROJECTIONS.items():
        if fused not in module._modules:
            continue
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in parts]
            if all(key in state_dict for key in keys):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


def _split_into_public_keys(module, state_dict, prefix, local_metadata) -> None:
    """state_dict: the fused layer's entries as the public to_q/to_k/to_v ones (views, no copy)."""
    for fused, parts in FUSED_PROJECTIONS.items():
        if fused not in module._modules:
            continue
        for kind in ("weight", "bias"):
            key = f"{prefix}{fused}.{kind}"
            if key in state_dict:
                for name, part in zip(parts, state_dict.pop(key).chunk(3, dim=0)):
                    state_dict[f"{prefix}{name}.{kind}"] = part
