"""The server's LoRA folder: which names a request may use, what `describe` lists, and a
host-memory cache of parsed files.

Only regular `.safetensors` files directly in the folder count (no sub-folders, no links
out of it), so a name is all a client can send. The folder is read when asked, so a file
copied in while the server runs is usable by the next request.

Parsed files stay in host memory for the next job that asks for them, up to `cache_bytes`
(least recently used out); a file is read again when its size or modification time
changed. A file larger than the whole cache is used for its job and not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

from .choices import LORA_SUFFIX
from .formats import LoraFile, LoraFileError, peek, read_lora

DEFAULT_CACHE_BYTES = 4 * 2**30  # rank-32 on every block linear of the 13B model is about 0.7 GB in fp32


class LoraFolder:
    def __init__(self, path: str | Path, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise ValueError(f"lora_dir={str(path)!r} is not a directory")
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[tuple[int, int], LoraFile]] = OrderedDict()
        self._lock = threading.Lock()  # requests are checked on Triton's thread, jobs run on the worker's

    def file(self, name: str) -> Path | None:
        """The file of a name, None when the folder has no such LoRA."""
        candidate = self.path / f"{name}{LORA_SUFFIX}"
        if candidate.parent != self.path or candidate.is_symlink() or not candidate.is_file():
            return None
        return candidate

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.file(name) is not None

    def names(self) -> list[str]:
        return sorted(p.name[: -len(LORA_SUFFIX)] for p in self.path.glob(f"*{LORA_SUFFIX}")
                      if p.name[: -len(LORA_SUFFIX)] in self)

    def describe(self) -> list[dict[str, object]]:
        """name, size_bytes, rank and format of every LoRA (format "unreadable" with the reason
        for a file that cannot be parsed, so the listing never fails on one bad file)."""
        listing = []
        for name in self.names():
            path = self.path / f"{name}{LORA_SUFFIX}"
            entry: dict[str, object] = {"name": name, "size_bytes": path.stat().st_size}
            try:
                entry["format"], entry["rank"] = peek(path)
            except Exception as e:  # a malformed header: listed as such, refused when asked for
                entry["format"], entry["rank"], entry["error"] = "unreadable", 0, str(e)
            listing.append(entry)
        return listing

    def load(self, name: str, targets: Mapping[str, tuple[int, int]]) -> LoraFile:
        """The parsed file, from the cache when unchanged; LoraFileError for a file this model cannot use."""
        path = self.file(name)
        if path is None:
            raise LoraFileError(f"{name}{LORA_SUFFIX}", None, "is not in the LoRA folder (any more)")
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == stamp:
                self._cache.move_to_end(name)
                return cached[1]
        lora = read_lora(path, name, targets)
        with self._lock:
            self._cache.pop(name, None)
            if lora.nbytes <= self.cache_bytes:
                self._cache[name] = (stamp, lora)
                while sum(entry.nbytes for _, entry in self._cache.values()) > self.cache_bytes:
                    self._cache.popitem(last=False)
        return lora

    def cached_names(self) -> list[str]:
        """Cached names, least recently used first."""
        with self._lock:
            return list(self._cache)
