"""The block-streaming schedule: which block's weights go into which GPU slot, and what waits for what.

Pure bookkeeping over block indices, no tensors: `BlockStreamer` carries out the
actions with CUDA streams and events (or at once on a CPU), and the tests check
their order on a CPU.

Blocks run in a fixed cyclic order (a forward is block 0 … n−1, the next forward
starts at 0 again). `slots` GPU buffers form a ring: while block k computes, the
next `slots − 1` blocks are copied in or already there, so the copy of block k+1
overlaps the compute of block k, and the end of one forward already prefetches the
start of the next. A copy into a slot waits for the compute that last read the slot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Prefetch:
    """Copy `block` into `slot` on the copy stream, after the compute of `after` (the slot's last reader) ended."""

    block: int
    slot: int
    after: int | None


@dataclass(frozen=True)
class Acquire:
    """The compute stream waits for `block`'s copy; the block's weights are now read from `slot`."""

    block: int
    slot: int


@dataclass(frozen=True)
class Release:
    """The compute of `block` is enqueued in full: `slot` may be refilled once the GPU gets past it."""

    block: int
    slot: int


@dataclass(frozen=True)
class Restart:
    """A block ran out of the expected order (the first forward, or one cut short by an error).

    Pending copies are abandoned once finished, `abandoned` (a block left acquired) goes
    back to host memory, and the ring starts empty.
    """

    abandoned: int | None = None


Action = Prefetch | Acquire | Release | Restart


@dataclass(frozen=True)
class _Entry:
    block: int
    slot: int


class RingSchedule:
    """The actions to carry out before (`enter`) and after (`exit`) each block computes."""

    def __init__(self, blocks: int, slots: int):
        if blocks < 1:
            raise ValueError(f"blocks={blocks} is not allowed: a schedule needs at least one block")
        if slots < 1:
            raise ValueError(f"slots={slots} is not allowed: at least 1 (2 or more overlap copy and compute)")
        self.blocks = blocks
        self.slots = min(slots, blocks)  # more slots than blocks would hold one block twice
        self._ahead: deque[_Entry] = deque()  # copies issued, blocks not yet computing, in order
        self._current: _Entry | None = None  # the block computing now
        self._last_reader: list[int | None] = [None] * self.slots
        self._next_block = 0
        self._next_slot = 0

    @property
    def current(self) -> int | None:
        return None if self._current is None else self._current.block

    def enter(self, block: int) -> list[Action]:
        """Before `block` computes: top the ring up with prefetches, then acquire the block.

        Entering the block that is already acquired does nothing, so any sub-module of a
        block may ask for its weights (the TeaCache signal reads the first block's norm).
        """
        if not 0 <= block < self.blocks:
            raise ValueError(f"block={block} is not allowed: expected 0 … {self.blocks - 1}")
        if self._current is not None and self._current.block == block:
            return []
        actions: list[Action] = []
        if self._current is not None or not self._ahead or self._ahead[0].block != block:
            actions.append(Restart(self.current))
            self._restart_at(block)
        while len(self._ahead) < self.slots:
            entry = _Entry(self._next_block, self._next_slot)
            actions.append(Prefetch(entry.block, entry.slot, self._last_reader[entry.slot]))
            self._ahead.append(entry)
            self._next_block = (self._next_block + 1) % self.blocks
            self._next_slot = (self._next_slot + 1) % self.slots
        self._current = self._ahead.popleft()
        actions.append(Acquire(self._current.block, self._current.slot))
        return actions

    def exit(self, block: int) -> list[Action]:
        """After `block`'s compute is enqueued: release its slot."""
        if self._current is None or self._current.block != block:
            raise RuntimeError(f"block {block} finished but block {self.current} was the one acquired")
        entry, self._current = self._current, None
        self._last_reader[entry.slot] = entry.block
        return [Release(entry.block, entry.slot)]

    def _restart_at(self, block: int) -> None:
        self._ahead.clear()
        self._current = None
        self._last_reader = [None] * self.slots
        self._next_block = block
        self._next_slot = 0

