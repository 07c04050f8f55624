"""Gated residual add fused with the next AdaLN LayerNorm + modulation.

In the dual-stream blocks the attention residual is followed at once by the MLP's
modulated norm, and every block's final residual by the next block's modulated
norm:
    residual  = x + y * gate
    modulated = LayerNorm(residual) * (1 + scale) + shift
Done separately that is a write and a re-read of `residual`; here one program owns
a row, so the row is read once (x, y) and written twice (residual, modulated).
The norm is taken of the residual *as stored* (rounded to x.dtype), so the fused
result equals `gated_residual` followed by `adaln_layernorm_modulate`. With FP8
layers reading the modulated rows, `gated_residual_layernorm_modulate_fp8` writes them
quantized per row instead (see adaln_norm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framepack_kernels.adaln_norm import (
    adaln_layernorm_modulate_fp8_reference,
    adaln_layernorm_modulate_reference,
    check_modulation_args,
    modulated_layernorm_row,
)
from framepack_kernels.fp8_quantize import fp8_rows_like, store_fp8_row
from framepack_kernels.gated_residual import check_gated_residual_args, gated_residual_reference
from framepack_kernels.validation import check_launchable, check_unit_last_stride, output_like, row_block, warps_for_row


def gated_residual_layernorm_modulate_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, modulated): residual = x + y * gate; modulated = AdaLN of residual.

    x, y: (B, S, C); gate, shift, scale: (B, C). Both results in x.dtype.
    """
    residual = gated_residual_reference(x, y, gate)
    return residual, adaln_layernorm_modulate_reference(residual, shift, scale, eps)


def gated_residual_layernorm_modulate_fp8_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual, values, scales): the modulated rows quantized per row to e4m3."""
    residual = gated_residual_reference(x, y, gate)
    return residual, *adaln_layernorm_modulate_fp8_reference(residual, shift, scale, eps)


@triton.jit
def _gated_residual_layernorm_modulate_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    shift_ptr,
    scale_ptr,
    residual_ptr,
    modulated_ptr,
    values_ptr,
    row_scale_ptr,
    seq_len,
    channels,
    x_stride_b,
    x_stride_s,
    y_stride_b,
    y_stride_s,
    gate_stride_b,
    shift_stride_b,
    scale_stride_b,
    residual_stride_b,
    residual_stride_s,
    modulated_stride_b,
    modulated_stride_s,
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
    y = tl.load(y_ptr + b * y_stride_b + s * y_stride_s + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    residual = (x + y * gate).to(residual_ptr.dtype.element_ty)
    tl.store(residual_ptr + b * residual_stride_b + s * residual_stride_s + cols, residual, mask=mask)

    modulated = modulated_layernorm_row(residual.to(tl.float32), mask, cols, channels, eps,
                                        shift_ptr + b * shift_stride_b, scale_ptr + b * scale_stride_b)
    modulated = modulated.to(residual_ptr.dtype.element_ty)
    if FP8:  # quantize the row as it would have been stored
        store_fp8_row(values_ptr + row * channels, row_scale_ptr, row, modulated.to(tl.float32), cols, mask)
    else:
        tl.store(modulated_ptr + b * modulated_stride_b + s * modulated_stride_s + cols, modulated, mask=mask)


def _launch(op, x, y, gate, shift, scale, eps, residual_out, fp8: bool):
    """Check the arguments and run the kernel. Returns (residual, modulated) or, with `fp8`,
    (residual, values, scales); the destination not used gets stand-ins it never touches."""
    check_gated_residual_args(op, x, y, gate)
    check_modulation_args(op, x, shift, scale)
    batch, seq_len, channels = x.shape
    residual_out = output_like(op, "residual_out", residual_out, x)
    if fp8:
        values, row_scales = fp8_rows_like(x)
        modulated = residual_out
        result = (residual_out, values, row_scales)
    else:
        modulated = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        values, row_scales = modulated, shift
        result = (residual_out, modulated)
    tensors = {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale, "residual_out": residual_out}
    for name, tensor in tensors.items():
        check_unit_last_stride(op, name, tensor)
    check_launchable(op, _gated_residual_layernorm_modulate_kernel, **tensors)
    if x.numel() == 0:
        return result
    block = row_block(channels)
    _gated_residual_layernorm_modulate_kernel[(batch * seq_len,)](
        x, y, gate, shift, scale, residual_out, modulated, values, row_scales,
        seq_len, channels,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        gate.stride(0), shift.stride(0), scale.stride(0),
        residual_out.stride(0), residual_out.stride(1), modulated.stride(0), modulated.stride(1),
        eps,
        FP8=fp8,
        BLOCK_C=block,
        num_warps=warps_for_row(block),
    )
    return result


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `gated_residual_layernorm_modulate_reference`.

    x, y: (B, S, C) with unit stride over C; gate, shift, scale: (B, C).
    Returns (residual, modulated), both in x.dtype; `residual_out` (same shape and
    dtype, may be x itself for an in-place update) receives the residual.
    """
    return _launch("gated_residual_layernorm_modulate", x, y, gate, shift, scale, eps, residual_out, fp8=False)


def gated_residual_layernorm_modulate_fp8(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused `gated_residual_layernorm_modulate_fp8_reference`: (residual, (B·S, C) e4m3
    values, (B·S, 1) scales); `residual_out` as in `gated_residual_layernorm_modulate`."""
    return _launch("gated_residual_layernorm_modulate_fp8", x, y, gate, shift, scale, eps, residual_out, fp8=True)
