"""The arithmetic of `benchmarks/multi_gpu.py throughput`: videos per hour, speed-up, efficiency."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_benchmark_module(name: str):
    # By its path, so that benchmarks/ stays off sys.path and its script names off the module namespace.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


_throughput = _load_benchmark_module("queue_throughput")
GroupRun, QueueReading = _throughput.GroupRun, _throughput.QueueReading
default_clients, default_jobs, throughput_rows = (_throughput.default_clients, _throughput.default_jobs,
                                                  _throughput.throughput_rows)


def test_rows_give_videos_per_hour_speedup_and_efficiency_against_one_group():
    runs = [
        GroupRun(groups=1, clients=2, jobs=4, wall_s=100.0, latencies_s=[50.0, 40.0, 60.0, 55.0],
                 mid_run=QueueReading(waiting_jobs=1, busy_groups=1)),
        GroupRun(groups=2, clients=4, jobs=8, wall_s=105.0, latencies_s=[10.0, 30.0, 20.0],
                 mid_run=QueueReading(waiting_jobs=2, busy_groups=1)),
    ]
    one, two = throughput_rows(runs, gpu_count=2)
    assert one["videos_per_hour"] == pytest.approx(144.0)
    assert (one["speedup"], one["efficiency"], one["latency_median_s"]) == (1.0, 1.0, 52.5)
    assert two["videos_per_hour"] == pytest.approx(8 / 105 * 3600)
    assert two["speedup"] == pytest.approx(2 * 100 / 105)
    assert two["efficiency"] == pytest.approx(100 / 105)
    assert two["latency_median_s"] == 20.0
    assert (one["all_groups_busy"], two["all_groups_busy"]) == (True, False)
    assert (two["gpu_count"], two["groups"], two["clients"], two["jobs"]) == (2, 2, 4, 8)
    assert (two["mid_run_waiting_jobs"], two["mid_run_busy_groups"]) == (2, 1)


def test_without_a_one_group_run_there_is_no_speedup():
    (row,) = throughput_rows([GroupRun(2, 4, 8, 60.0, [15.0], None)], gpu_count=8)
    assert row["videos_per_hour"] == pytest.approx(480.0)
    assert row["speedup"] is None and row["efficiency"] is None and row["all_groups_busy"] is None


def test_defaults_are_two_clients_and_four_jobs_per_group():
    assert [(default_clients(g), default_jobs(g)) for g in (1, 2, 8)] == [(2, 4), (4, 8), (16, 32)]
