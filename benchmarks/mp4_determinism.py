"""Whether the same frames give the same MP4, and what determinism costs: size and PSNR.

Encodes one synthetic 73-frame 288×224 clip (moving gradients with noise) five times with
`client.video.write_mp4`, deterministic and not, at a few crf values; prints and saves the
number of distinct files, the size and the PSNR of the decoded frames against the input.

    python benchmarks/mp4_determinism.py [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from results_file import save_result  # benchmarks/ is on sys.path when one of its scripts runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.video import write_mp4  # noqa: E402


def clip(frames: int = 73, height: int = 224, width: int = 288) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    video = np.stack([np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + t) % 256], -1)
                      for t in range(frames)]).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 12, video.shape)
    return np.clip(video + noise, 0, 255).astype(np.uint8)


def psnr(path: Path, frames: np.ndarray) -> float:
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)
    return float(10 * np.log10(255**2 / ((decoded - frames) ** 2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    frames = clip()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for deterministic, crf in ((False, 16), (True, 16), (True, 17), (True, 18)):
            digests, seconds = set(), []
            for run in range(args.runs):
                path = Path(folder) / f"clip-{run}.mp4"
                start = time.perf_counter()
                write_mp4(path, frames, 30, crf, deterministic=deterministic)
                seconds.append(time.perf_counter() - start)
                digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
            row = dict(deterministic=deterministic, crf=crf, distinct_files=len(digests),
                       bytes=path.stat().st_size, psnr_db=psnr(path, frames), encode_s=float(np.median(seconds)))
            rows.append(row)
            print(f"deterministic={deterministic!s:5s} crf={crf}: {len(digests)} distinct of {args.runs}, "
                  f"{row['bytes']} bytes, PSNR {row['psnr_db']:.2f} dB, {row['encode_s']:.2f} s", flush=True)
    save_result(args.out, "mp4_determinism", "mp4_determinism", versions=dict(av=av.__version__), runs=args.runs,
                rows=rows)


if __name__ == "__main__":
    main()
