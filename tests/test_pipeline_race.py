"""`benchmarks/pipeline_race.py --tiny`: both pipelines on the same weights make the same video length.

The weight mapping itself (diffusers' transformer and ours agree to 1e-4 in fp32) is
test_transformer_parity's; here the race's own sharing of one state dict is checked by the
forward error it records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from framepack_backend import planner
from framepack_backend.buckets import bucket_for
from framepack_backend.settings import SamplingSettings
from framepack_server.demo import SAMPLE_IMAGE

pytestmark = pytest.mark.slow  # two tiny pipelines, three pairings and a warm-up: about a minute on a CPU

ROOT = Path(__file__).resolve().parents[1]
SECONDS, STEPS, RESOLUTION = 2, 3, 128
PAIRINGS = ("off", "teacache", "magcache")


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("race")
    command = [sys.executable, str(ROOT / "benchmarks" / "pipeline_race.py"), "--tiny", "--runs", ",".join(PAIRINGS),
               "--seconds", str(SECONDS), "--steps", str(STEPS), "--resolution", str(RESOLUTION),
               "--warmup-steps", "1", "--fast-vae-decode", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("pipeline_race_*.json")
    return json.loads(path.read_text())


def test_both_sides_make_the_planned_frames_at_the_bucket_size(record):
    from PIL import Image

    sections = planner.section_count(SECONDS, SamplingSettings().window)
    frames = planner.video_frame_count(sections, SamplingSettings().window)
    height, width = bucket_for(*reversed(Image.open(SAMPLE_IMAGE).size), resolution=RESOLUTION)
    assert (sections, frames) == (2, 73)
    assert record["sections"] == sections
    assert record["diffusers_num_frames"] == 2 * 33
    assert [(run["side"], run["pairing"]) for run in record["runs"]] == [
        (side, pairing) for pairing in PAIRINGS for side in ("ours", "diffusers")
    ]
    for run in record["runs"]:
        assert (run["frames"], run["width"], run["height"]) == (frames, width, height), run
        assert run["computed_forwards"] + run["skipped_forwards"] == sections * STEPS, run
        assert run["s_per_frame"] == pytest.approx(run["total_s"] / frames)


def test_no_cache_computes_every_forward_and_the_magcaches_skip(record):
    runs = {(run["side"], run["pairing"]): run for run in record["runs"]}
    assert runs["ours", "off"]["skipped_forwards"] == runs["diffusers", "off"]["skipped_forwards"] == 0
    # 3 steps, retention 0.2: step 0 is kept, the table lets both skip one step per section.
    assert runs["ours", "magcache"]["skipped_forwards"] == 2
    assert runs["diffusers", "magcache"]["skipped_forwards"] == 2
    assert runs["diffusers", "teacache"]["cache"].startswith("First Block Cache")


def test_pairs_give_the_ratio_of_seconds_per_frame(record):
    runs = {(run["side"], run["pairing"]): run for run in record["runs"]}
    assert [pair["pairing"] for pair in record["pairs"]] == list(PAIRINGS)
    for pair in record["pairs"]:
        ours, theirs = runs["ours", pair["pairing"]], runs["diffusers", pair["pairing"]]
        assert pair["ours_s_per_frame"] == ours["s_per_frame"]
        assert pair["diffusers_s_per_frame"] == theirs["s_per_frame"]
        assert pair["ratio"] == pytest.approx(theirs["s_per_frame"] / ours["s_per_frame"])
        assert pair["same_frames"] is True


def test_record_says_what_ran(record):
    assert record["benchmark"] == "pipeline_race"
    assert (record["config"], record["dtype"], record["gpu"]) == ("tiny", "float32", "cpu")
    assert (record["steps"], record["distilled_guidance"], record["cfg"]) == (STEPS, 10.0, 1.0)
    assert record["versions"]["diffusers"]
    assert set(record["pairing_notes"]) >= set(PAIRINGS)
    assert "First Block Cache" in record["pairing_notes"]["teacache"]
    # One state dict, two models: the forwards agree to fp32 rounding.
    assert record["forward_rel_error"] < 1e-4
    # Ours with the VAE decode speed-up asked for (on the CPU it is off by default).
    assert record["engine_options"]["fast_vae_decode"] is True


@pytest.mark.server
def test_the_server_benchmark_counts_seconds_per_frame_as_the_race(tmp_path):
    """benchmarks/server_generation.py --tiny: the same step-cache runs, s/frame up to the frames in hand."""
    command = [sys.executable, str(ROOT / "benchmarks" / "server_generation.py"), "--tiny", "--runs", "off,magcache",
               "--seconds", "1", "--steps", str(STEPS), "--resolution", str(RESOLUTION), "--fused-qkv",
               "--out", str(tmp_path)]
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("server_generation_*.json")
    record = json.loads(path.read_text())
    assert (record["tiny"], record["fused_qkv"], record["cuda_graphs"], record["steps"]) == (True, True, False, STEPS)
    off, magcache = record["runs"]
    assert (off["cache"], magcache["cache"]) == ("off", "magcache")
    for run in record["runs"]:
        assert run["frames"] == run["frames_received"] == planner.video_frame_count(1, SamplingSettings().window)
        assert run["s_per_frame"] == pytest.approx(run["received_s"] / run["frames"])
        assert run["server_timings"]["computed_steps"] == run["computed_forwards"]
    # One section of 3 steps: no cache computes all three, MagCache skips step 1 (as in the race).
    assert (off["computed_forwards"], off["skipped_forwards"]) == (STEPS, 0)
    assert (magcache["computed_forwards"], magcache["skipped_forwards"]) == (STEPS - 1, 1)
