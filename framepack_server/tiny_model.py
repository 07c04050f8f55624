"""The tiny random-weight model that `make demo` and a bare `framepack-server` serve."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .triton_install import cache_dir


def ensure_tiny_bundle(folder: Path | None = None) -> Path:
    """The tiny random model under the cache, written on first use (atomically)."""
    folder = folder or cache_dir() / "tiny"
    if folder.is_dir():
        return folder
    from framepack_backend.testing.tiny_bundle import write_tiny_bundle

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        write_tiny_bundle(partial)
        os.rename(partial, folder)
    except OSError:
        if not folder.is_dir():  # not merely another launcher finishing first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
