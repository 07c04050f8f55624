"""Every user-facing setting of a generation job: default, type, allowed values.

This is the one place input is validated. The Triton model, the CLI and the UI all
pass what the user gave to `GenerationSettings.from_mapping` (and the image and prompt
to `validate_image` / `validate_prompt`) and report `SettingsError` as it is: it names
the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from .attention import BACKEND_NAMES
from .presets import FLOW_PRESETS, PRESETS
from .variants import VARIANT_NAMES


class SettingsError(ValueError):
    """A setting or input the engine cannot accept, with what is allowed instead."""

    def __init__(self, field_name: str, value: object, allowed: str):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field_name}={shown} is not allowed: expected {allowed}")


def _spec(default: Any, kind: type, *, low=None, high=None, choices=None, doc: str = ""):
    return field(default=default, metadata={"kind": kind, "low": low, "high": high, "choices": choices, "doc": doc})


ATTENTION_BACKENDS = ("auto", *BACKEND_NAMES)
MEMORY_MODES = ("auto", "resident", "offload", "stream")
SOLVERS = ("bh1", "bh2")
TEACACHE_MODES = ("default", "detail")

MAX_PROMPT_CHARS = 4000
MAX_IMAGE_PIXELS = 4096 * 4096
MIN_IMAGE_SIDE = 16
# The image is scaled to cover its bucket (aspect ratios up to about 2.4), so a thin
# strip is upscaled along its long side too: 16×1048576 pixels would become a
# 136-gigapixel array at resolution 1280. A bounded ratio bounds that allocation.
MAX_IMAGE_ASPECT = 16


@dataclass(frozen=True)
class GenerationSettings:
    seconds: float = _spec(5.0, float, low=0.5, high=120.0, doc="video length in seconds (30 fps)")
    seed: int = _spec(31337, int, low=0, high=2**63 - 1, doc="random seed; a job is reproducible from it")
    steps: int = _spec(25, int, low=1, high=100, doc="sampling steps per section")
    gs: float = _spec(10.0, float, low=1.0, high=32.0, doc="distilled guidance scale")
    cfg: float = _spec(1.0, float, low=1.0, high=32.0, doc="real classifier-free guidance (1 = off)")
    rs: float = _spec(0.0, float, low=0.0, high=1.0, doc="CFG rescale")
    window: int = _spec(9, int, low=1, high=33, doc="latent window size (latent frames per section)")
    blend_latents: int = _spec(
        33, int, low=1, high=33,
        doc="previous-section latent frames re-decoded for the cross-fade; at least the window (default) "
        "re-decodes the whole previous section as the reference does, fewer decode less (3: 9 frames "
        "cross-faded, faster, not the reference's output)",
    )
    teacache: bool = _spec(True, bool, doc="reuse transformer residuals on slowly changing steps")
    teacache_threshold: float = _spec(0.15, float, low=0.01, high=1.0, doc="TeaCache accumulated-change threshold")
    teacache_mode: str = _spec("default", str, choices=TEACACHE_MODES, doc="'detail' computes more steps")
    preset: str = _spec("", str, choices=("",) + tuple(PRESETS), doc="named preset applied before other settings")
    flow_preset: str = _spec("standard", str, choices=tuple(FLOW_PRESETS), doc="schedule shape for a kind of motion")
    negative_prompt: str = _spec("", str, doc="negative prompt (used when cfg > 1)")
    resolution: int = _spec(640, int, low=128, high=1280, doc="bucket base resolution (multiple of 16)")
    sampling: str = _spec(
        "auto", str, choices=("auto", *VARIANT_NAMES), doc="inverted anti-drifting or forward F1 ('auto': the loaded model's)"
    )
    solver: str = _spec("bh1", str, choices=SOLVERS, doc="UniPC variant")
    attention: str = _spec("auto", str, choices=ATTENTION_BACKENDS, doc="attention backend")
    memory_mode: str = _spec("auto", str, choices=MEMORY_MODES, doc="where weights live during a job")
    gpu_memory_preservation: float = _spec(6.0, float, low=0.0, high=256.0, doc="GB of GPU memory to keep free")
    crf: int = _spec(16, int, low=0, high=51, doc="H.264 constant rate factor of the MP4")
    preview: bool = _spec(True, bool, doc="send a small preview image every step")

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f, getattr(self, f.name))
        if self.resolution % 16:
            raise SettingsError("resolution", self.resolution, "a multiple of 16 between 128 and 1280")
        validate_prompt(self.negative_prompt, "negative_prompt")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "GenerationSettings":
        """Settings from loosely typed values (request parameters, CLI, UI).

        A preset, when named, sets its values first; values given explicitly win.
        """
        known = {f.name: f for f in fields(cls)}
        for name in values:
            if name not in known:
                raise SettingsError(name, values[name], f"one of the settings {sorted(known)}")
        merged: dict[str, object] = {}
        preset = values.get("preset", "")
        if preset not in ("", None):
            preset = _coerce(known["preset"], preset)
            _check(known["preset"], preset)
            merged.update(PRESETS[preset].as_settings())
        merged.update({name: _coerce(known[name], value) for name, value in values.items()})
        return cls(**merged)

    def replace(self, **changes: object) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> dict[str, dict[str, object]]:
        """Machine-readable spec of every setting (for help texts and UIs)."""
        out = {}
        for f in fields(cls):
            m = f.metadata
            out[f.name] = {
                "type": m["kind"].__name__,
                "default": f.default,
                "low": m["low"],
                "high": m["high"],
                "choices": list(m["choices"]) if m["choices"] else None,
                "doc": m["doc"],
            }
        return out


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    if m["low"] is not None:
        return f"{m['kind'].__name__} in [{m['low']}, {m['high']}]"
    return m["kind"].__name__


def _check(f: dataclasses.Field, value: object) -> None:
    m = f.metadata
    kind = m["kind"]
    type_ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        type_ok = True
    if not type_ok:
        raise SettingsError(f.name, value, _allowed(f))
    if kind is float and not math.isfinite(value):
        raise SettingsError(f.name, value, "a finite " + _allowed(f))
    if m["low"] is not None and not (m["low"] <= value <= m["high"]):
        raise SettingsError(f.name, value, _allowed(f))
    if m["choices"] and value not in m["choices"]:
        raise SettingsError(f.name, value, _allowed(f))


def _coerce(f: dataclasses.Field, value: object) -> object:
    """Turn a loosely typed value (e.g. the string '25') into the field's type, strictly."""
    kind = f.metadata["kind"]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.strip().lower() in ("true", "1", "yes", "on")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
        elif kind is str:
            if isinstance(value, str):
                return value
    except ValueError:
        pass
    raise SettingsError(f.name, value, _allowed(f))


def validate_prompt(prompt: object, field_name: str = "prompt") -> str:
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise SettingsError(field_name, prompt, "UTF-8 text") from None
    if not isinstance(prompt, str):
        raise SettingsError(field_name, prompt, "a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise SettingsError(field_name, prompt, f"at most {MAX_PROMPT_CHARS} characters")
    if "\x00" in prompt:
        raise SettingsError(field_name, prompt, "text without NUL characters")
    return prompt


def validate_image(image: object, field_name: str = "image") -> np.ndarray:
    """Check an H×W×3 uint8 RGB image (the serving contract's `image` input)."""
    if not isinstance(image, np.ndarray):
        raise SettingsError(field_name, type(image).__name__, "a uint8 array of shape H×W×3")
    if image.dtype != np.uint8:
        raise SettingsError(field_name, f"dtype {image.dtype}", "dtype uint8")
    if image.ndim != 3 or image.shape[2] != 3:
        raise SettingsError(field_name, f"shape {tuple(image.shape)}", "shape H×W×3 (RGB)")
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"both sides at least {MIN_IMAGE_SIDE} pixels")
    if h * w > MAX_IMAGE_PIXELS:
        raise SettingsError(field_name, f"{w}×{h} pixels", f"at most {MAX_IMAGE_PIXELS} pixels")
    if max(h, w) > MAX_IMAGE_ASPECT * min(h, w):
        raise SettingsError(field_name, f"{w}×{h} pixels", f"the long side at most {MAX_IMAGE_ASPECT}× the short one")
    return image
