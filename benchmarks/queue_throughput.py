"""Videos per hour through the real server with 1..G GPU groups behind its one job queue.

For each group count a fresh `tritonserver` runs `InstanceOverrides(groups=N)`; one job
per group warms it up (loading, kernel compiles, allocator), then `clients` threads, each
on its own gRPC stream, send `jobs` jobs between them, one after another, so every group
always has work waiting. Wall time runs from the first send to the last final event. Once,
when the middle job starts on a group, the metrics port is read: the waiting jobs and busy
groups record that every group was kept busy. `multi_gpu.py throughput` runs it.
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client import stream
from framepack_server.instance import InstanceOverrides
from framepack_server.server import TritonServer, free_ports
from framepack_wire import WireRequest

PROMPT = "a character dances in the rain"
EFFICIENCY_TARGET = 0.95  # speed-up per group: a shared queue should lose at most 5 % to its own overhead


def default_clients(groups: int) -> int:
    """Twice the groups: every group has a job running and one waiting behind it."""
    return 2 * groups


def default_jobs(groups: int) -> int:
    """Two jobs per client, so the measured stretch is mostly steady state."""
    return 2 * default_clients(groups)


@dataclass(frozen=True)
class QueueReading:
    """The queue gauges read once mid-run."""

    waiting_jobs: float
    busy_groups: float


@dataclass(frozen=True)
class GroupRun:
    """What one group count measured."""

    groups: int
    clients: int
    jobs: int
    wall_s: float
    latencies_s: list[float]
    mid_run: QueueReading | None


def throughput_rows(runs: list[GroupRun], gpu_count: int) -> list[dict]:
    """One row per group count; speed-up is against the one-group run (None without one)."""
    vph = {run.groups: run.jobs / run.wall_s * 3600 for run in runs}
    base = vph.get(1)
    rows = []
    for run in runs:
        speedup = vph[run.groups] / base if base else None
        rows.append(dict(
            gpu_count=gpu_count, groups=run.groups, clients=run.clients, jobs=run.jobs,
            wall_s=run.wall_s, videos_per_hour=vph[run.groups],
            latency_median_s=statistics.median(run.latencies_s),
            speedup=speedup, efficiency=speedup / run.groups if speedup is not None else None,
            mid_run_waiting_jobs=run.mid_run.waiting_jobs if run.mid_run else None,
            mid_run_busy_groups=run.mid_run.busy_groups if run.mid_run else None,
            all_groups_busy=run.mid_run.busy_groups == run.groups if run.mid_run else None,
        ))
    return rows


def read_queue(metrics_url: str) -> QueueReading:
    """The framepack queue gauges (one model instance, so one sample each)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()

    def gauge(name: str) -> float:
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
        if len(values) != 1:
            raise RuntimeError(f"{metrics_url}: expected one {name} sample, found {len(values)}")
        return values[0]

    return QueueReading(gauge("framepack_queue_waiting_jobs"), gauge("framepack_busy_groups"))


def run_job(address: str, image: np.ndarray, settings: dict, seed: int,
            started: threading.Event | None = None) -> float:
    """Seconds from sending one job to its final event; sets `started` when a group takes it up."""
    start = time.perf_counter()
    for event in stream.generate(address, WireRequest(image, PROMPT, {**settings, "seed": seed})):
        if isinstance(event, stream.Plan) and started is not None:
            started.set()  # the engine's first event: the group is already counted busy
        elif isinstance(event, stream.Final):
            return time.perf_counter() - start
    raise RuntimeError(f"job {seed} ended without a final event")


def run_concurrently(address: str, image: np.ndarray, settings: dict, jobs: int, clients: int,
                     middle_started: threading.Event | None = None) -> tuple[float, list[float]]:
    """`jobs` jobs from `clients` threads, each sending its next job when its last one ends;
    returns the wall time from the first send to the last final and each job's latency.
    `middle_started` is set when job number jobs // 2 (in sending order) starts on a group."""
    lock = threading.Lock()
    next_seed = iter(range(jobs))
    latencies: list[float] = []
    errors: list[Exception] = []

    def client() -> None:
        while True:
            with lock:
                seed = next(next_seed, None)
            if seed is None or errors:
                return
            try:
                latency = run_job(address, image, settings, seed, middle_started if seed == jobs // 2 else None)
            except Exception as error:  # re-raised below, after every thread has ended
                errors.append(error)
                return
            with lock:
                latencies.append(latency)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} job(s) failed; the first: {errors[0]!r}")
    return wall_s, latencies


def measure_groups(model_dir: Path, groups: int, clients: int, jobs: int, settings: dict, image: np.ndarray,
                   device: str, log_dir: Path, startup_timeout_s: float) -> GroupRun:
    """Start a server with `groups` groups, warm every group up, then time `jobs` jobs."""
    grpc_port, http_port, metrics_port = free_ports(3)
    log_path = log_dir / f"multi_gpu_throughput_{time.strftime('%Y%m%d-%H%M%S')}_groups{groups}.tritonserver.log"
    # Room for every client's job: a refused job (UNAVAILABLE) would end the run.
    overrides = InstanceOverrides(groups=groups, max_queued_jobs=clients, max_job_seconds=0)
    # A server that dies ends the measurement (its jobs fail) rather than being restarted.
    with TritonServer(model_dir, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                      device=device, log_path=log_path, startup_timeout_s=startup_timeout_s,
                      overrides=overrides, restart_on_failure=False) as server:
        try:
            measured = _warm_up_and_measure(server, groups, clients, jobs, settings, image)
        except RuntimeError as error:
            raise RuntimeError(f"{groups} group(s): {error}; the server's log: {log_path}") from error
    return GroupRun(groups, clients, jobs, *measured)


def _warm_up_and_measure(server: TritonServer, groups: int, clients: int, jobs: int, settings: dict,
                         image: np.ndarray) -> tuple[float, list[float], QueueReading | None]:
    # Sent together, the warm-up jobs start one on each free group.
    run_concurrently(server.grpc_address, image, settings, jobs=groups, clients=groups)
    # Read on a thread of its own, so no client waits for the metrics port. Not read right
    # after a final: the freed group frees memory before it takes the next job.
    middle_started = threading.Event()
    readings: list[QueueReading] = []

    def read_mid_run() -> None:
        if middle_started.wait():
            readings.append(read_queue(server.metrics_url))

    reader = threading.Thread(target=read_mid_run, daemon=True)
    reader.start()
    wall_s, latencies = run_concurrently(server.grpc_address, image, settings, jobs, clients, middle_started)
    reader.join(timeout=30)
    return wall_s, latencies, readings[0] if readings else None
