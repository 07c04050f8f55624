"""Memory modes and the choice between them: the fastest mode whose peak fits the GPU.

- resident: every component stays on the GPU (fastest).
- offload: each phase moves the components it runs onto the GPU and back to host memory
  after (text encoders, then SigLIP + VAE encoder, then the transformer, then the VAE).
- stream: like offload, but the transformer and the Llama text encoder keep their blocks
  in host memory and stream them through a small ring of GPU slots while they run; the
  VAE works in tiles. As many transformer blocks as the budget allows stay on the GPU
  for the whole sampling phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..components import JOB_PHASES, PHASE_COMPONENTS
from ..settings import MEMORY_MODES
from .footprint import GIB, MemoryFootprint

FASTEST_FIRST = ("resident", "offload", "stream")
TEXT_ENCODER_SLOTS = 2  # the text encoder runs once per job: two slots overlap its copies well enough
PREFERRED_SLOTS = 3  # one slot of slack when a block's copy outlasts the previous block's compute
MIN_SLOTS = 2


@dataclass(frozen=True)
class StreamPlan:
    """How the transformer streams: ring slots and how many leading blocks stay on the GPU."""

    slots: int
    resident_blocks: int


def resident_bytes(footprint: MemoryFootprint) -> int:
    f = footprint
    return f.weights + max(f.work(phase, "resident") for phase in JOB_PHASES)


def offload_phase_bytes(footprint: MemoryFootprint) -> dict[str, int]:
    """Per phase: the whole components it runs and its working memory."""
    f = footprint
    return {
        phase: sum(f.component_bytes[name] for name in PHASE_COMPONENTS[phase]) + f.work(phase, "offload")
        for phase in JOB_PHASES
    }


def streamed_component_bytes(footprint: MemoryFootprint, name: str, slots: int, resident_blocks: int) -> int:
    """A streamed component on the GPU: weights outside its blocks + its leading resident blocks + the ring."""
    blocks = footprint.block_bytes[name]
    streamed = blocks[resident_blocks:]
    ring = min(slots, len(streamed)) * max(streamed, default=0)
    outside_blocks = footprint.component_bytes[name] - sum(blocks)
    return outside_blocks + sum(blocks[:resident_blocks]) + ring


def stream_sampling_bytes(footprint: MemoryFootprint, plan: StreamPlan) -> int:
    """Transformer weights outside the blocks + resident blocks + the ring + activations."""
    transformer = streamed_component_bytes(footprint, "transformer", plan.slots, plan.resident_blocks)
    return transformer + footprint.work("sampling", "stream")


def stream_phase_bytes(footprint: MemoryFootprint, plan: StreamPlan) -> dict[str, int]:
    """Per phase: its components (streamed ones block by block, the others whole) and its tiled working memory."""
    f = footprint

    def on_device(name: str) -> int:
        if name not in f.block_bytes:
            return f.component_bytes[name]
        if name == "transformer":
            return streamed_component_bytes(f, name, plan.slots, plan.resident_blocks)
        return streamed_component_bytes(f, name, TEXT_ENCODER_SLOTS, 0)

    return {
        phase: sum(on_device(name) for name in PHASE_COMPONENTS[phase]) + f.tiled_work(phase, "stream")
        for phase in JOB_PHASES
    }


def memory_needed(mode: str, footprint: MemoryFootprint, plan: StreamPlan | None = None) -> int:
    """Estimated peak GPU bytes of a job in `mode` (stream: with `plan`, default the smallest ring)."""
    if mode == "resident":
        return resident_bytes(footprint)
    if mode == "offload":
        return max(offload_phase_bytes(footprint).values())
    if mode == "stream":
        return max(stream_phase_bytes(footprint, plan or StreamPlan(MIN_SLOTS, 0)).values())
    raise ValueError(f"memory_mode={mode!r} is not allowed: expected one of {', '.join(map(repr, FASTEST_FIRST))}")


def budget_bytes(free_bytes: int, preserve_gb: float) -> int:
    """GPU bytes a job may use: what is free minus the preservation (GB counted as GiB, as the reference does)."""
    if free_bytes < 0:
        raise ValueError(f"free_bytes={free_bytes} is not allowed: expected >= 0")
    if not preserve_gb >= 0:
        raise ValueError(f"gpu_memory_preservation={preserve_gb!r} is not allowed: expected a number of GB >= 0")
    return free_bytes - int(preserve_gb * GIB)


def choose_memory_mode(requested: str, free_bytes: int, preserve_gb: float, footprint: MemoryFootprint) -> str:
    """`requested` unless it is "auto"; then the fastest mode whose estimated peak fits.

    The budget is `free_bytes` (GPU memory this job may take: free plus what the
    engine itself holds) minus `preserve_gb`. When nothing fits, stream: it is the
    smallest, and the only mode that may still run.
    """
    if requested not in MEMORY_MODES:  # options and overrides were checked (settings.py): a bug
        allowed = ", ".join(map(repr, MEMORY_MODES))
        raise ValueError(f"memory_mode={requested!r} is not allowed: expected one of {allowed}")
    budget = budget_bytes(free_bytes, preserve_gb)
    if requested != "auto":
        return requested
    for mode in FASTEST_FIRST[:-1]:
        if memory_needed(mode, footprint) <= budget:
            return mode
    return "stream"


def plan_stream(budget: int, footprint: MemoryFootprint) -> StreamPlan:
    """The fastest stream configuration within `budget` bytes for the sampling phase.

    Three slots when they fit (else two), then as many leading blocks resident as fit:
    each resident block is one copy less per forward.
    """
    slots = PREFERRED_SLOTS
    if stream_sampling_bytes(footprint, StreamPlan(slots, 0)) > budget:
        slots = MIN_SLOTS
    resident = 0
    while (resident < len(footprint.block_bytes["transformer"])
           and stream_sampling_bytes(footprint, StreamPlan(slots, resident + 1)) <= budget):
        resident += 1
    return StreamPlan(slots, resident)


@dataclass(frozen=True)
class DecodePlan:
    """How a job's VAE decodes fit the memory there is: whole, in spatial tiles, or not at all.

    `budget` is None where the available memory is unknown (then nothing is checked).
    Tiling changes pixels slightly, so a decode is tiled only when the whole one does not fit.
    """

    tiled: bool
    fits: bool
    needed_bytes: int  # the estimate for the chosen way (the tiled one when nothing fits)
    untiled_bytes: int
    budget: int | None


def plan_decode(mode: str, footprint: MemoryFootprint, budget: int | None, on_gpu: bool,
                untiled_work: int, tiled_work: int) -> DecodePlan:
    """Whole decode if its estimate fits `budget`, else tiled if that fits, else a plan that does not fit.

    On a GPU the decode needs the weights that stay there (all of them in resident mode,
    else the VAE) beside its working memory; on a CPU the weights are already counted out
    of the available memory. The job's LoRAs count on either: they are placed after the
    available memory was measured. Stream mode always tiles (its budget is the smallest).
    """
    held = footprint.loras_in("decode", mode)
    if on_gpu:
        held += footprint.weights if mode == "resident" else footprint.component_bytes["vae"]
    untiled, tiled = held + untiled_work, held + tiled_work
    if budget is None:
        return DecodePlan(mode == "stream", True, tiled if mode == "stream" else untiled, untiled, None)
    if mode != "stream" and untiled <= budget:
        return DecodePlan(False, True, untiled, untiled, budget)
    return DecodePlan(True, tiled <= budget, tiled, untiled, budget)
