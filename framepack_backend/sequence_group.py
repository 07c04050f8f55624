"""The processes of a sequence-parallel group: rank 0 (the pipeline's process) and its workers.

Rank 0 is the process that runs the pipeline: it encodes, samples, decides and decodes.
Ranks 1..P-1 are worker processes that hold only the transformer and run their shard of
the block stack when rank 0 says so. They are started, watched and restarted here:

- `SequenceParallelGroup.start` spawns the workers (`python -m framepack_backend.sequence_group`),
  each on its own device, and meets them at a TCP rendezvous on 127.0.0.1
  (torch.distributed: NCCL on GPUs, gloo on CPUs).
- Before a forward runs its blocks, rank 0 writes one line to each worker's stdin, then
  broadcasts a header and the block stack's inputs (latents, context, conditioning
  vector, RoPE tables, backend); every rank then runs its shard (sequence_parallel.py)
  and rank 0 keeps the gathered output. Idle workers wait on their stdin, not in a
  collective, so a collective's timeout bounds only a running forward, never the time
  between jobs; and a worker whose rank 0 is gone reads end-of-file and exits.
- Every decision that must agree across ranks is rank 0's alone, so none can disagree:
  a TeaCache skip, a cancel and a deadline all mean rank 0 simply sends nothing, and the
  workers wait on their stdin. Events, the encoders and the VAE decode never leave
  rank 0.
- A worker that dies makes rank 0's next collective fail; the job fails with one line
  naming the worker and its exit code (`SequenceParallelError`), and `ensure_ready`
  restarts the whole group before the next job.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .attention import BACKEND_NAMES, Attend
from .sequence_parallel import SequenceParallelBlocks, apply_sequence_parallel

RENDEZVOUS_HOST = "127.0.0.1"
# A collective of a running forward that waits this long has lost a peer that did not
# close its sockets (NCCL); a forward of the 13B model takes seconds.
COLLECTIVE_TIMEOUT_S = 300.0
STARTUP_TIMEOUT_S = 600.0

RUN = 1
GO = b"run\n"  # rank 0 -> a worker's stdin: a header follows on the group
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# command, batch, latent tokens, width, context tokens, temb width, head dim, backend, dtype
HEADER_FIELDS = 9


class SequenceParallelError(RuntimeError):
    """The group lost a rank during a job; the next job restarts it."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its copy of the transformer, as rank 0 applied it."""

    transformer_dir: str
    dtype: str  # a torch dtype name: "float32", "bfloat16"
    device: str  # rank 0's device; rank r takes the r-th device after it
    fused_kernels: bool
    fp8: bool
    fp32_output: bool


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the CPU, or the r-th visible GPU counting on from rank 0's."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    return torch.device("cuda", ((device.index or 0) + rank) % count)


def communication_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((RENDEZVOUS_HOST, 0))
        return s.getsockname()[1]


def _python() -> str:
    # Inside Triton's backend stub sys.executable is not the environment's Python; the
    # launcher names it (FRAMEPACK_PYTHON).
    return os.environ.get("FRAMEPACK_PYTHON") or sys.executable


def _worker_environment() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(Path(__file__).resolve().parents[1]), *sys.path, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def broadcast_blocks_input(latents, context, temb, rope, attend: Attend) -> None:
    """Rank 0, once the workers were woken: the block stack's inputs, header first."""
    header = torch.tensor(
        [RUN, latents.shape[0], latents.shape[1], latents.shape[2], context.shape[1], temb.shape[-1],
         rope.cos.shape[-1], BACKEND_NAMES.index(attend.name), DTYPES.index(latents.dtype)],
        dtype=torch.int64, device=latents.device,
    )
    dist.broadcast(header, 0)
    for tensor in (latents, context, temb, torch.view_as_real(rope.rotation), rope.cos, rope.sin):
        dist.broadcast(tensor.contiguous(), 0)


def serve_blocks(transformer, device: torch.device, wake=None) -> None:
    """A worker's loop: for every line on stdin (`wake`), receive the block stack's inputs
    from rank 0 and run this rank's shard; return at end-of-file (rank 0 stopped or died)."""
    from .models.transformer import Rope

    wake = wake if wake is not None else sys.stdin.buffer
    runner = transformer.block_runner
    while wake.readline() == GO:
        header = torch.zeros(HEADER_FIELDS, dtype=torch.int64, device=device)
        dist.broadcast(header, 0)
        _, batch, tokens, width, context_tokens, temb_width, head_dim, backend, dtype = header.tolist()
        model_dtype = DTYPES[dtype]
        latents = torch.empty(batch, tokens, width, dtype=model_dtype, device=device)
        context = torch.empty(batch, context_tokens, width, dtype=model_dtype, device=device)
        temb = torch.empty(batch, temb_width, dtype=model_dtype, device=device)
        rotation = torch.empty(tokens, 1, head_dim // 2, 2, dtype=torch.float32, device=device)
        cos = torch.empty(tokens, head_dim, dtype=torch.float32, device=device)
        sin = torch.empty_like(cos)
        for tensor in (latents, context, temb, rotation, cos, sin):
            dist.broadcast(tensor, 0)
        rope = Rope(torch.view_as_complex(rotation), cos, sin)
        runner(latents, context, temb, rope, None, Attend.named(BACKEND_NAMES[backend]))


class SequenceParallelGroup:
    """Rank 0's view of the group: its workers' processes and the torch.distributed group.

    `attach(transformer)` makes rank 0's transformer run its blocks over the group;
    `ensure_ready()` before each job restarts a group that lost a worker; `close()` stops it.
    """

    def __init__(self, spec: WorkerSpec, ranks: int):
        self.spec = spec
        self.ranks = ranks
        self.device = torch.device(spec.device)
        self.workers: list[subprocess.Popen] = []
        self.broken = False
        self.starts = 0
        self._runner: SequenceParallelBlocks | None = None

    @classmethod
    def start(cls, spec: WorkerSpec, ranks: int) -> SequenceParallelGroup:
        group = cls(spec, ranks)
        group._start()
        return group

    def _start(self) -> None:
        port = _free_port()
        command = [_python(), "-m", "framepack_backend.sequence_group", "--spec", json.dumps(asdict(self.spec)),
                   "--ranks", str(self.ranks), "--port", str(port)]
        self.workers = [
            subprocess.Popen([*command, "--rank", str(rank)], env=_worker_environment(), stdin=subprocess.PIPE)
            for rank in range(1, self.ranks)
        ]
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(
                communication_backend(self.device), init_method=f"tcp://{RENDEZVOUS_HOST}:{port}", rank=0,
                world_size=self.ranks, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            )
            # The first collective completes only once every worker has loaded its weights.
            ready = torch.zeros(1, device=self.device)
            dist.all_reduce(ready)
        except Exception as e:
            self._stop_workers()
            raise SequenceParallelError(f"the sequence-parallel group did not start: {self._dead_workers() or e}") \
                from e
        self.broken = False
        self.starts += 1

    def attach(self, transformer) -> None:
        """Run `transformer`'s block stack over this group, rank 0 sending each forward's inputs."""
        self._runner = apply_sequence_parallel(transformer, None, self.ranks)
        self._runner.before_run = self._send_inputs
        transformer.block_runner = self

    def _send_inputs(self, latents, context, temb, rope, attend: Attend) -> None:
        for worker in self.workers:
            assert worker.stdin is not None
            worker.stdin.write(GO)
            worker.stdin.flush()
        broadcast_blocks_input(latents, context, temb, rope, attend)

    def __call__(self, latents, context, temb, rope, key_mask, attend):
        """The transformer's block runner on rank 0: the split plan, with a lost worker as one clear error."""
        if self._runner is None:
            raise RuntimeError("attach(transformer) first")
        if self.broken:
            raise SequenceParallelError("the sequence-parallel group lost a worker; it restarts for the next job")
        try:
            return self._runner(latents, context, temb, rope, key_mask, attend)
        except ValueError:
            raise
        except Exception as e:
            self.broken = True
            raise SequenceParallelError(
                f"{self._dead_workers(wait_s=5.0) or f'a collective failed ({e})'}; the job is stopped and the "
                "group restarts for the next job"
            ) from e

    def ensure_ready(self) -> None:
        """Restart the group if it lost a worker since it started (before a job)."""
        if self.broken or any(worker.poll() is not None for worker in self.workers):
            self.close()
            self._start()

    def close(self) -> None:
        """Stop the workers (end-of-file on their stdin) and leave the process group."""
        for worker in self.workers:
            try:
                if worker.stdin is not None:
                    worker.stdin.close()
            except OSError:  # a dead worker's pipe
                pass
        self._stop_workers()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _stop_workers(self, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        for worker in self.workers:
            try:
                worker.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def _dead_workers(self, wait_s: float = 0.0) -> str:
        """'sequence-parallel worker rank 1 (pid 123) exited with code -9', or '' when all live."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(rank, w) for rank, w in enumerate(self.workers, start=1) if w.poll() is not None]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return ", ".join(f"sequence-parallel worker rank {rank} (pid {w.pid}) exited with code {w.returncode}"
                         for rank, w in dead)


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one worker rank of a sequence-parallel group")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    spec = WorkerSpec(**json.loads(args.spec))
    device = rank_device(torch.device(spec.device), args.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    transformer = load_worker_transformer(spec, device)
    dist.init_process_group(
        communication_backend(device), init_method=f"tcp://{RENDEZVOUS_HOST}:{args.port}", rank=args.rank,
        world_size=args.ranks, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    apply_sequence_parallel(transformer, None, args.ranks)
    dist.all_reduce(torch.zeros(1, device=device))  # ready
    with torch.inference_mode():
        serve_blocks(transformer, device)
    dist.destroy_process_group()
    return 0


def load_worker_transformer(spec: WorkerSpec, device: torch.device) -> Any:
    """The transformer as rank 0 configured it, resident on this worker's device."""
    from .models.transformer import FramePackTransformer

    transformer = FramePackTransformer.from_pretrained(spec.transformer_dir, dtype=getattr(torch, spec.dtype))
    transformer.set_fp32_output(spec.fp32_output)
    if spec.fp8:
        transformer.quantize_fp8()
    if spec.fused_kernels:
        transformer.set_fused_kernels(True)
    return transformer.to(device)


if __name__ == "__main__":
    sys.exit(_worker_main())
