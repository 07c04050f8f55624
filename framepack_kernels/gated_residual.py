"""Gated residual add: x + y * gate, gate broadcast over the sequence.

Every branch of the HunyuanVideo blocks (attention, MLP, single-stream fused
output) ends in `residual + branch * gate[:, None]`: two launches and an
intermediate (B, S, C) tensor in eager torch, one read of x and y and one write
here. Computed in float32 (one fused multiply-add), rounded once to x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framepack_kernels.validation import (
    check_float_tensor,
    check_launchable,
    check_shape,
    check_unit_last_stride,
    output_like,
)

# Tile per program: ROWS tokens x BLOCK_C channels over NUM_WARPS warps, i.e. 64
# elements per thread. Measured on an H200 at the 640-bucket shapes: 2 warps reached
# ~2.7 TB/s where 4-8 warps (8-16 elements per thread) stayed near 2.0 TB/s; more
# independent loads per thread keep more bytes in flight.
ROWS = 4
BLOCK_C = 1024
NUM_WARPS = 2


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate[:, None], computed in float32, returned in x.dtype.

    x, y: (B, S, C); gate: (B, C).
    """
    return (x.float() + y.float() * gate.float()[:, None, :]).to(x.dtype)


@triton.jit
def _gated_residual_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    num_rows,
    seq_len,
    channels,
    x_stride_b,
    x_stride_s,
    y_stride_b,
    y_stride_s,
    gate_stride_b,
    out_stride_b,
    out_stride_s,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < num_rows) & (cols < channels)
    b = rows // seq_len
    s = rows % seq_len

    x = tl.load(x_ptr + b * x_stride_b + s * x_stride_s + cols, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + b * y_stride_b + s * y_stride_s + cols, mask=mask).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_stride_b + cols, mask=mask).to(tl.float32)
    out = x + y * gate
    tl.store(out_ptr + b * out_stride_b + s * out_stride_s + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def check_gated_residual_args(op: str, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    check_float_tensor(op, "x", x, 3)
    check_float_tensor(op, "y", y, 3)
    check_float_tensor(op, "gate", gate, 2)
    check_shape(op, "y", y, tuple(x.shape))
    check_shape(op, "gate", gate, (x.shape[0], x.shape[2]))


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused `gated_residual_reference`.

    x, y: (B, S, C) with unit stride over C; gate: (B, C) (a chunk view is fine).
    Returns a new contiguous tensor in x.dtype, or writes into `out` (same shape and
    dtype); pass out=x to update the residual stream in place.
    """
    op = "gated_residual"
    check_gated_residual_args(op, x, y, gate)
    out = output_like(op, "out", out, x)
    for name, tensor in (("x", x), ("y", y), ("gate", gate), ("out", out)):
        check_unit_last_stride(op, name, tensor)
    check_launchable(op, _gated_residual_kernel, x=x, y=y, gate=gate, out=out)
    if x.numel() == 0:
        return out

    batch, seq_len, channels = x.shape
    num_rows = batch * seq_len
    block = min(BLOCK_C, triton.next_power_of_2(channels))
    _gated_residual_kernel[(triton.cdiv(num_rows, ROWS), triton.cdiv(channels, block))](
        x, y, gate, out,
        num_rows, seq_len, channels,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), out.stride(0), out.stride(1),
        ROWS=ROWS,
        BLOCK_C=block,
        num_warps=NUM_WARPS,
    )
    return out
