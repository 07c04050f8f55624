"""The job's step cache: which of TeaCache, MagCache or none skips the transformer blocks.

Both caches reuse the residual the blocks added on an earlier step; they differ in how
they decide (teacache.py: the measured change of the first block's input; magcache.py:
a calibrated curve of residual magnitudes). The `teacache` on/off setting predates the
choice and still works: with `cache="teacache"`, `teacache=False` means no cache.
"""

from __future__ import annotations

from .magcache import MagCache
from .settings import SamplingSettings
from .teacache import TeaCache
from .variants import SamplingVariant


def step_cache_name(settings: SamplingSettings) -> str:
    """The cache a job runs: 'teacache', 'magcache' or 'none'."""
    if settings.cache == "teacache" and not settings.teacache:
        return "none"
    return settings.cache


def step_cache_for(settings: SamplingSettings, sampling: SamplingVariant) -> TeaCache | MagCache:
    """A fresh cache for one job; 'none' is a disabled TeaCache (computes every step, keeps nothing)."""
    name = step_cache_name(settings)
    if name == "magcache":
        return MagCache.for_variant(sampling, settings.steps, settings.magcache_threshold,
                                    settings.magcache_max_skips, settings.magcache_retention)
    return TeaCache(settings.teacache_threshold, settings.steps, detail=settings.teacache_mode == "detail",
                    enabled=name == "teacache")
