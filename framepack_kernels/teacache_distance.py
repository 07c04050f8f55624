"""TeaCache decision on the device: relative L1 distance and the rescaled accumulator.

TeaCache (SPEC §7) compares the first block's modulated input with the previous
step's: rel = mean|cur - prev| / mean|prev|, maps it through a fitted polynomial
and accumulates; the blocks run when the sum reaches a threshold (then the sum
resets). The reference implementation pulls `rel` to the host every step, a sync
that stalls the launch queue. Here both stages stay on the device:

- `teacache_relative_l1`: a two-stage reduction (per-block partial sums, then one
  program that adds them in a fixed order), so the result is deterministic and no
  atomics or host round trip are needed. Sums are float32.
- `teacache_accumulate`: one program evaluates the polynomial (Horner, highest
  power first, like numpy.poly1d), adds it to the accumulator and compares with the
  threshold, returning device tensors (new_acc, should_compute).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from framepack_kernels.validation import FLOAT_DTYPES, check_launchable

# Elements (and warps) per first-stage program; partials per second-stage iteration.
PARTIAL_BLOCK = 4096
PARTIAL_WARPS = 8
FINAL_BLOCK = 1024


def teacache_relative_l1_reference(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean|current - previous| / mean|previous| in float32, as a 0-dim tensor."""
    cur, prev = current.float(), previous.float()
    return (cur - prev).abs().mean() / prev.abs().mean()


def teacache_accumulate_reference(
    acc: torch.Tensor, rel: torch.Tensor, coeffs: torch.Tensor | Sequence[float], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_acc, should_compute): acc + poly(rel) compared with threshold; reset when reached.

    coeffs are highest power first. acc, rel: 0-dim float32 tensors.
    """
    coeffs = torch.as_tensor(coeffs, dtype=torch.float32, device=acc.device)
    rescaled = torch.zeros((), dtype=torch.float32, device=acc.device)
    for c in coeffs:
        rescaled = rescaled * rel.float() + c
    total = acc.float() + rescaled
    should_compute = total >= threshold
    return torch.where(should_compute, torch.zeros_like(total), total), should_compute


@triton.jit
def _abs_diff_partials_kernel(cur_ptr, prev_ptr, diff_partials_ptr, base_partials_ptr, numel, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    cur = tl.load(cur_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    prev = tl.load(prev_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(diff_partials_ptr + block, tl.sum(tl.abs(cur - prev), axis=0))
    tl.store(base_partials_ptr + block, tl.sum(tl.abs(prev), axis=0))


@triton.jit
def _relative_l1_final_kernel(diff_partials_ptr, base_partials_ptr, rel_ptr, num_partials, BLOCK: tl.constexpr):
    diff = tl.zeros((BLOCK,), dtype=tl.float32)
    base = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < num_partials
        diff += tl.load(diff_partials_ptr + offsets, mask=mask, other=0.0)
        base += tl.load(base_partials_ptr + offsets, mask=mask, other=0.0)
    # The two means share the element count, so it cancels in the ratio.
    tl.store(rel_ptr, tl.sum(diff, axis=0) / tl.sum(base, axis=0))


def teacache_relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Fused `teacache_relative_l1_reference`: a 0-dim float32 tensor on the inputs' device.

    current, previous: same shape, contiguous, float32/float16/bfloat16. No host sync.
    """
    op = "teacache_relative_l1"
    for name, tensor in (("current", current), ("previous", previous)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; allowed: float32, float16, bfloat16")
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous; pass {name}.contiguous()")
    if current.shape != previous.shape:
        raise ValueError(f"{op}: current has shape {tuple(current.shape)} but previous has {tuple(previous.shape)}")
    if current.numel() == 0:
        raise ValueError(f"{op}: current is empty; the distance needs at least one element")
    check_launchable(op, _abs_diff_partials_kernel, current=current, previous=previous)

    numel = current.numel()
    num_partials = triton.cdiv(numel, PARTIAL_BLOCK)
    partials = torch.empty((2, num_partials), dtype=torch.float32, device=current.device)
    rel = torch.empty((), dtype=torch.float32, device=current.device)
    _abs_diff_partials_kernel[(num_partials,)](
        current, previous, partials[0], partials[1], numel, BLOCK=PARTIAL_BLOCK, num_warps=PARTIAL_WARPS
    )
    _relative_l1_final_kernel[(1,)](partials[0], partials[1], rel, num_partials, BLOCK=FINAL_BLOCK, num_warps=4)
    return rel


@triton.jit
def _teacache_accumulate_kernel(
    acc_ptr, rel_ptr, coeffs_ptr, new_acc_ptr, should_compute_ptr, threshold, NUM_COEFFS: tl.constexpr
):
    rel = tl.load(rel_ptr).to(tl.float32)
    rescaled = tl.load(coeffs_ptr).to(tl.float32)
    for i in tl.static_range(1, NUM_COEFFS):
        rescaled = rescaled * rel + tl.load(coeffs_ptr + i).to(tl.float32)
    total = tl.load(acc_ptr).to(tl.float32) + rescaled
    should_compute = total >= threshold
    tl.store(new_acc_ptr, tl.where(should_compute, 0.0, total))
    tl.store(should_compute_ptr, should_compute.to(tl.uint8))


def teacache_accumulate(
    acc: torch.Tensor, rel: torch.Tensor, coeffs: torch.Tensor | Sequence[float], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `teacache_accumulate_reference`: (new_acc float32, should_compute bool), 0-dim, on device.

    acc, rel: 0-dim float32 tensors on one device. coeffs: highest power first; pass a
    1-D float32 tensor on that device (made once) to avoid a host-to-device copy per
    call. No host sync.
    """
    op = "teacache_accumulate"
    for name, tensor in (("acc", acc), ("rel", rel)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != () or tensor.dtype != torch.float32:
            got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{op}: {name} must be a 0-dim float32 tensor, got {got}")
    coeffs = torch.as_tensor(coeffs, dtype=torch.float32, device=acc.device)
    if coeffs.dim() != 1 or coeffs.numel() == 0:
        raise ValueError(f"{op}: coeffs must be a non-empty 1-D sequence, got shape {tuple(coeffs.shape)}")
    check_launchable(op, _teacache_accumulate_kernel, acc=acc, rel=rel, coeffs=coeffs)
    coeffs = coeffs.contiguous()

    new_acc = torch.empty((), dtype=torch.float32, device=acc.device)
    should_compute = torch.empty((), dtype=torch.uint8, device=acc.device)
    _teacache_accumulate_kernel[(1,)](
        acc, rel, coeffs, new_acc, should_compute, float(threshold), NUM_COEFFS=coeffs.numel(), num_warps=1
    )
    return new_acc, should_compute.view(torch.bool)
