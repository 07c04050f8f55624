"""Where a pipeline's weights live during a job: the mode, and which components each phase needs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from ..components import COMPONENT_NAMES, PHASE_COMPONENTS, STREAMED_COMPONENTS
from .footprint import decode_work_bytes, job_footprint, streamable_blocks
from .modes import (
    TEXT_ENCODER_SLOTS,
    DecodePlan,
    StreamPlan,
    budget_bytes,
    choose_memory_mode,
    plan_decode,
    plan_stream,
)
from .weights import ComponentWeights

# Which components there are, which phase runs which, and which stream their blocks
# (the others are small enough to move whole): all from components.COMPONENT_SPECS.


def available_gpu_bytes(device: torch.device) -> int:
    """GPU memory a job may use: what is free plus what this process's allocator already holds."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def available_host_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """RAM the kernel could give a process without swapping (`MemAvailable`); None where unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a job may use on `device`: the GPU's (free + this process's cache) or the host's RAM."""
    return available_gpu_bytes(device) if device.type == "cuda" else available_host_bytes()


class MemoryManager:
    """Puts the components where the memory mode wants them, before a job and around each phase."""

    def __init__(
        self,
        components: Any,
        device: torch.device | str,
        host_weights: Mapping[str, ComponentWeights] | None = None,
        available_memory: Callable[[torch.device], int | None] = available_memory_bytes,
    ):
        """`host_weights`: host copies already made for some components (they are made on first need otherwise).
        `available_memory(device)`: bytes a job may use there, None where unknown (a test passes a small budget)."""
        self.components = components
        self.device = torch.device(device)
        self.available_memory = available_memory
        self.mode: str | None = None
        self.plan: StreamPlan | None = None
        self.decode: DecodePlan | None = None  # the last prepared job's decode
        self._weights: dict[str, ComponentWeights] = dict(host_weights or {})

    def prepare(
        self,
        requested: str,
        preserve_gb: float,
        height: int,
        width: int,
        window: int,
        available_bytes: int | None = None,
        decode_latents: int | None = None,
        lora_bytes: Mapping[str, int] | None = None,
    ) -> str:
        """Pick the mode for a job at this size (see choose_memory_mode), place the weights, return the mode.

        `available_bytes` overrides the measured free GPU memory (a simulated smaller
        card). On a CPU every mode runs as asked and "auto" is resident. Also plans the
        job's VAE decodes of at most `decode_latents` latent frames each (default
        2·window + 1) against the memory there is: `self.decode` (see modes.plan_decode).
        `lora_bytes`: what the job's LoRAs will hold on the device, per mode (lora/footprint.py).
        """
        footprint = job_footprint(self.components, height, width, window, lora_bytes)
        on_gpu = self.device.type == "cuda"
        if available_bytes is None and not on_gpu:
            # Host and device memory are one: nothing to fit, so "auto" leaves everything in place.
            mode = "resident" if requested == "auto" else choose_memory_mode(requested, 0, 0.0, footprint)
            budget = 0
            host = self.available_memory(self.device)
            decode_budget = None if host is None else host
        else:
            if available_bytes is None:
                available_bytes = self.available_memory(self.device) or 0
            mode = choose_memory_mode(requested, available_bytes, preserve_gb, footprint)
            budget = budget_bytes(available_bytes, preserve_gb)
            decode_budget = budget
        self.configure(mode, plan_stream(budget, footprint) if mode == "stream" else None)
        self.decode = plan_decode(
            mode, footprint, decode_budget, on_gpu,
            untiled_work=decode_work_bytes(height, width, window, tiled=False, latent_frames=decode_latents),
            tiled_work=decode_work_bytes(height, width, window, tiled=True, latent_frames=decode_latents),
        )
        return mode

    def configure(self, mode: str, plan: StreamPlan | None = None) -> None:
        """Move the weights for `mode`: all on the device (resident) or all in host memory."""
        if mode == "stream" and plan is None:
            raise ValueError("stream mode needs a StreamPlan (see plan_stream)")
        if (mode, plan) == (self.mode, self.plan):
            return
        if mode == "resident":
            for name in COMPONENT_NAMES:
                if name in self._weights:
                    self._weights[name].place()
                else:
                    with torch.inference_mode(False):  # weights must not become inference tensors
                        getattr(self.components, name).to(self.device)
        else:
            for name in COMPONENT_NAMES:
                self._host_weights(name).evict()
        self._set_vae_tiling(mode == "stream")
        self.mode, self.plan = mode, plan
        self._release_cached_memory()

    def placed(self) -> set[str]:
        """The components whose weights are on the device now (streamed ones count while they run)."""
        if self.mode == "resident":
            return set(COMPONENT_NAMES)
        return {name for name, weights in self._weights.items() if weights.on_device}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Have the components of phase `name` (see PHASE_COMPONENTS) on the device for the `with` block."""
        if name not in PHASE_COMPONENTS:
            raise ValueError(f"phase={name!r} is not allowed: expected one of {', '.join(PHASE_COMPONENTS)}")
        if self.mode in (None, "resident"):
            yield
            return
        try:
            with ExitStack() as stack:
                for component in PHASE_COMPONENTS[name]:
                    weights = self._weights[component]
                    if self.mode == "stream" and weights.blocks:
                        slots, resident = (
                            (self.plan.slots, self.plan.resident_blocks) if component == "transformer"
                            else (TEXT_ENCODER_SLOTS, 0)
                        )
                        stack.enter_context(weights.streamed(slots, resident))
                    else:
                        stack.enter_context(weights.placed())
                yield
        finally:
            self._release_cached_memory()

    def _host_weights(self, name: str) -> ComponentWeights:
        """The component's host copy, made on first use (a resident-only engine never pays for it)."""
        if name not in self._weights:
            module = getattr(self.components, name)
            blocks = streamable_blocks(module) if name in STREAMED_COMPONENTS else []
            self._weights[name] = ComponentWeights(module, self.device, blocks)
        return self._weights[name]

    def _set_vae_tiling(self, tiled: bool) -> None:
        vae = self.components.vae
        if tiled and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        elif hasattr(vae, "disable_tiling"):
            vae.disable_tiling()

    def _release_cached_memory(self) -> None:
        # Give freed blocks back to the driver, so the preserved memory is really free for others.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
