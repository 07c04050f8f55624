"""GroupNorm (+ SiLU) of a channels-last video tensor, written into any strided output.

HunyuanVideo's VAE decoder runs GroupNorm → SiLU → replicate pad → causal 3-D conv in
every resnet. With the activations in channels_last_3d (the layout cuDNN's fp16 3-D
convolutions run in), eager torch spends five passes on the first three (statistics,
normalize, SiLU, pad copy, and a layout copy where an op returns NCDHW). Here the
statistics take one read and the normalize + SiLU one read and one write, straight into
the interior of the padded buffer the convolution reads (`out` may be a strided view).

Statistics are float32: each program merges its tiles' (count, mean, M2) by Chan's
formula, so a group's variance has no E[x²] − E[x]² cancellation however many voxels
it spans; the programs' partials are merged the same way in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from framepack_kernels.validation import check_float_tensor, check_launchable, check_shape

# Elements one program holds per tile (voxels × channels), over WARPS warps (32 a thread).
TILE_ELEMENTS = 8192
WARPS = 8
# Programs per sample for the statistics: several waves over a GPU's ~132 SMs, so loads
# stay in flight; the partials (3 × groups floats each) stay small.
STATS_PROGRAMS = 1024


def group_norm_silu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool = True
) -> torch.Tensor:
    """F.group_norm (then SiLU) computed in float32, returned in x.dtype. x: (N, C, T, H, W).

    Computed on NCDHW: torch's channels-last GroupNorm on the CPU takes E[x²] − E[x]², which
    cancels for activations with a large mean.
    """
    normed = F.group_norm(x.float().contiguous(), groups, weight.float(), bias.float(), eps)
    return (F.silu(normed) if silu else normed).to(x.dtype)


@triton.jit
def _group_stats_kernel(
    x_ptr,
    partial_ptr,
    voxels,
    voxels_per_program,
    channels,
    group_size,
    groups,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    program = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    start = program * voxels_per_program
    end = tl.minimum(start + voxels_per_program, voxels)
    g = tl.arange(0, BLOCK_G)
    channel = g[None, :, None] * group_size + tl.arange(0, BLOCK_CG)[None, None, :]
    channel_mask = (g[None, :, None] < groups) & (tl.arange(0, BLOCK_CG)[None, None, :] < group_size)
    sample = x_ptr + n * voxels * channels

    count = tl.zeros([BLOCK_G], dtype=tl.float32)  # the same for every group
    mean = tl.zeros([BLOCK_G], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    for offset in range(start, end, BLOCK_S):
        voxel = offset + tl.arange(0, BLOCK_S)[:, None, None]
        mask = (voxel < end) & channel_mask
        tile = tl.load(sample + voxel.to(tl.int64) * channels + channel, mask=mask, other=0.0).to(tl.float32)
        tile_count = (tl.minimum(end - offset, BLOCK_S) * group_size).to(tl.float32)
        tile_mean = tl.sum(tl.sum(tile, axis=2), axis=0) / tile_count
        centered = tl.where(mask, tile - tile_mean[None, :, None], 0.0)
        tile_m2 = tl.sum(tl.sum(centered * centered, axis=2), axis=0)
        # Chan et al.: merge the running (count, mean, M2) with the tile's.
        total = count + tile_count
        delta = tile_mean - mean
        mean = mean + delta * (tile_count / total)
        m2 = m2 + tile_m2 + delta * delta * (count * tile_count / total)
        count = total

    row = partial_ptr + (n * tl.num_programs(0) + program) * 3 * BLOCK_G
    g_mask = g < groups
    tl.store(row + g, count, mask=g_mask)
    tl.store(row + BLOCK_G + g, mean, mask=g_mask)
    tl.store(row + 2 * BLOCK_G + g, m2, mask=g_mask)


@triton.jit
def _normalize_silu_kernel(
    x_ptr,
    mean_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    voxels,
    channels,
    height,
    width,
    out_stride_n,
    out_stride_t,
    out_stride_h,
    out_stride_w,
    SILU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    voxel = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    channel = tl.arange(0, BLOCK_C)
    channel_mask = channel < channels
    mask = (voxel[:, None] < voxels) & channel_mask[None, :]

    x = tl.load(x_ptr + (n * voxels + voxel[:, None]) * channels + channel[None, :], mask=mask, other=0.0)
    mean = tl.load(mean_ptr + n * channels + channel, mask=channel_mask, other=0.0)
    scale = tl.load(scale_ptr + n * channels + channel, mask=channel_mask, other=0.0)
    bias = tl.load(bias_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
    # Centred before scaling: x · scale − mean · scale would cancel where |mean| ≫ std.
    y = (x.to(tl.float32) - mean[None, :]) * scale[None, :] + bias[None, :]
    if SILU:
        y = y * tl.sigmoid(y)

    w = voxel % width
    h = (voxel // width) % height
    t = voxel // (width * height)
    target = n * out_stride_n + t * out_stride_t + h * out_stride_h + w * out_stride_w
    tl.store(out_ptr + target[:, None] + channel[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def is_channels_last_3d(x: torch.Tensor) -> bool:
    """(N, C, T, H, W) stored as N, T, H, W, C without gaps."""
    return x.permute(0, 2, 3, 4, 1).is_contiguous()


def _merged_statistics(partial: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, 3, G') per-program (count, mean, M2) → per-group mean and biased variance (N, G)."""
    count, mean, m2 = partial[..., :groups].unbind(dim=2)
    total = count.sum(dim=1, keepdim=True)
    group_mean = (count * mean).sum(dim=1, keepdim=True) / total
    group_m2 = (m2 + count * (mean - group_mean) ** 2).sum(dim=1)
    return group_mean.squeeze(1), group_m2 / total.squeeze(1)


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused `group_norm_silu_reference`.

    x: (N, C, T, H, W) in channels_last_3d (`is_channels_last_3d`); weight, bias: (C,).
    Returns a new channels_last_3d tensor in x.dtype, or writes into `out`: same shape
    and dtype, any strides with unit stride over C (e.g. the interior of a padded buffer).
    """
    op = "group_norm_silu"
    check_float_tensor(op, "x", x, 5)
    check_float_tensor(op, "weight", weight, 1)
    check_float_tensor(op, "bias", bias, 1)
    batch, channels, frames, height, width = x.shape
    check_shape(op, "weight", weight, (channels,))
    check_shape(op, "bias", bias, (channels,))
    if groups < 1 or channels % groups:
        raise ValueError(f"{op}: groups={groups} must divide the {channels} channels")
    if not is_channels_last_3d(x):
        raise ValueError(f"{op}: x must be channels_last_3d, got strides {x.stride()}; "
                         "pass x.contiguous(memory_format=torch.channels_last_3d)")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    check_float_tensor(op, "out", out, 5)
    check_shape(op, "out", out, tuple(x.shape))
    if out.dtype != x.dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype}; it must match x ({x.dtype})")
    if channels > 1 and out.stride(1) != 1:
        raise ValueError(f"{op}: out must have unit stride over channels, got strides {out.stride()}")
    check_launchable(op, _group_stats_kernel, x=x, weight=weight, bias=bias, out=out)
    voxels = frames * height * width
    if x.numel() == 0:
        return out

    group_size = channels // groups
    block_g, block_cg = triton.next_power_of_2(groups), triton.next_power_of_2(group_size)
    block_s = max(1, TILE_ELEMENTS // (block_g * block_cg))
    programs = min(STATS_PROGRAMS, triton.cdiv(voxels, block_s))
    per_program = triton.cdiv(triton.cdiv(voxels, programs), block_s) * block_s
    programs = triton.cdiv(voxels, per_program)
    partial = torch.empty(batch, programs, 3, block_g, dtype=torch.float32, device=x.device)
    _group_stats_kernel[(programs, batch)](
        x, partial, voxels, per_program, channels, group_size, groups,
        BLOCK_S=block_s, BLOCK_G=block_g, BLOCK_CG=block_cg, num_warps=WARPS,
    )
    mean, var = _merged_statistics(partial, groups)
    # y = (x − mean) · scale + bias with scale = rstd · weight, per (sample, channel).
    scale = (var + eps).rsqrt().repeat_interleave(group_size, dim=1) * weight.float()
    mean = mean.repeat_interleave(group_size, dim=1)

    block_c = triton.next_power_of_2(channels)
    block_s = max(1, TILE_ELEMENTS // block_c)
    _normalize_silu_kernel[(triton.cdiv(voxels, block_s), batch)](
        x, mean.contiguous(), scale.contiguous(), bias, out,
        voxels, channels, height, width,
        out.stride(0), out.stride(2), out.stride(3), out.stride(4),
        SILU=silu, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=WARPS,
    )
    return out
