"""One component's weights in host memory, placed on the device whole or streamed block by block."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .host import HostArena, HostTensors, PackedBlock, module_tensors
from .streaming import BlockStreamer

# Host memory comes in chunks of a few blocks each (see HostArena).
BLOCKS_PER_CHUNK = 4


class ComponentWeights:
    """A module whose weights live in host memory (pinned when `device` is a GPU).

    `blocks` (in forward order) are packed one flat buffer each so they can stream;
    every other tensor keeps its own host copy. `place`/`evict` move the whole module;
    `placed()` and `streamed()` do it for the duration of a `with` block.
    """

    def __init__(self, module: nn.Module, device: torch.device | str, blocks: Sequence[nn.Module] = ()):
        self.module = module
        self.device = torch.device(device)
        largest = max([sum(s.nbytes for s in module_tensors(b)) for b in blocks] or [0])
        largest_tensor = max([s.nbytes for s in module_tensors(module)] or [0])
        arena = HostArena(pin=self.device.type == "cuda", chunk_bytes=max(BLOCKS_PER_CHUNK * largest, largest_tensor))
        self.blocks = [PackedBlock(block, arena) for block in blocks]
        self.rest = HostTensors(module, arena, exclude=blocks)
        self.host_bytes = arena.reserved_bytes
        self.on_device = False

    def place(self) -> None:
        self.rest.place(self.device)
        for block in self.blocks:
            block.place(self.device)
        self.on_device = True

    def evict(self) -> None:
        self.rest.evict()
        for block in self.blocks:
            block.evict()
        self.on_device = False

    @contextmanager
    def placed(self) -> Iterator[None]:
        self.place()
        try:
            yield
        finally:
            self.evict()

    @contextmanager
    def streamed(self, slots: int, resident_blocks: int = 0) -> Iterator[BlockStreamer]:
        """Everything outside the blocks on the device; the blocks stream (see BlockStreamer)."""
        self.rest.place(self.device)
        self.on_device = True
        try:
            with BlockStreamer(self.blocks, self.device, slots, resident_blocks) as streamer:
                yield streamer
        finally:
            self.rest.evict()
            self.on_device = False
