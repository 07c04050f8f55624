"""GPU memory modes: resident, offload and block streaming, chosen to fit the card (see modes.py)."""

from ..components import PHASE_COMPONENTS as PHASES
from .accounting import peak_memory, reset_peak_memory
from .footprint import MemoryFootprint, job_footprint, streamable_blocks
from .host import HostArena, PackedBlock
from .manager import MemoryManager, available_gpu_bytes, available_host_bytes, available_memory_bytes
from .modes import DecodePlan, StreamPlan, choose_memory_mode, memory_needed, plan_decode, plan_stream
from .ring import Acquire, Prefetch, Release, Restart, RingSchedule
from .streaming import BlockStreamer
from .weights import ComponentWeights

__all__ = [
    "Acquire",
    "BlockStreamer",
    "ComponentWeights",
    "DecodePlan",
    "HostArena",
    "MemoryFootprint",
    "MemoryManager",
    "PHASES",
    "PackedBlock",
    "Prefetch",
    "Release",
    "Restart",
    "RingSchedule",
    "StreamPlan",
    "available_gpu_bytes",
    "available_host_bytes",
    "available_memory_bytes",
    "choose_memory_mode",
    "job_footprint",
    "memory_needed",
    "peak_memory",
    "plan_decode",
    "plan_stream",
    "reset_peak_memory",
    "streamable_blocks",
]
