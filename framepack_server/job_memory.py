"""Memory a model instance holds between jobs, and giving back what a job left behind.

After every job (done, failed or cancelled) the worker collects garbage and hands the
CUDA caching allocator's free blocks back to the driver, then logs a `MemoryReport`:

- `tensor_bytes`: the distinct storages of all torch tensors alive in Python, on any
  device — weights plus whatever a job leaked. It is exact and deterministic, which
  makes it the measure to compare against a baseline (on a GPU it is what
  `memory_allocated` counts, and more: CPU copies too). None where it was not counted:
  the census walks every object (`gc.get_objects()`), which is safe only while no other
  thread runs Python code (below);
- `rss_bytes`: the process's resident memory as the OS sees it. The C allocator keeps
  freed pages for reuse, so after the clean-up glibc is asked to return them
  (`malloc_trim`); what remains above the baseline is noise of a few tens of MiB;
- `cuda_allocated_bytes`, `cuda_reserved_bytes`: torch's CUDA allocator (0 on the CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from dataclasses import dataclass

import torch

MIB = 2**20


@dataclass(frozen=True)
class MemoryReport:
    tensor_bytes: int | None  # None: not counted (see memory_report)
    tensors: int | None
    rss_bytes: int
    cuda_allocated_bytes: int
    cuda_reserved_bytes: int

    def log_text(self) -> str:
        """One line of the server log (the reliability tests read it back)."""
        tensors = ("tensors not counted while other jobs run" if self.tensor_bytes is None
                   else f"tensors {self.tensor_bytes} bytes in {self.tensors} tensors")
        return (
            f"memory after the job: {tensors}, "
            f"RSS {self.rss_bytes / MIB:.1f} MiB, CUDA allocated {self.cuda_allocated_bytes / MIB:.1f} MiB, "
            f"reserved {self.cuda_reserved_bytes / MIB:.1f} MiB"
        )


def free_memory() -> None:
    """Collect garbage, return the CUDA caching allocator's free blocks and the C heap's free pages."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _trim_c_heap()


def memory_report(count_tensors: bool = True) -> MemoryReport:
    """What the process holds now.

    `count_tensors` only where no other thread is running a job: gc.get_objects() hands
    out every tracked object, among them a tuple another thread is still filling from a
    generator, and that thread's tuple() then fails with "SystemError: …tupleobject.c…:
    bad argument to internal function" (jobs.py decides).
    """
    tensor_bytes, tensors = live_tensor_bytes() if count_tensors else (None, None)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return MemoryReport(
        tensor_bytes=tensor_bytes,
        tensors=tensors,
        rss_bytes=resident_bytes(),
        cuda_allocated_bytes=torch.cuda.memory_allocated() if cuda else 0,
        cuda_reserved_bytes=torch.cuda.memory_reserved() if cuda else 0,
    )


def live_tensor_bytes() -> tuple[int, int]:
    """Bytes of the distinct storages behind live tensors (views counted once), and the tensor count."""
    storages: dict[tuple[str, int], int] = {}
    count = 0
    for obj in gc.get_objects():
        # type(), not isinstance(): some objects answer isinstance through properties with side effects.
        if not issubclass(type(obj), torch.Tensor):
            continue
        count += 1
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta, sparse or wrapper tensors own no plain storage
            continue
        if storage.data_ptr():
            storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()), count


def _trim_c_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc only; elsewhere a no-op)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
    if trim is not None:
        trim(0)


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
