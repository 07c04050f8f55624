"""The settings of a generation, by scope: default, type, allowed values, help text.

Each field is declared once, with `_spec` (default, type, range or choices, doc), and
three dataclasses group them by who may set them:

- `SamplingSettings`: per job (a request's parameters);
- `EngineOptions`: per model instance, fixed when the pipeline loads (sampling variant,
  attention, memory mode, GPU memory preservation, FP8, fused kernels);
- `EngineOverrides`: the one explicit path through which a job may override some
  instance options (`attention`, `memory_mode`, `gpu_memory_preservation`, `sampling`),
  kept because the wire accepted them per request. The pipeline combines them with its
  options for the job (`EngineOptions.for_job`); it never changes its own.

`split_settings` turns a request's loosely typed settings into the first and the last,
applying a preset first. It is called from one place, the request boundary
(`framepack_backend/request.py: parse_request`), which also checks the image and the
prompt. `SettingsError` names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .attention import BACKEND_NAMES
from .presets import FLOW_PRESETS, PRESETS
from .variants import VARIANT_NAMES, SamplingVariant


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
LATENT_INITS = ("black", "white", "noise")
TEACACHE_MODES = ("default", "detail")
STEP_CACHES = ("teacache", "magcache", "none")

MAX_PROMPT_CHARS = 4000


class _FieldSpecs:
    """Checks, conversion and the machine-readable spec shared by the settings dataclasses."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            _check(f, getattr(self, f.name))

    @classmethod
    def _from_values(cls, values: Mapping[str, object]):
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        for name in values:
            if name not in known:
                raise SettingsError(name, values[name], f"one of the settings {sorted(known)}")
        return cls(**{name: _coerce(known[name], value) for name, value in values.items()})

    def replace(self, **changes: object):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def describe(cls) -> dict[str, dict[str, object]]:
        """Machine-readable spec of every field (for help texts and UIs)."""
        return {f.name: _describe(f) for f in fields(cls)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class SamplingSettings(_FieldSpecs):
    """Per-job settings: what a request may choose for its own video."""

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
    cache: str = _spec(
        "teacache", str, choices=STEP_CACHES,
        doc="step cache: 'teacache' (on or off by the teacache setting), 'magcache' or 'none'",
    )
    # MagCache's defaults are its authors' for FramePack (MagCache4FramePack's demo).
    magcache_threshold: float = _spec(0.1, float, low=0.0, high=1.0, doc="MagCache accumulated-error threshold")
    magcache_max_skips: int = _spec(3, int, low=0, high=25, doc="MagCache: most consecutive steps skipped (K)")
    magcache_retention: float = _spec(
        0.2, float, low=0.0, high=1.0, doc="MagCache: fraction of the first steps always computed"
    )
    preset: str = _spec("", str, choices=("",) + tuple(PRESETS), doc="named preset applied before other settings")
    flow_preset: str = _spec("standard", str, choices=tuple(FLOW_PRESETS), doc="schedule shape for a kind of motion")
    negative_prompt: str = _spec("", str, doc="negative prompt (used when cfg > 1)")
    resolution: int = _spec(640, int, low=128, high=1280, doc="bucket base resolution (multiple of 16)")
    solver: str = _spec("bh1", str, choices=SOLVERS, doc="UniPC variant")
    preview: bool = _spec(True, bool, doc="send a small preview image every step")
    # Creative controls (docs/creative-controls.md); their images travel as tensor inputs.
    end_strength: float = _spec(
        1.0, float, low=0.0, high=1.0,
        doc="how strongly the end image conditions the video's end (0 = as if none was given)",
    )
    loop: bool = _spec(False, bool, doc="end on the start image (the end image is the start image)")
    keyframe_times: str = _spec(
        "", str, doc="seconds of the keyframe images, comma-separated, in the order of the 'keyframes' input",
    )
    prompt_blend_sections: int = _spec(
        0, int, low=0, high=16,
        doc="sections over which a timed prompt change blends linearly into the new prompt (0 = at once)",
    )
    latent_init: str = _spec(
        "black", str, choices=LATENT_INITS,
        doc="text-to-video (no start image): the start frame, a black, white or seeded-noise picture",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution % 16:
            raise SettingsError("resolution", self.resolution, "a multiple of 16 between 128 and 1280")
        validate_prompt(self.negative_prompt, "negative_prompt")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> SamplingSettings:
        """Settings from loosely typed values (request parameters, CLI, UI).

        A preset, when named, sets its values first; values given explicitly win.
        """
        preset = _preset_values(values.get("preset", ""))
        return cls._from_values({**{k: v for k, v in preset.items() if k in _names(cls)}, **values})


@dataclass(frozen=True)
class EngineOptions(_FieldSpecs):
    """Per-instance options, fixed when the pipeline loads; a job sees them through `for_job`."""

    sampling: SamplingVariant = _spec(
        SamplingVariant.INVERTED, str, choices=VARIANT_NAMES,
        doc="inverted anti-drifting or forward F1: picks the transformer the instance loads",
    )
    attention: str = _spec(
        "auto", str, choices=ATTENTION_BACKENDS,
        doc="attention backend (auto: the fastest exact one here; sage and cudnn-fp8 quantize: faster, inexact)",
    )
    memory_mode: str = _spec("auto", str, choices=MEMORY_MODES, doc="where weights live during a job")
    gpu_memory_preservation: float = _spec(6.0, float, low=0.0, high=256.0, doc="GB of GPU memory to keep free")
    fp8: bool = _spec(False, bool, doc="FP8 e4m3 linear layers in the transformer blocks (compute capability 8.9+)")
    fused_qkv: bool = _spec(
        False, bool, doc="each attention's q/k/v projections as one GEMM (same math; a per-layer LoRA module "
        "on to_q/to_k/to_v is then bypassed)",
    )
    cuda_graphs: bool = _spec(
        False, bool, doc="replay the transformer blocks from CUDA graphs captured per job (CUDA, resident weights)",
    )
    fused_kernels: bool | None = _spec(
        None, bool, doc="run the blocks on the Triton kernels (default: on for CUDA when Triton is installed)"
    )
    fp32_output: bool | None = _spec(
        None, bool, doc="final projection in fp32, as the FramePack demo (default: on for bf16/fp16 weights)"
    )
    fast_vae_decode: bool | None = _spec(
        None, bool, doc="VAE decoder in channels_last_3d with GroupNorm+SiLU fused into the causal padding (same "
        "output within fp16 rounding, framepack_backend/vae_fast.py; default: on for CUDA when Triton is "
        "installed, where benchmarks/vae_decode.py measures it against diffusers' decode; off on the CPU, where it "
        "gains nothing)",
    )
    sequence_parallel: int = _spec(
        1, int, low=1, high=64,
        doc="processes, one device each, that split every transformer forward over attention heads (Ulysses); "
            "must divide the head count (framepack_backend/sequence_parallel.py)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "sampling", SamplingVariant(self.sampling))

    def for_job(self, overrides: EngineOverrides, device_type: str | None = None) -> EngineOptions:
        """These options with a job's overrides applied (a new value; this one is unchanged).

        The sampling variant picks the loaded transformer, so a job may only name it
        ("auto" or the loaded one), never change it. Given `device_type` "cpu" (a server
        checking a request), a job may not ask for "offload" or "stream" either: they move
        weights between host and GPU memory, and on a CPU they would only make a second
        copy of every weight, kept after the job (twice the model's memory for the
        instance's life). The engine itself still runs them on a CPU when asked, which is
        how their placement logic is tested without a GPU.
        """
        if overrides.sampling not in ("auto", self.sampling):
            raise SettingsError(
                "sampling", overrides.sampling,
                f"'{self.sampling}': this pipeline was loaded with {self.sampling.transformer_folder}/",
            )
        if device_type == "cpu" and overrides.memory_mode in ("offload", "stream"):
            raise SettingsError(
                "memory_mode", overrides.memory_mode,
                "'auto' or 'resident': this server runs on the CPU, where offload and stream only copy the weights",
            )
        given = {name: value for name, value in overrides.to_dict().items() if name != "sampling" and value is not None}
        return self.replace(**given)


def triton_kernels_by_default(device_type: str) -> bool:
    """The default of the options that run our Triton kernels (`fused_kernels`, `fast_vae_decode`):
    on for CUDA when Triton is installed, where the kernels run; off elsewhere."""
    return device_type == "cuda" and importlib.util.find_spec("triton") is not None


def _override(name: str, doc: str):
    """A field of EngineOverrides: the EngineOptions field's type and range; None keeps the instance's."""
    spec = EngineOptions.__dataclass_fields__[name].metadata
    return _spec(None, spec["kind"], low=spec["low"], high=spec["high"], choices=spec["choices"],
                 doc=f"{spec['doc']} ({doc})")


@dataclass(frozen=True)
class EngineOverrides(_FieldSpecs):
    """A job's overrides of instance options, accepted per request for wire compatibility."""

    sampling: str = _spec(
        "auto", str, choices=("auto", *VARIANT_NAMES),
        doc="inverted anti-drifting or forward F1 ('auto': the loaded model's; another is refused)",
    )
    attention: str | None = _override("attention", "default: the server's")
    memory_mode: str | None = _override("memory_mode", "default: the server's")
    gpu_memory_preservation: float | None = _override("gpu_memory_preservation", "default: the server's")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> EngineOverrides:
        return cls._from_values(values)


@dataclass(frozen=True)
class ClientOnlySettings(_FieldSpecs):
    """Settings the client applies itself. The MP4's quality is the client's choice (it
    encodes the video); older clients send it as a request parameter, so the server
    still checks its range, then ignores it (client/video.py holds the client's copy)."""

    crf: int = _spec(16, int, low=0, high=51, doc="H.264 constant rate factor of the MP4 (client side)")


def split_settings(values: Mapping[str, object]) -> tuple[SamplingSettings, EngineOverrides]:
    """A request's settings (loosely typed, by parameter name) → per-job settings and overrides.

    A named preset sets its values first (in both groups: presets also name a GPU memory
    preservation); values given explicitly win. Client-only settings are checked, then
    dropped. Raises SettingsError naming the first bad field.
    """
    sampling_names, override_names = _names(SamplingSettings), _names(EngineOverrides)
    client_names = _names(ClientOnlySettings)
    known = sampling_names | override_names | client_names
    for name in values:
        if name not in known:
            raise SettingsError(name, values[name], f"one of the settings {sorted(known)}")
    ClientOnlySettings._from_values({k: v for k, v in values.items() if k in client_names})  # checked, not used
    sampling = SamplingSettings.from_mapping({k: v for k, v in values.items() if k in sampling_names})
    preset = _preset_values(sampling.preset)
    overrides = {k: v for k, v in preset.items() if k in override_names}
    overrides.update({k: v for k, v in values.items() if k in override_names})
    return sampling, EngineOverrides.from_mapping(overrides)


def describe_settings() -> dict[str, dict[str, object]]:
    """Every setting a request may carry (per job, then overrides), for the `describe` answer."""
    return {**SamplingSettings.describe(), **EngineOverrides.describe()}


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _preset_values(name: object) -> dict[str, object]:
    if name in ("", None):
        return {}
    spec = SamplingSettings.__dataclass_fields__["preset"]
    preset = _coerce(spec, name)
    _check(spec, preset)
    return PRESETS[str(preset)].as_settings()


def _describe(f: dataclasses.Field) -> dict[str, object]:
    m = f.metadata
    default = f.default.value if isinstance(f.default, SamplingVariant) else f.default
    return {
        "type": m["kind"].__name__,
        "default": default,
        "low": m["low"],
        "high": m["high"],
        "choices": list(m["choices"]) if m["choices"] else None,
        "doc": m["doc"],
    }


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    if m["low"] is not None:
        return f"{m['kind'].__name__} in [{m['low']}, {m['high']}]"
    return m["kind"].__name__


def _check(f: dataclasses.Field, value: object) -> None:
    if value is None and f.default is None:  # an optional field left unset
        return
    m = f.metadata
    kind = m["kind"]
    type_ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        type_ok = True
    if not type_ok:
        raise SettingsError(f.name, value, _allowed(f))
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingsError(f.name, value, "a finite " + _allowed(f))
    if m["low"] is not None and not (m["low"] <= value <= m["high"]):
        raise SettingsError(f.name, value, _allowed(f))
    if m["choices"] and value not in m["choices"]:
        raise SettingsError(f.name, value, _allowed(f))


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def _coerce(f: dataclasses.Field, value: object) -> object:
    """Turn a loosely typed value (e.g. the string '25') into the field's type, strictly."""
    kind = f.metadata["kind"]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
                return value.strip().lower() in TRUE_WORDS
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
                return _canonical_choice(f, value)
    except ValueError:
        pass
    raise SettingsError(f.name, value, _allowed(f))


def _canonical_choice(f: dataclasses.Field, value: str) -> str:
    """A named choice in any case (`dance`, `DANCE` → the preset `Dance`): the spelling the engine uses."""
    choices = f.metadata["choices"]
    if not choices or value in choices:
        return value
    matches = [choice for choice in choices if choice.casefold() == value.strip().casefold()]
    return matches[0] if len(matches) == 1 else value


def validate_prompt(prompt: object, field_name: str = "prompt") -> str:
    """A prompt (or the negative prompt): UTF-8 text, at most MAX_PROMPT_CHARS, no NUL."""
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
