"""Model weights that live in host memory and visit the GPU on demand.

A component's weights are copied once into host memory (page-locked when a GPU will
read them, so copies to it run asynchronously at full PCIe speed). Each module
tensor then points at its host copy; placing it on the GPU swaps in a device copy
(`tensor.data = ...`) and evicting swaps the host copy back, so the module's code and
its checkpoint keys never change.

Transformer blocks are packed: all of one block's tensors sit in one flat byte buffer,
so moving a block is a single copy, into one GPU slot (see `streaming.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ALIGNMENT = 256  # bytes between packed tensors: what cudaMalloc guarantees and GEMM kernels expect
MIN_CHUNK_BYTES = 64 << 20


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class ModuleTensor:
    """Where one module tensor (parameter or buffer) lives: owner module, attribute name, dtype, shape."""

    owner: nn.Module
    name: str
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def get(self) -> torch.Tensor:
        return getattr(self.owner, self.name)

    def point_at(self, tensor: torch.Tensor) -> None:
        self.get().data = tensor


def module_tensors(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> list[ModuleTensor]:
    """Every parameter and buffer of `module`, each once, skipping those inside `exclude`."""
    skipped = {id(m) for root in exclude for m in root.modules()}
    seen: set[int] = set()
    tensors = []
    for owner in module.modules():
        if id(owner) in skipped:
            continue
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                tensors.append(ModuleTensor(owner, name, tensor.dtype, tensor.shape))
    return tensors


def module_bytes(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> int:
    return sum(t.nbytes for t in module_tensors(module, exclude))


class HostArena:
    """Host memory handed out in slices of large chunks.

    torch's pinned-memory allocator rounds every request up to a power of two; a
    680 MB transformer block would take 1 GiB. Chunks of a power-of-two size, shared
    by many tensors, waste almost nothing.
    """

    def __init__(self, pin: bool, chunk_bytes: int = MIN_CHUNK_BYTES):
        self.pin = pin
        self.chunk_bytes = 1 << (max(chunk_bytes, MIN_CHUNK_BYTES) - 1).bit_length()
        self._chunks: list[list] = []  # [buffer, bytes used]

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of `nbytes`, starting at an ALIGNMENT boundary."""
        size = _round_up(max(nbytes, 1), ALIGNMENT)
        for chunk in self._chunks:
            if chunk[1] + size <= chunk[0].numel():
                start = chunk[1]
                chunk[1] += size
                return chunk[0][start : start + nbytes]
        buffer = torch.empty(max(self.chunk_bytes, size), dtype=torch.uint8, pin_memory=self.pin)
        self._chunks.append([buffer, size])
        return buffer[:nbytes]

    @property
    def reserved_bytes(self) -> int:
        return sum(chunk[0].numel() for chunk in self._chunks)


def _views(flat: torch.Tensor, tensors: Sequence[ModuleTensor], offsets: Sequence[int]) -> list[torch.Tensor]:
    return [flat[offset : offset + t.nbytes].view(t.dtype).view(t.shape) for t, offset in zip(tensors, offsets)]


class PackedBlock:
    """One block's parameters and buffers packed into one flat host buffer."""

    def __init__(self, module: nn.Module, arena: HostArena):
        self.module = module
        self.tensors = module_tensors(module)
        self.offsets = []
        total = 0
        for tensor in self.tensors:
            self.offsets.append(total)
            total = _round_up(total + tensor.nbytes, ALIGNMENT)
        self.nbytes = total
        with torch.inference_mode(False), torch.no_grad():
            self.host = arena.allocate(total)
            self.host_views = self.views(self.host)
            for tensor, view in zip(self.tensors, self.host_views):
                view.copy_(tensor.get())
        self._device_flat: torch.Tensor | None = None
        self.point_at(self.host_views)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """This block's tensors as views of `flat` (a host buffer, a device copy or a GPU slot)."""
        return _views(flat, self.tensors, self.offsets)

    def point_at(self, views: Sequence[torch.Tensor]) -> None:
        for tensor, view in zip(self.tensors, views):
            tensor.point_at(view)

    def point_at_host(self) -> None:
        self.point_at(self.host_views)

    def place(self, device: torch.device) -> None:
        """Keep a copy on `device` until `evict` (one copy of the whole block)."""
        with torch.inference_mode(False), torch.no_grad():
            self._device_flat = self.host.to(device, non_blocking=True, copy=True)
            self.point_at(self.views(self._device_flat))

    def evict(self) -> None:
        self.point_at_host()
        self._device_flat = None


class HostTensors:
    """The tensors of a module outside its packed blocks, each with its own host copy."""

    def __init__(self, module: nn.Module, arena: HostArena, exclude: Iterable[nn.Module] = ()):
        self.tensors = module_tensors(module, exclude)
        with torch.inference_mode(False), torch.no_grad():
            self.host = []
            for tensor in self.tensors:
                copy = arena.allocate(tensor.nbytes).view(tensor.dtype).view(tensor.shape)
                copy.copy_(tensor.get())
                self.host.append(copy)
        self.evict()

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    def place(self, device: torch.device) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for tensor, host in zip(self.tensors, self.host):
                tensor.point_at(host.to(device, non_blocking=True, copy=True))

    def evict(self) -> None:
        for tensor, host in zip(self.tensors, self.host):
            tensor.point_at(host)
