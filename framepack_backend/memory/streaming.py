"""Block weight streaming: blocks whose weights live in host memory run from a small ring of GPU slots.

`BlockStreamer` hooks each block (forward pre/post hooks; the model's code is
untouched) and carries out the `RingSchedule`: before block k computes, the copies of
the next blocks are issued on a side CUDA stream into preallocated slots, and the
compute stream waits only for block k's own copy. Events order the two streams: the
compute waits for its copy, and a copy into a slot waits until the compute that read
the slot's previous block has finished. Copy and compute overlap, so a forward costs
about max(compute, copy) instead of their sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch

from .host import PackedBlock
from .ring import Acquire, Action, Prefetch, Release, Restart, RingSchedule


class SlotCopies(Protocol):
    """Moves packed blocks into device slots and orders those copies against the compute."""

    buffers: list[torch.Tensor]

    def prefetch(self, slot: int, source: torch.Tensor, after_reader: bool) -> None: ...
    def acquire(self, slot: int) -> None: ...
    def release(self, slot: int) -> None: ...
    def restart(self) -> None: ...
    def close(self) -> None: ...


def _slot_buffers(device: torch.device, slot_bytes: int, slots: int) -> list[torch.Tensor]:
    with torch.inference_mode(False):
        return [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]


class ImmediateCopies:
    """Copies done at once, in program order: a CPU, where there is nothing to overlap."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int):
        self.buffers = _slot_buffers(device, slot_bytes, slots)

    def prefetch(self, slot: int, source: torch.Tensor, after_reader: bool) -> None:
        self.buffers[slot][: source.numel()].copy_(source)

    def acquire(self, slot: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def restart(self) -> None:
        pass

    def close(self) -> None:
        self.buffers = []


class StreamCopies:
    """Copies on a side CUDA stream, ordered against the compute stream by per-slot events."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int):
        self.device = device
        self.buffers = _slot_buffers(device, slot_bytes, slots)
        self.copy_stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.read = [torch.cuda.Event() for _ in range(slots)]

    def _compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def prefetch(self, slot: int, source: torch.Tensor, after_reader: bool) -> None:
        with torch.cuda.stream(self.copy_stream):
            if after_reader:
                self.copy_stream.wait_event(self.read[slot])
            self.buffers[slot][: source.numel()].copy_(source, non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def acquire(self, slot: int) -> None:
        self._compute_stream().wait_event(self.copied[slot])

    def release(self, slot: int) -> None:
        self.read[slot].record(self._compute_stream())

    def restart(self) -> None:
        # Every slot may still be read by compute already enqueued: later copies wait for all of it.
        self.copy_stream.wait_stream(self._compute_stream())

    def close(self) -> None:
        # The slots go back to the caching allocator on the compute stream; pending copies must land first.
        self._compute_stream().wait_stream(self.copy_stream)
        self.buffers = []


class BlockStreamer:
    """Runs `blocks` (in their forward order) from host memory through `slots` device buffers.

    The first `resident_blocks` are copied to the device once when the streamer is
    activated and stay there; the others stream. Use it as a context manager around
    the forwards: entering allocates the slots and hooks the blocks, leaving frees the
    slots and points every block back at its host copy. Every executed action is
    appended to `trace` when one is given.
    """

    def __init__(
        self,
        blocks: Sequence[PackedBlock],
        device: torch.device | str,
        slots: int = 2,
        resident_blocks: int = 0,
        trace: list[Action] | None = None,
    ):
        if not 0 <= resident_blocks <= len(blocks):
            raise ValueError(f"resident_blocks={resident_blocks} is not allowed: expected 0 … {len(blocks)}")
        if slots < 1:
            raise ValueError(f"slots={slots} is not allowed: at least 1 (2 or more overlap copy and compute)")
        self.device = torch.device(device)
        self.resident = list(blocks[:resident_blocks])
        self.streamed = list(blocks[resident_blocks:])
        self.slots = slots
        self.trace = trace
        self.copies: SlotCopies | None = None
        self._schedule: RingSchedule | None = None
        self._views: list[list[list[torch.Tensor]]] = []  # [slot][block] → the block's tensors in that slot
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def slot_bytes(self) -> int:
        return max((block.nbytes for block in self.streamed), default=0)

    def __enter__(self) -> "BlockStreamer":
        self.activate()
        return self

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self._hooks or self.copies is not None:
            raise RuntimeError("this BlockStreamer is already active")
        for block in self.resident:
            block.place(self.device)
        if not self.streamed:
            return
        self._schedule = RingSchedule(len(self.streamed), self.slots)
        copies_class = StreamCopies if self.device.type == "cuda" else ImmediateCopies
        self.copies = copies_class(self.device, self.slot_bytes, self._schedule.slots)
        with torch.inference_mode(False):
            self._views = [[block.views(buffer) for block in self.streamed] for buffer in self.copies.buffers]
        for index, block in enumerate(self.streamed):
            enter = partial(self._enter, index)
            self._hooks.append(block.module.register_forward_pre_hook(enter))
            # Sub-modules too: code may call a part of a block before the block itself.
            self._hooks.extend(child.register_forward_pre_hook(enter) for child in block.module.children())
            self._hooks.append(block.module.register_forward_hook(partial(self._exit, index)))

    def deactivate(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.copies is not None:
            self.copies.close()
        self.copies, self._schedule, self._views = None, None, []
        for block in self.streamed:
            block.point_at_host()
        for block in self.resident:
            block.evict()

    def _enter(self, index: int, module, args) -> None:
        self._carry_out(self._schedule.enter(index))

    def _exit(self, index: int, module, args, output) -> None:
        self._carry_out(self._schedule.exit(index))

    def _carry_out(self, actions: list[Action]) -> None:
        copies = self.copies
        for action in actions:
            if isinstance(action, Prefetch):
                copies.prefetch(action.slot, self.streamed[action.block].host, action.after is not None)
            elif isinstance(action, Acquire):
                copies.acquire(action.slot)
                self.streamed[action.block].point_at(self._views[action.slot][action.block])
            elif isinstance(action, Release):
                copies.release(action.slot)
                self.streamed[action.block].point_at_host()
            elif isinstance(action, Restart):
                copies.restart()
                if action.abandoned is not None:
                    self.streamed[action.abandoned].point_at_host()
            if self.trace is not None:
                self.trace.append(action)
