"""Argument checks shared by the kernel wrappers.

Every wrapper validates before launching, because a Triton kernel given a wrong
shape or stride does not fail: it reads or writes the wrong memory.
"""

from __future__ import annotations

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(op: str, name: str, tensor: torch.Tensor, ndim: int) -> None:
    """Raise unless `tensor` is a float32/float16/bfloat16 tensor with `ndim` dimensions."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; allowed: float32, float16, bfloat16")
    if tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}; expected {expected}")


def check_unit_last_stride(op: str, name: str, tensor: torch.Tensor) -> None:
    """The kernels index the last dimension as contiguous so loads can be vectorised."""
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name} must be contiguous in its last dimension (stride 1), got strides "
            f"{tensor.stride()}; pass {name}.contiguous()"
        )


def check_launchable(op: str, kernel: object, **tensors: torch.Tensor) -> None:
    """Raise unless all tensors share one device the kernel can run on.

    Compiled kernels need CUDA tensors; with TRITON_INTERPRET=1 set before `kernels`
    is imported they run through Triton's interpreter on CPU tensors instead.
    """
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first_device = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first_device:
            raise ValueError(
                f"{op}: {name} is on {device} but {first_name} is on {first_device}; all must share one device"
            )
    interpreted = not isinstance(kernel, triton.runtime.JITFunction)
    if first_device.type != "cuda" and not interpreted:
        raise ValueError(
            f"{op}: tensors are on {first_device}; the Triton kernel runs on CUDA tensors "
            f"(or on CPU when TRITON_INTERPRET=1 is set before `kernels` is imported). "
            f"Use {op}_reference for CPU tensors."
        )


def output_like(op: str, name: str, out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`out` checked to have x's shape and dtype, or a new contiguous tensor like x."""
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    check_float_tensor(op, name, out, x.dim())
    check_shape(op, name, out, tuple(x.shape))
    if out.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {out.dtype}; it must match x ({x.dtype})")
    return out


def row_block(columns: int) -> int:
    """Block width covering one whole row of `columns` elements (a power of two)."""
    return triton.next_power_of_2(columns)


def warps_for_row(block: int) -> int:
    """Warps for a program owning a `block`-wide row: ~64 elements per thread.

    Few warps with many independent loads each measured fastest on an H200 for
    3072-wide bf16 rows (2 warps ~10-20% ahead of 8; 16+ clearly slower).
    """
    return max(1, min(16, block // 2048))
