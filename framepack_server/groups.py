"""GPU groups: the devices each worker of the server's one job queue runs its pipeline on.

A group runs one job at a time: one GPU, or `gpus_per_group` consecutive GPUs once a job
can spread over several (sequence parallel), or the CPU on a machine without a GPU. The
server's one model instance loads a pipeline per group and the job queue (jobs.py) gives
every group the next waiting job.

    plan_groups("auto", None, visible_gpus=8)                    # 8 groups, cuda:0 … cuda:7
    plan_groups("auto", None, visible_gpus=8, gpus_per_group=4)  # 2 groups of 4
    plan_groups("cpu", 2, visible_gpus=0)                        # 2 CPU groups (tests)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .instance import InstanceConfigError


@dataclass(frozen=True)
class GpuGroup:
    index: int
    devices: tuple[str, ...]  # ("cuda:0",), ("cuda:4", …, "cuda:7") or ("cpu",)

    @property
    def device(self) -> str:
        """Where the group's pipeline lives (its first GPU)."""
        return self.devices[0]

    def describe(self) -> str:
        return f"group {self.index} on {', '.join(self.devices)}"


def plan_groups(device: str, groups: int | None, visible_gpus: int, gpus_per_group: int = 1) -> list[GpuGroup]:
    """The groups one server runs: `device` is 'auto', 'cpu' or 'cuda:N' (instance.check_device);
    `groups` None means as many as the GPUs allow (one on the CPU). Raises InstanceConfigError
    naming the parameter when the machine cannot hold them."""
    if gpus_per_group < 1:
        raise ValueError(f"gpus_per_group must be at least 1, got {gpus_per_group}")
    if device == "cpu" or (device == "auto" and visible_gpus == 0):
        # CPU groups share the machine's cores; more than one is for tests and small models.
        return [GpuGroup(index, ("cpu",)) for index in range(groups or 1)]
    if device.startswith("cuda:"):
        first, available = int(device[5:]), gpus_per_group  # one group, starting at cuda:N
    else:
        first, available = 0, visible_gpus
    most = available // gpus_per_group
    count = most if groups is None else groups
    if count < 1 or count > most:
        raise InstanceConfigError(
            f"groups={groups if groups is not None else 'auto'!r} is not allowed: {available} GPU(s) from "
            f"cuda:{first} hold at most {most} group(s) of {gpus_per_group} GPU(s)"
        )
    return [
        GpuGroup(index, tuple(f"cuda:{first + index * gpus_per_group + k}" for k in range(gpus_per_group)))
        for index in range(count)
    ]


class OnGroupDevice:
    """A group's pipeline, run with the group's GPU as its worker thread's current CUDA device.

    Triton-language kernels launch on the current device, which is per thread and cuda:0
    unless set; a group on cuda:3 must not launch there. Each worker thread runs one group
    only, so the device is set for good (the worker's memory report after a job then
    reads that GPU too).
    """

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @property
    def out_of_service(self) -> str | None:
        return self.pipeline.out_of_service

    def generate(self, request, cancel=None):
        if self.pipeline.device.type == "cuda":
            torch.cuda.set_device(self.pipeline.device)
        yield from self.pipeline.generate(request, cancel)
