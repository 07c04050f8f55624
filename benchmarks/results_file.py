"""The JSON file every GPU benchmark leaves under benchmarks/results/.

Each records what ran (`benchmark`, `command`), where (`gpu`) and with which
`versions`, beside the script's own numbers, in `<stem>_<timestamp>.json`.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def save_result(out_dir: str | Path, stem: str, benchmark: str, versions: dict | None = None, **numbers) -> Path:
    """Write the record and say where; `versions` adds to torch, cuDNN and Python's."""
    record = dict(
        benchmark=benchmark,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        command=" ".join(sys.argv),
        versions=dict(torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                      python=platform.python_version(), **(versions or {})),
        **numbers,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"saved {path}")
    return path
