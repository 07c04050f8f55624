"""The transformer blocks replayed from CUDA graphs: one capture per input shape, then no launches.

A forward launches thousands of kernels (GPU.md: 4,837 in diffusers' forward; the fused
blocks fewer); replaying a captured graph submits them at once, so the GPU never waits
on Python between them. Within a job the shapes are fixed (one section's token layout,
one text length per CFG branch), so a job captures one graph per branch and replays it
for every step and section; the graphs are kept in a small pool, least recently used
dropped first, since each holds its own memory for the blocks' activations.

What is captured is the 60 blocks only (`FramePackTransformer.blocks_forward`): the
embeddings, the step cache's decision and the output projection stay eager, so a skipped
step (TeaCache, MagCache) replays nothing, and MagCache's schedule needs no sync at all.
Inputs are copied into the graph's own buffers before each replay; the result is copied
out, so it stays valid after the next replay.

An option, off by default (`EngineOptions.cuda_graphs`), for CUDA: capturing costs about
two forwards and the pool's memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

DEFAULT_MAX_GRAPHS = 2  # the conditional and the unconditional branch of real CFG
WARMUP_RUNS = 1  # compiles the Triton kernels and lets cuBLAS/cuDNN pick their algorithms first


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


def _signature(tensors: tuple[torch.Tensor | None, ...], attend: Any) -> tuple:
    shapes = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors)
    return shapes, attend.name, id(attend.group)


class BlockGraphs:
    """Replays `blocks(*tensors, attend)` from CUDA graphs keyed by the tensors' shapes and `attend`."""

    def __init__(self, blocks: Callable[..., torch.Tensor], max_graphs: int = DEFAULT_MAX_GRAPHS):
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs} is not allowed: at least 1")
        self.blocks = blocks
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.capture_s: list[float] = []  # wall time of each capture, warm-up included

    def __call__(self, *tensors: torch.Tensor | None, attend: Any) -> torch.Tensor:
        key = _signature(tensors, attend)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(tensors, attend)
            self.graphs[key] = captured
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            for static, given in zip(captured.inputs, tensors):
                if static is not None:
                    static.copy_(given)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, tensors: tuple[torch.Tensor | None, ...], attend: Any) -> _Captured:
        start = time.perf_counter()
        inputs = tuple(None if t is None else t.clone() for t in tensors)
        # Warm up on a side stream, as CUDA graph capture asks, so lazy initialisation
        # (Triton compiles, cuBLAS workspaces) happens outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.blocks(*inputs, attend=attend)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.blocks(*inputs, attend=attend)
        torch.cuda.synchronize()
        self.capture_s.append(time.perf_counter() - start)
        return _Captured(graph, inputs, output)

    def clear(self) -> None:
        self.graphs.clear()
