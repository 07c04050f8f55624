"""FramePack image-to-video engine: image + prompt in, video out, section by section.

The heavy modules (torch models, transformers, diffusers) load on first use, so that
`framepack_backend.variants` and `framepack_backend.presets` stay cheap to import (the
server's launcher reads the variants without torch). `settings` imports torch: its
attention choices come from the backend registry.
"""

from importlib import import_module

_EXPORTS = {
    "Pipeline": "pipeline",
    "GenerationRequest": "request",
    "parse_request": "request",
    "SamplingSettings": "settings",
    "EngineOptions": "settings",
    "EngineOverrides": "settings",
    "SettingsError": "settings",
    "GenerationCancelled": "errors",
    "StepProgress": "events",
    "SectionFinished": "events",
    "GenerationResult": "events",
    "PRESETS": "presets",
    "FLOW_PRESETS": "presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'framepack_backend' has no attribute {name!r}")
