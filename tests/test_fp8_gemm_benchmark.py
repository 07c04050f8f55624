"""`benchmarks/fp8_gemm.py --tiny`: its shapes, layer counts and the errors it reports are the GEMMs'.

On the CPU torch._scaled_mm runs the same scalings, so the accuracy half of the benchmark is
checked here; its speed half is the GPU's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DUAL, SINGLE = 20, 40  # the full configuration's blocks, which --tiny keeps


def run_tiny(tmp_path: Path, outlier_gain: float) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / "fp8_gemm.py"), "--tiny",
               "--outlier-gain", str(outlier_gain), "--out", str(tmp_path)]
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("fp8_gemm_*.json")
    return json.loads(path.read_text())


def test_every_block_linear_is_counted_and_fp8_costs_e4m3_rounding(tmp_path):
    record = run_tiny(tmp_path, outlier_gain=1000.0)
    rows = record["rows"]
    dim = 64  # --tiny: 2 heads of 32
    assert [(r["in_features"], r["out_features"], r["layers_per_forward"]) for r in rows] == [
        (dim, dim, 4 * DUAL + 3 * SINGLE), (dim, 4 * dim, DUAL + SINGLE), (4 * dim, dim, DUAL), (5 * dim, dim, SINGLE)
    ]
    for row in rows:
        assert row["bf16"]["rel_error"] < 1e-2
        for kind in ("fp8_rowwise", "fp8_tensorwise"):  # two e4m3 operands: a few percent
            assert 0.01 < row[kind]["rel_error"] < 0.08, (row["linear"], kind, row[kind])
    for kind, total in record["forward_ms"].items():
        assert total == pytest.approx(sum(r[kind]["ms"] * r["layers_per_forward"] for r in rows))


def test_one_scale_per_tensor_loses_ordinary_tokens_to_a_large_outlier(tmp_path):
    # Outliers 1e5 times the rest: one scale per tensor leaves ordinary values in e4m3's
    # subnormals, while a scale per row keeps them at full precision.
    rows = run_tiny(tmp_path, outlier_gain=1e5)["rows"]
    for row in rows:
        assert row["fp8_rowwise"]["rel_error"] < 0.08
        assert row["fp8_tensorwise"]["rel_error"] > 5 * row["fp8_rowwise"]["rel_error"], row
