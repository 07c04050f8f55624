"""A LoRA merged into a float layer's weight once for a job, and undone bit for bit without a copy of W.

Merge: W' = round(W + Δ), Δ = up · down (up holds strength · alpha / rank; several LoRAs
stacked, lora/apply.py), Δ and the sum in fp64 (DELTA_DTYPE, below) and rounded once to W's
dtype: the layer then runs exactly as the base layer does, on the weight a merged
checkpoint would have.

Undo: round(W' − Δ) gives back W wherever the merge's rounding error is below half an ulp
of W, which holds unless W' lies in a higher binade than W (or the error is an exact tie):
there the merge maps several W onto one W' and the information is gone. So the merge also
computes round(W' − Δ), compares it with W bit for bit (signed zeros and NaNs included) and
keeps the original values where they differ, as a sparse correction (flat indices, int32
where they fit, and W's values there). Undo recomputes Δ with the same GEMM on the same
factors and device, subtracts it with the same arithmetic and scatters the kept values
back. On normal random weights the correction is about the relative size of Δ, in bf16 and
fp32 alike: 1.3 % of the elements for RMS(Δ) = 1 % of RMS(W), 2.3 % for 2 %, 4.6 % for 5 %
(benchmarks/lora.py reports it for its run); 6 bytes per kept bf16 element, against 2 per
element for a full copy of W.

Exactness rests on Δ being recomputed bit-identically: the same factors (kept on the device
for the job), shapes and device, so the same GEMM kernel; cuBLAS and the CPU BLAS give the
same result for the same call on one device (a GPU test checks it, tests/test_lora_merge.py).
Should that ever fail, the undo says so rather than leave changed weights for the next job:
each merge keeps a checksum of W's bits (one reduction), compared after the undo
(`restored`; lora/apply.py checks every layer's once, with one host sync, when the job ends).
Only for weights that stay where they are for the whole job (memory mode `resident`): a
weight copied in per phase or per forward would lose the merge or the undo.
"""

from __future__ import annotations

import torch

# The integer type as wide as each float element: its bit patterns, compared and summed.
INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


# Δ and the sums with it in fp64: the undo must recompute Δ bit for bit, and an fp32 GEMM
# is not a fixed function: TF32 (torch.backends.cuda.matmul.allow_tf32, a process-wide
# switch) rounds its inputs to 10 bits, so a switch flipped between a job's merge and its
# undo would break the undo. fp64 GEMMs have no such mode, and from the fp32 factors they
# are all but exact. The GEMM is memory-bound where fp64 is fast (rank ≪ in, out; about
# 1.6 TFLOP per job for rank 32 on the 13B blocks, apply and undo: ~25 ms at an H100's
# 67 fp64 TFLOPS); cards with 1/64-rate fp64 would take about a second for it.
DELTA_DTYPE = torch.float64


def delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Δ = up · down, (out, in), in DELTA_DTYPE: the one computation merge and undo share."""
    return up.to(DELTA_DTYPE) @ down.to(DELTA_DTYPE)


def _added(weight: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    return (weight + change).to(weight.dtype)  # the sum in DELTA_DTYPE, one rounding to W's dtype


def _subtracted(weight: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    return (weight - change).to(weight.dtype)


def bit_patterns(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so -0.0 differs from 0.0 and a NaN equals itself."""
    return tensor.view(INT_OF_WIDTH[tensor.element_size()])


def _checksum(weight: torch.Tensor) -> torch.Tensor:
    """Two sums of W's bit patterns (every element, every other one), on W's device: a changed element changes them."""
    bits = bit_patterns(weight).view(-1)
    return torch.stack([bits.sum(dtype=torch.int64), bits[::2].sum(dtype=torch.int64)])


class MergedInPlace:
    """One layer's weight with a LoRA merged in place; `undo()` restores it bit for bit."""

    def __init__(self, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor):
        """Merge up · down into `weight` (a float parameter, contiguous, on the device of the factors)."""
        if not weight.is_floating_point() or not weight.is_contiguous():
            raise ValueError(f"an in-place LoRA merge needs a contiguous float weight, got {weight.dtype} "
                             f"(contiguous: {weight.is_contiguous()})")
        self.weight, self.down, self.up = weight, down, up
        self._address = weight.data_ptr()
        self._checksum = _checksum(weight)
        self.restored: torch.Tensor | None = None  # after undo(): whether W's checksum is back (a device bool)
        with torch.no_grad():
            change = delta(down, up)
            merged = _added(weight, change)
            missed = (bit_patterns(_subtracted(merged, change)) != bit_patterns(weight)).view(-1).nonzero().squeeze(1)
            index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
            self.kept_at = missed.to(index_dtype)
            self.kept = weight.view(-1)[missed]
            weight.copy_(merged)

    @property
    def kept_bytes(self) -> int:
        """Memory the exact undo holds beyond the factors."""
        return self.kept_at.numel() * self.kept_at.element_size() + self.kept.numel() * self.kept.element_size()

    def undo(self) -> None:
        """W ← round(W' − Δ), then the kept originals where that is not W."""
        if self.weight.data_ptr() != self._address:
            # Moved mid-job (not resident): subtracting here would corrupt whatever copy it now is.
            raise RuntimeError("a LoRA merged in place was moved before it was undone; the merge assumes "
                               "weights that stay on the device for the whole job (memory mode resident)")
        with torch.no_grad():
            self.weight.copy_(_subtracted(self.weight, delta(self.down, self.up)))
            self.weight.view(-1).index_copy_(0, self.kept_at.long(), self.kept)
            self.restored = (_checksum(self.weight) == self._checksum).all()
