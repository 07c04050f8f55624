"""AdaLN modulation fused with its LayerNorm: LayerNorm(x) * (1 + scale) + shift.

The transformer blocks run this before every attention and MLP branch. Eager torch
spends four launches on it (norm, 1 + scale, multiply, add), each a full pass over
the (B, S, C) activations; the kernel reads x once and writes the result once.
Statistics and modulation are computed in float32 and rounded once at the end.

When FP8 layers read the result, `adaln_layernorm_modulate_fp8` writes it already
quantized per row (e4m3 values and a scale), the rounding `quantize_fp8_rows` would
apply to the stored result, without the bf16 round trip through memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from framepack_kernels.fp8_quantize import fp8_rows_like, quantize_fp8_rows_reference, store_fp8_row
from framepack_kernels.validation import (
    check_float_tensor,
    check_launchable,
    check_shape,
    check_unit_last_stride,
    output_like,
    row_block,
    warps_for_row,
)

# One program holds a whole row in registers; beyond this width use the reference.
MAX_CHANNELS = 16384


def adaln_layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over the last dim (no affine), then x * (1 + scale) + shift per batch row.

    x: (B, S, C); shift, scale: (B, C). Computed in float32, returned in x.dtype.
    """
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]).to(x.dtype)


def adaln_layernorm_modulate_fp8_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The modulated rows (rounded to x.dtype) quantized per row: ((B·S, C) e4m3, (B·S, 1) fp32)."""
    return quantize_fp8_rows_reference(adaln_layernorm_modulate_reference(x, shift, scale, eps))


@triton.jit
def modulated_layernorm_row(x, mask, cols, channels, eps, shift_row_ptr, scale_row_ptr):
    """LayerNorm of one float32 row held in registers, then * (1 + scale) + shift."""
    mean = tl.sum(x, axis=0) / channels
    # Two-pass variance from registers: no cancellation for rows with a large mean.
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / channels
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(shift_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return centered * rstd * (1.0 + scale) + shift


@triton.jit
def _adaln_layernorm_modulate_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    out_ptr,
    values_ptr,
    row_scale_ptr,
    seq_len,
    channels,
    x_stride_b,
    x_stride_s,
    shift_stride_b,
    scale_stride_b,
    out_stride_b,
    out_stride_s,
    eps,
    FP8: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    s = row % seq_len
    cols = tl.arange(0, BLOCK_C)
    mask = cols < channels

    x = tl.load(x_ptr + b * x_stride_b + s * x_stride_s + cols, mask=mask, other=0.0).to(tl.float32)
    out = modulated_layernorm_row(x, mask, cols, channels, eps, shift_ptr + b * shift_stride_b,
                                  scale_ptr + b * scale_stride_b)
    out = out.to(x_ptr.dtype.element_ty)
    if FP8:  # quantize the row as it would have been stored
        store_fp8_row(values_ptr + row * channels, row_scale_ptr, row, out.to(tl.float32), cols, mask)
    else:
        tl.store(out_ptr + b * out_stride_b + s * out_stride_s + cols, out, mask=mask)


def check_modulation_args(op: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """shift and scale: (B, C) for x (B, S, C), with C within what one program holds."""
    check_float_tensor(op, "shift", shift, 2)
    check_float_tensor(op, "scale", scale, 2)
    batch, _, channels = x.shape
    check_shape(op, "shift", shift, (batch, channels))
    check_shape(op, "scale", scale, (batch, channels))
    if not 0 < channels <= MAX_CHANNELS:
        raise ValueError(f"{op}: x has {channels} channels; allowed 1..{MAX_CHANNELS}")


def _launch(op, x, shift, scale, eps, out, fp8: bool):
    """Check the arguments and run the kernel. Returns `out` (new like x when None) or, with
    `fp8`, new (values, scales); the destination not used gets stand-ins it never touches."""
    check_float_tensor(op, "x", x, 3)
    check_modulation_args(op, x, shift, scale)
    batch, seq_len, channels = x.shape
    if fp8:
        values, row_scales = result = fp8_rows_like(x)
        out = x
    else:
        out = result = output_like(op, "out", out, x)
        values, row_scales = out, shift
    for name, tensor in (("x", x), ("shift", shift), ("scale", scale), ("out", out)):
        check_unit_last_stride(op, name, tensor)
    check_launchable(op, _adaln_layernorm_modulate_kernel, x=x, shift=shift, scale=scale, out=out)
    if x.numel() == 0:
        return result
    block = row_block(channels)
    _adaln_layernorm_modulate_kernel[(batch * seq_len,)](
        x, shift, scale, out, values, row_scales,
        seq_len, channels,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), out.stride(0), out.stride(1),
        eps,
        FP8=fp8,
        BLOCK_C=block,
        num_warps=warps_for_row(block),
    )
    return result


def adaln_layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused `adaln_layernorm_modulate_reference`.

    x: (B, S, C), any strides with unit stride over C. shift, scale: (B, C), e.g. the
    chunks of the modulation projection (views are fine). Returns a new (B, S, C)
    tensor in x.dtype, or writes into `out` (same shape and dtype; may be x itself).
    """
    return _launch("adaln_layernorm_modulate", x, shift, scale, eps, out, fp8=False)


def adaln_layernorm_modulate_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `adaln_layernorm_modulate_fp8_reference`: new (B·S, C) e4m3 values and (B·S, 1) scales."""
    return _launch("adaln_layernorm_modulate_fp8", x, shift, scale, eps, None, fp8=True)
