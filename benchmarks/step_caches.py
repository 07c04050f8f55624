"""The step-cache runs of the whole-generation benchmarks, by name, as request settings.

`off` computes every step; `teacache` is TeaCache at 0.15 (the FramePack demo's threshold);
`magcache` is MagCache at the authors' defaults (our `SamplingSettings` magcache_* values).
benchmarks/pipeline_race.py and benchmarks/server_generation.py send the same settings,
so their seconds per frame compare run for run.
"""

from __future__ import annotations

STEP_CACHES: dict[str, dict[str, object]] = {
    "off": {"cache": "none"},
    "teacache": {"cache": "teacache", "teacache": True, "teacache_threshold": 0.15},
    "magcache": {"cache": "magcache"},
}
