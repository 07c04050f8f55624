"""HunyuanVideo-FramePack transformer (the FramePack I2V denoiser).

Config keys, checkpoint keys and forward arguments match
`diffusers.HunyuanVideoFramepackTransformer3DModel`, so the public FramePackI2V_HY /
FramePack_F1 checkpoints load unchanged. Read top to bottom: config, position and
time encodings, the building blocks, then the model.

Token layout inside the model (SPEC §5):
  latent stream  = [4x context, 2x context, 1x clean context, noisy latents]  (RoPE)
  context stream = [SigLIP image tokens, refined text tokens]                 (no RoPE)
Dual-stream blocks keep the two streams in separate weights and attend jointly;
single-stream blocks run on their concatenation. Only the noisy tokens are projected out.

Attention is the job's `Attend` (framepack_backend/attention.py), an argument of
`forward` handed to every block: each block attention is `attend.joint` on the
[latents | context] sequence with the number of latent tokens, the point where sequence
parallelism splits the latents and keeps the context whole; the text refiner's
attention is `attend.local`. Sequence parallelism is applied from outside
(framepack_backend/sequence_parallel.py): it replaces `block_runner`.
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_backend.attention import Attend
from framepack_backend.models.loading import (
    check_state_dict_matches,
    load_safetensors_state_dict,
    save_sharded_safetensors,
)
from framepack_backend.models.qkv import project_qkv

DIFFUSERS_CLASS_NAME = "HunyuanVideoFramepackTransformer3DModel"
TIMESTEP_CHANNELS = 256
NORM_EPS = 1e-6
REFINER_MLP_RATIO = 4.0  # the token refiner's MLP width is fixed, whatever `mlp_ratio` says


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters. Field names and defaults are diffusers' config keys for this model."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    image_condition_type: str | None = None
    has_image_proj: bool = False
    image_proj_dim: int = 1152
    has_clean_x_embedder: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(self.rope_axes_dim))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        positive = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                    "patch_size", "patch_size_t", "text_embed_dim", "pooled_projection_dim", "image_proj_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config {name}={getattr(self, name)} is not allowed: it must be >= 1")
        for name in ("num_single_layers", "num_refiner_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"config {name}={getattr(self, name)} is not allowed: it must be >= 0")
        if self.qk_norm != "rms_norm":
            raise ValueError(f"config qk_norm={self.qk_norm!r} is not supported: allowed 'rms_norm'")
        if self.image_condition_type is not None:
            raise ValueError(
                f"config image_condition_type={self.image_condition_type!r} is not supported: FramePack "
                "conditions on the image through context tokens, allowed None"
            )
        axes = self.rope_axes_dim
        if len(axes) != 3 or any(d <= 0 or d % 2 for d in axes) or sum(axes) != self.attention_head_dim:
            raise ValueError(
                f"config rope_axes_dim={list(axes)} is not allowed: three positive even sizes (time, height, "
                f"width) summing to attention_head_dim={self.attention_head_dim}"
            )
        if self.has_clean_x_embedder and (self.patch_size, self.patch_size_t) != (2, 1):
            raise ValueError(
                f"config patch_size={self.patch_size}, patch_size_t={self.patch_size_t} is not allowed with "
                "has_clean_x_embedder: the context patchifiers are built for patch (1, 2, 2)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        """Build from a diffusers config dict; keys starting with '_' (class name, version) are ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in values if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"unknown transformer config keys {unknown}; allowed: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The config.json content, readable by diffusers too."""
        values = asdict(self)
        values["rope_axes_dim"] = list(self.rope_axes_dim)
        return {"_class_name": DIFFUSERS_CLASS_NAME, **values}


# ------------------------------------------------------------- time and position codes


def timestep_sinusoid(
    t: torch.Tensor, channels: int = TIMESTEP_CHANNELS, max_period: float = 10000.0
) -> torch.Tensor:
    """(batch,) float timesteps -> (batch, channels) [cos | sin] features (the DiT/GLIDE encoding)."""
    if t.ndim != 1:
        raise ValueError(f"timestep/guidance must be 1-D (batch,), got shape {tuple(t.shape)}")
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Rope(NamedTuple):
    """Per-token rotation of each channel pair, complex64 (tokens, 1, head_dim / 2), broadcast over heads.

    cos + i·sin of the rotary angle; for pooled (2x/4x) tokens the averaged cos and sin,
    which is not a unit complex number, exactly as the reference pools them.
    """

    rotation: torch.Tensor
    # The same angles as real tables (tokens, head_dim), each value repeated for its channel
    # pair, fp32: the layout of the fused q/k norm + RoPE kernel.
    cos: torch.Tensor
    sin: torch.Tensor


def rope_grid(
    frame_positions: torch.Tensor, height: int, width: int, axes_dim: tuple[int, int, int], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the 3-D rotary angles on a (frames, height, width) token grid -> each (T, H, W, head_dim / 2).

    The head dim is split into (time, height, width) parts; channel pair i of a part of
    size d rotates by position × theta^(-2i/d). One column per pair of channels.
    """
    device = frame_positions.device
    positions = (frame_positions.float(), torch.arange(height, dtype=torch.float32, device=device),
                 torch.arange(width, dtype=torch.float32, device=device))
    sizes = (len(positions[0]), height, width)
    cos_axes, sin_axes = [], []
    for axis, (pos, dim) in enumerate(zip(positions, axes_dim)):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        angles = torch.outer(pos, freqs)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = sizes[axis]
        cos_axes.append(angles.cos().view(shape).expand(*sizes, dim // 2))
        sin_axes.append(angles.sin().view(shape).expand(*sizes, dim // 2))
    return torch.cat(cos_axes, dim=-1), torch.cat(sin_axes, dim=-1)


def pad_to_multiple(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Replicate-pad the last three dims of a (N, C, T, H, W) tensor up to multiples of `kernel`."""
    pads = [(-size) % k for size, k in zip(x.shape[-3:], kernel)]
    if not any(pads):
        return x
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")


def pool_rope_grid(grid: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Average a (T, H, W, D) table over `kernel` blocks, padded like the coarse patchifier's input."""
    pooled = F.avg_pool3d(pad_to_multiple(grid.permute(3, 0, 1, 2)[None], kernel), kernel, kernel)
    return pooled[0].permute(1, 2, 3, 0)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate channel pairs (x0, x1) of (batch, tokens, heads, head_dim) x, in fp32.

    As a complex product (x0 + i·x1)(cos + i·sin) it is three kernels (cast, multiply,
    cast back) instead of the seven of the real-valued form.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope.rotation).flatten(-2).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: x * (1 + scale) + shift, in one kernel."""
    return torch.addcmul(shift, x, 1 + scale)


# ----------------------------------------------------------------------- small modules


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (timestep, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedding(nn.Module):
    """Timestep (+ distilled guidance) + pooled text -> the vector every AdaLN reads."""

    def __init__(self, dim: int, pooled_dim: int, guidance_embeds: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.guidance_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim) if guidance_embeds else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(
        self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_sinusoid(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("guidance is required: this checkpoint has guidance_embeds=True (pass gs * 1000)")
            emb = emb + self.guidance_embedder(timestep_sinusoid(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class FeedForward(nn.Module):
    """Linear -> activation -> Linear. Keys `net.0.proj` / `net.2` are diffusers' (`net.1` was dropout)."""

    def __init__(self, dim: int, hidden: int, activation: Any) -> None:
        super().__init__()
        project_in = nn.ModuleDict({"proj": nn.Linear(dim, hidden)})
        self.net = nn.ModuleList([project_in, nn.Identity(), nn.Linear(hidden, dim)])
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.activation(self.net[0]["proj"](x)))


gelu_tanh = partial(F.gelu, approximate="tanh")


class AdaNormZero(nn.Module):
    """LayerNorm modulated by the conditioning vector.

    `linear` yields `chunks` vectors: shift, scale (applied here) then the gates and
    MLP modulation the block uses later, returned as a list.
    """

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        shift, scale, *rest = self.linear(F.silu(temb)).unsqueeze(1).chunk(self.chunks, dim=-1)
        return modulate(self.norm(x), shift, scale), rest


class AdaNormOut(nn.Module):
    """Final AdaLN before proj_out; its linear yields (scale, shift) in that order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


# -------------------------------------------------------------------- text refiner


class RefinerAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, attend: Attend) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        # Text tokens only, before the blocks: always local, never split for sequence parallelism.
        return self.to_out[0](attend.local(q, k, v, key_mask).flatten(2))


class RefinerGates(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, temb: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1))


class RefinerBlock(nn.Module):
    """Pre-norm self-attention + SiLU MLP over text tokens, residuals gated by the timestep."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.ff = FeedForward(dim, int(dim * REFINER_MLP_RATIO), F.silu)
        self.norm_out = RefinerGates(dim)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, key_mask: torch.Tensor | None, attend: Attend
    ) -> torch.Tensor:
        gate_attn, gate_ff = self.norm_out(temb)
        x = torch.addcmul(x, self.attn(self.norm1(x), key_mask, attend), gate_attn)
        return torch.addcmul(x, self.ff(self.norm2(x)), gate_ff)


class TextTokenRefiner(nn.Module):
    """Llama hidden states -> model-width text tokens, refined by a few blocks conditioned on
    the timestep and the (masked) mean of the text itself."""

    def __init__(self, text_dim: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.time_text_embed = ConditionEmbedding(dim, text_dim, guidance_embeds=False)
        self.proj_in = nn.Linear(text_dim, dim)
        # A dict only to reproduce the checkpoint path `token_refiner.refiner_blocks.N`.
        blocks = nn.ModuleList(RefinerBlock(dim, heads) for _ in range(layers))
        self.token_refiner = nn.ModuleDict({"refiner_blocks": blocks})

    def forward(
        self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None, attend: Attend
    ) -> torch.Tensor:
        key_mask = None
        if mask is None:
            pooled = text.mean(dim=1)
        else:
            weights = mask.float().unsqueeze(-1)
            pooled = ((text * weights).sum(dim=1) / weights.sum(dim=1)).to(text.dtype)
            # Key 0 always visible so a fully padded row cannot produce NaN (as the reference does).
            key_mask = mask.to(torch.bool, copy=True)
            key_mask[:, 0] = True
        temb = self.time_text_embed(timestep, pooled)
        x = self.proj_in(text)
        for block in self.token_refiner["refiner_blocks"]:
            x = block(x, temb, key_mask, attend)
        return x


# ------------------------------------------------------------- latent / image inputs


class PatchEmbed(nn.Module):
    """(B, C, T, H, W) latents -> (B, tokens, dim) by a strided Conv3d."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)


CONTEXT_KERNELS = {"1x": (1, 2, 2), "2x": (2, 4, 4), "4x": (4, 8, 8)}
# The same compression on the 1x token grid (patch 1x2x2 already applied), used to pool RoPE.
CONTEXT_ROPE_KERNELS = {"2x": (2, 2, 2), "4x": (4, 4, 4)}


class ContextPatchEmbed(nn.Module):
    """Patchifiers for the clean history: 1x like the noisy latents, 2x and 4x coarser so old
    frames cost fewer tokens (FramePack's context compression)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, CONTEXT_KERNELS["1x"], stride=CONTEXT_KERNELS["1x"])
        self.proj_2x = nn.Conv3d(in_channels, dim, CONTEXT_KERNELS["2x"], stride=CONTEXT_KERNELS["2x"])
        self.proj_4x = nn.Conv3d(in_channels, dim, CONTEXT_KERNELS["4x"], stride=CONTEXT_KERNELS["4x"])

    def forward(self, latents: torch.Tensor, scale: str) -> torch.Tensor:
        if scale == "1x":  # like x_embedder: no padding, an odd row/column is dropped
            return self.proj(latents).flatten(2).transpose(1, 2)
        conv = self.proj_2x if scale == "2x" else self.proj_4x
        return conv(pad_to_multiple(latents, CONTEXT_KERNELS[scale])).flatten(2).transpose(1, 2)


class ImageProjection(nn.Module):
    """SigLIP tokens (1152) -> model width through a 3x wide SiLU MLP."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(in_dim, 3 * dim)
        self.down = nn.Linear(3 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


# -------------------------------------------------------------- transformer blocks


class JointAttention(nn.Module):
    """Dual-stream attention: latents (to_*) and context (add_*) have their own projections and
    QK RMSNorms, attend over [latents, context] together; RoPE rotates latent q/k only."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS), nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=NORM_EPS), nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, rope: Rope, key_mask: torch.Tensor | None, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.heads
        q, k, v = (split_heads(p, h) for p in project_qkv(self, x))
        cq, ck, cv = (split_heads(p, h) for p in project_qkv(self, context, "add_qkv_proj"))
        q, k = apply_rope(self.norm_q(q), rope), apply_rope(self.norm_k(k), rope)
        cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
        n = x.shape[1]
        out = attend.joint(torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1), n, key_mask)
        out = out.flatten(2)
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


class DualStreamBlock(nn.Module):
    """MMDiT block ("double" block): joint attention, separate AdaLN/MLP weights per stream."""

    fused_kernels = False  # run models/fused.py's forward on the Triton kernels instead

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp = int(dim * mlp_ratio)
        self.norm1 = AdaNormZero(dim, chunks=6)
        self.norm1_context = AdaNormZero(dim, chunks=6)
        self.attn = JointAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.ff = FeedForward(dim, mlp, gelu_tanh)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.ff_context = FeedForward(dim, mlp, gelu_tanh)

    def modulated_attention_input(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """What this block feeds its attention from the latent stream (TeaCache's change signal)."""
        return self.norm1(x, temb)[0]

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rope: Rope,
        key_mask: torch.Tensor | None, attend: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_kernels:
            from . import fused  # imports Triton, so only on this path

            return fused.dual_stream_forward(self, x, context, temb, rope, key_mask, attend)
        x_in, (gate_attn, shift_ff, scale_ff, gate_ff) = self.norm1(x, temb)
        c_in, (c_gate_attn, c_shift_ff, c_scale_ff, c_gate_ff) = self.norm1_context(context, temb)
        x_attn, c_attn = self.attn(x_in, c_in, rope, key_mask, attend)

        x = torch.addcmul(x, x_attn, gate_attn)
        x = torch.addcmul(x, self.ff(modulate(self.norm2(x), shift_ff, scale_ff)), gate_ff)
        context = torch.addcmul(context, c_attn, c_gate_attn)
        c_ff = self.ff_context(modulate(self.norm2_context(context), c_shift_ff, c_scale_ff))
        context = torch.addcmul(context, c_ff, c_gate_ff)
        return x, context


class SingleStreamAttention(nn.Module):
    """q/k/v over the joint sequence (no output projection: the block's proj_out does it)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS), nn.RMSNorm(head_dim, eps=NORM_EPS)

    def forward(
        self, x: torch.Tensor, n_latent: int, rope: Rope, key_mask: torch.Tensor | None, attend: Attend
    ) -> torch.Tensor:
        q, k, v = (split_heads(p, self.heads) for p in project_qkv(self, x))
        q, k = self.norm_q(q), self.norm_k(k)
        # Rotate the latent tokens in place: q and k are fresh tensors from the norms, and
        # writing into them avoids a concatenated copy of the whole sequence.
        q[:, :n_latent] = apply_rope(q[:, :n_latent], rope)
        k[:, :n_latent] = apply_rope(k[:, :n_latent], rope)
        return attend.joint(q, k, v, n_latent, key_mask).flatten(2)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint [latents, context] sequence, one gated residual."""

    fused_kernels = False

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp = int(dim * mlp_ratio)
        self.attn = SingleStreamAttention(dim, heads)
        self.norm = AdaNormZero(dim, chunks=3)
        self.proj_mlp = nn.Linear(dim, mlp)
        self.proj_out = nn.Linear(dim + mlp, dim)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, n_latent: int, rope: Rope,
        key_mask: torch.Tensor | None, attend: Attend,
    ) -> torch.Tensor:
        if self.fused_kernels:
            from . import fused

            return fused.single_stream_forward(self, x, temb, n_latent, rope, key_mask, attend)
        x_in, (gate,) = self.norm(x, temb)
        mlp = gelu_tanh(self.proj_mlp(x_in))
        attn = self.attn(x_in, n_latent, rope, key_mask, attend)
        return torch.addcmul(x, self.proj_out(torch.cat([attn, mlp], dim=-1)), gate)


# ------------------------------------------------------------------------- the model


class TeaCacheHook(Protocol):
    """What the model asks of a step cache (framepack_backend/teacache.py and magcache.py implement it).

    `reads_signal` (optional, default True): whether `should_compute` needs the first
    block's modulated input (TeaCache's signal); MagCache decides from its schedule and
    is handed None.
    """

    def should_compute(self, modulated: torch.Tensor | None) -> bool: ...
    def apply_cached(self, hidden_states: torch.Tensor) -> torch.Tensor: ...
    def remember(self, before: torch.Tensor, after: torch.Tensor) -> None: ...


@dataclass
class TransformerOutput:
    sample: torch.Tensor


class FramePackTransformer(nn.Module):
    """The FramePack denoiser. Keyword arguments are `TransformerConfig` fields (diffusers' config keys)."""

    block_graphs: Any = None  # a models/graphs.py BlockGraphs after enable_cuda_graphs(True)

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = self.config = TransformerConfig.from_dict(config)
        dim, heads = cfg.inner_dim, cfg.num_attention_heads

        self.x_embedder = PatchEmbed(cfg.in_channels, dim, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
        self.clean_x_embedder = ContextPatchEmbed(cfg.in_channels, dim) if cfg.has_clean_x_embedder else None
        self.context_embedder = TextTokenRefiner(cfg.text_embed_dim, dim, heads, cfg.num_refiner_layers)
        self.image_projection = ImageProjection(cfg.image_proj_dim, dim) if cfg.has_image_proj else None
        self.time_text_embed = ConditionEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)

        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_single_layers)
        )

        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size_t * cfg.patch_size**2 * cfg.out_channels)
        # What runs the block stack; None: `run_block_stack` on this process. A parallel plan
        # applied from outside replaces it (framepack_backend/sequence_parallel.py).
        self.block_runner: Any = None

    # -- construction

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FramePackTransformer":
        return cls(**config)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> "FramePackTransformer":
        """Load `path/config.json` + safetensors weights without materialising a random model first."""
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: a transformer folder needs config.json beside its weights"
            )
        with torch.device("meta"):
            model = cls.from_config(json.loads(config_file.read_text()))
        state_dict = load_safetensors_state_dict(folder, dtype=dtype, device=device)
        check_state_dict_matches(model.state_dict(), state_dict, source=str(folder))
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 10 * 2**30) -> None:
        """Write config.json + safetensors shards in the diffusers layout."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        save_sharded_safetensors(self.state_dict(), folder, max_shard_bytes)

    def blocks(self) -> list[nn.Module]:
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def set_fused_kernels(self, enabled: bool) -> None:
        """Run the blocks on the fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
        if enabled:
            from . import fused  # noqa: F401 - fails here, not mid-forward, when Triton is missing
        for block in self.blocks():
            block.fused_kernels = enabled

    def set_fp32_output(self, enabled: bool) -> None:
        """Run the final projection (proj_out) in fp32, as the FramePack demo does for a bf16 model.

        The demo's `high_quality_fp32_output_for_inference`: the final AdaLN (norm_out)
        still runs in the model dtype on the model-dtype conditioning vector; its output
        is cast to fp32 and projected by an fp32 copy of proj_out, so the predicted flow
        is rounded once, in fp32, instead of to bf16. Off: proj_out back in norm_out's
        dtype. Apply before a memory manager copies the weights to host memory (it
        records each tensor's dtype then), as with `quantize_fp8`.
        """
        self.proj_out.to(torch.float32 if enabled else self.norm_out.linear.weight.dtype)

    def fuse_qkv(self) -> int:
        """Each attention's q/k/v projections as one GEMM (models/qkv.py); public keys kept. Irreversible."""
        from .qkv import fuse_qkv_projections

        return fuse_qkv_projections([block.attn for block in self.blocks()])

    def enable_cuda_graphs(self, enabled: bool, max_graphs: int = 2) -> None:
        """Replay the blocks from CUDA graphs, one per input shape (models/graphs.py); off drops them.

        Only for weights that stay where they are (memory mode resident): a graph keeps the
        addresses it was captured with.
        """
        from .graphs import BlockGraphs

        self.block_graphs = BlockGraphs(self.blocks_forward, max_graphs) if enabled else None

    def quantize_fp8(self) -> int:
        """Turn the blocks' linear layers into FP8 e4m3 (Hopper); returns how many. Irreversible."""
        from .fp8 import quantize_block_linears

        return quantize_block_linears(self.blocks())

    # -- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        image_embeds: torch.Tensor | None,
        indices_latents: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
        latents_clean: torch.Tensor | None = None,
        indices_latents_clean: torch.Tensor | None = None,
        latents_history_2x: torch.Tensor | None = None,
        indices_latents_history_2x: torch.Tensor | None = None,
        latents_history_4x: torch.Tensor | None = None,
        indices_latents_history_4x: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = False,
        teacache: TeaCacheHook | None = None,
        attend: Attend | None = None,
    ) -> torch.Tensor | TransformerOutput:
        """Flow prediction for the noisy latents `hidden_states` (B, C, T, H, W).

        encoder_hidden_states (B, L, text_embed_dim) with encoder_attention_mask (B, L)
        (right-padded, 1 = real token) or None when the text is already cropped.
        indices_* are 1-D frame positions (or (1, frames)) for RoPE, one per latent frame.
        `attend` is the job's attention (framepack_backend/attention.py); by default the
        `auto` choice for the input's device and dtype. The result is in the dtype of
        proj_out's weights (fp32 after `set_fp32_output(True)`).
        """
        if attention_kwargs:
            raise ValueError(f"attention_kwargs {sorted(attention_kwargs)} are not supported (no LoRA scaling)")
        if attend is None:
            # A mask reaches attention only with batch > 1 (batch 1 crops its text instead).
            masked = encoder_attention_mask is not None and hidden_states.shape[0] > 1
            attend = Attend.default(hidden_states.device, hidden_states.dtype, key_mask=masked)
        cfg = self.config
        frames, height, width = hidden_states.shape[2:]
        grid = (frames // cfg.patch_size_t, height // cfg.patch_size, width // cfg.patch_size)

        latents, rope = self.embed_latents(
            hidden_states, indices_latents, grid,
            {"1x": (latents_clean, indices_latents_clean, "latents_clean"),
             "2x": (latents_history_2x, indices_latents_history_2x, "latents_history_2x"),
             "4x": (latents_history_4x, indices_latents_history_4x, "latents_history_4x")},
        )
        temb = self.time_text_embed(timestep, pooled_projections, guidance)
        context, key_mask = self.embed_context(
            encoder_hidden_states, encoder_attention_mask, timestep, image_embeds, latents.shape[1], attend
        )
        latents = self.run_blocks(latents, context, temb, rope, key_mask, teacache, attend)

        normed = self.norm_out(latents[:, -math.prod(grid):], temb)
        # proj_out's input follows its weights: cast to fp32 after set_fp32_output, else a no-op.
        sample = self.unpatchify(self.proj_out(normed.to(self.proj_out.weight.dtype)), grid)
        return TransformerOutput(sample) if return_dict else sample

    def embed_latents(
        self,
        noisy: torch.Tensor,
        indices: torch.Tensor | None,
        grid: tuple[int, int, int],
        contexts: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, str]],
    ) -> tuple[torch.Tensor, Rope]:
        """Patchify noisy latents and clean contexts into one sequence [4x, 2x, 1x, noisy] with its RoPE."""
        cfg = self.config
        _, grid_h, grid_w = grid
        device = noisy.device

        def positions(idx: torch.Tensor | None, frames: int, name: str) -> torch.Tensor:
            if idx is None:
                return torch.arange(frames, device=device)
            if idx.ndim == 2 and idx.shape[0] == 1:
                idx = idx[0]
            if idx.ndim != 1 or idx.shape[0] != frames:
                raise ValueError(
                    f"{name} must hold one frame index per latent frame, shape ({frames},) or (1, {frames}); "
                    f"got {tuple(idx.shape)}"
                )
            return idx.to(device)

        def table(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rope_grid(idx, grid_h, grid_w, cfg.rope_axes_dim, cfg.rope_theta)

        cos, sin = table(positions(indices, grid[0], "indices_latents"))
        tokens = [self.x_embedder(noisy)]
        cos_parts, sin_parts = [cos.flatten(0, 2)], [sin.flatten(0, 2)]
        for scale in ("1x", "2x", "4x"):  # each is prepended, so the sequence ends [4x, 2x, 1x, noisy]
            latents, idx, name = contexts[scale]
            if latents is None:
                continue
            if self.clean_x_embedder is None:
                raise ValueError(
                    f"{name} was given but this checkpoint has no clean_x_embedder (has_clean_x_embedder=False)"
                )
            if latents.ndim != 5 or latents.shape[:2] != noisy.shape[:2] or latents.shape[3:] != noisy.shape[3:]:
                raise ValueError(
                    f"{name} must be (batch, channels, frames, height, width) matching hidden_states "
                    f"{tuple(noisy.shape)} except frames; got {tuple(latents.shape)}"
                )
            if idx is None:
                raise ValueError(f"{name} needs its frame indices (indices_{name.removeprefix('latents_')})")
            cos, sin = table(positions(idx, latents.shape[2], f"indices for {name}"))
            if scale != "1x":
                kernel = CONTEXT_ROPE_KERNELS[scale]
                cos, sin = pool_rope_grid(cos, kernel), pool_rope_grid(sin, kernel)
            tokens.insert(0, self.clean_x_embedder(latents, scale))
            cos_parts.insert(0, cos.flatten(0, 2))
            sin_parts.insert(0, sin.flatten(0, 2))

        cos, sin = torch.cat(cos_parts), torch.cat(sin_parts)
        rope = Rope(torch.complex(cos, sin)[:, None], cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1))
        return torch.cat(tokens, dim=1), rope

    def embed_context(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        image_embeds: torch.Tensor | None,
        n_latent: int,
        attend: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[image tokens, refined text tokens] and the key mask over [latents, context] (None: attend all)."""
        if text_mask is not None and text.shape[0] == 1:
            # Batch 1: crop the padding (one host sync) so no attention in the model needs a mask.
            text = text[:, : int(text_mask.sum())]
            text_mask = None
        context = self.context_embedder(text, timestep, text_mask, attend)

        if image_embeds is not None:
            if self.image_projection is None:
                raise ValueError(
                    "image_embeds was given but this checkpoint has no image_projection (has_image_proj=False)"
                )
            context = torch.cat([self.image_projection(image_embeds), context], dim=1)

        if text_mask is None:
            return context, None
        n_visible = n_latent + context.shape[1] - text.shape[1]
        visible = torch.ones(text.shape[0], n_visible, dtype=torch.bool, device=text_mask.device)
        return context, torch.cat([visible, text_mask.bool()], dim=1)

    def run_blocks(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        key_mask: torch.Tensor | None,
        teacache: TeaCacheHook | None,
        attend: Attend,
    ) -> torch.Tensor:
        """All dual- then single-stream blocks; returns the latent stream. TeaCache may skip them all."""
        if teacache is not None:
            signal = None
            if getattr(teacache, "reads_signal", True):  # a hook that does not say reads it
                signal = self.transformer_blocks[0].modulated_attention_input(latents, temb)
            if not teacache.should_compute(signal):
                return teacache.apply_cached(latents)
            before = latents

        if self.block_runner is not None:  # sequence parallel (sequence_parallel.py)
            latents = self.block_runner(latents, context, temb, rope, key_mask, attend)
        elif self.block_graphs is not None:
            latents = self.block_graphs(latents, context, temb, *rope, key_mask, attend=attend)
        else:
            latents = self.run_block_stack(latents, context, temb, rope, key_mask, attend)

        if teacache is not None:
            teacache.remember(before, latents)
        return latents

    def blocks_forward(
        self, latents: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rotation: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None, *, attend: Attend,
    ) -> torch.Tensor:
        """`run_block_stack` on tensors only (what a CUDA graph captures)."""
        return self.run_block_stack(latents, context, temb, Rope(rotation, cos, sin), key_mask, attend)

    def run_block_stack(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        key_mask: torch.Tensor | None,
        attend: Attend,
    ) -> torch.Tensor:
        """The dual- then single-stream blocks on these latent tokens; returns them."""
        for block in self.transformer_blocks:
            latents, context = block(latents, context, temb, rope, key_mask, attend)
        # The single-stream blocks share one sequence: concatenate once, not once per block.
        n_latent = latents.shape[1]
        joint = torch.cat([latents, context], dim=1)
        for block in self.single_transformer_blocks:
            joint = block(joint, temb, n_latent, rope, key_mask, attend)
        return joint[:, :n_latent]

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, T*H*W, C*pt*p*p) -> (B, C, T*pt, H*p, W*p)."""
        t, h, w = grid
        pt, p = self.config.patch_size_t, self.config.patch_size
        x = tokens.reshape(tokens.shape[0], t, h, w, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(tokens.shape[0], -1, t * pt, h * p, w * p)
