"""Shared fixtures: one tiny random model and one real Triton server per test session;
the hook that skips `gpu` tests on a machine without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from framepack_backend.testing.tiny_bundle import write_tiny_bundle
from framepack_server.server import TritonServer, free_ports

# Small enough for the CPU: a 2-second video at the 128 bucket with 4 steps per section
# takes a few seconds with the tiny model.
FAST_SETTINGS = {"resolution": 128, "steps": 4}


def pytest_collection_modifyitems(config, items) -> None:
    """The `gpu` marker both selects and skips: without CUDA, every test marked `gpu` is skipped."""
    import torch

    if torch.cuda.is_available():
        return
    needs_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_gpu)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny random-weight model directory (public layout), written once per session."""
    return write_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    """A 128×96 RGB gradient: 4:3, so it lands in the 144×112 bucket at resolution 128."""
    y, x = np.mgrid[0:96, 0:128]
    return np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.fixture(scope="session")
def triton_server(tiny_bundle, tmp_path_factory) -> TritonServer:
    """The embedded tritonserver with our model repository and the tiny model, on free ports."""
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    grpc, http, metrics = free_ports(3)
    server = TritonServer(
        tiny_bundle,
        grpc_port=grpc,
        http_port=http,
        metrics_port=metrics,
        device="cpu",
        log_path=log,
        startup_timeout_s=300,
    )
    with server:
        yield server
