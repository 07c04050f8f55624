"""The JSON metadata of each streamed event, as small dataclasses with to_json/from_json.

Every response carries its event's metadata in the `event` output; `progress` and
`section` events also carry an image tensor (`preview`, `frames`), which is not part of
the metadata. `from_json` checks what it reads: integers must be integers (not floats,
booleans or strings), because the client puts them into file names (section clips,
previews, the MP4 named after the seed) and a string could carry a path. Unknown keys
are ignored, so a newer server may add fields; an unknown kind raises UnknownEventKind,
which a client skips, so a newer server may add kinds.

A job's responses, in order: `queued` (repeated while it waits behind others), `plan`
(the video it will make), `phase` before each phase (encoding the prompt, the image;
sampling and decoding each section), `progress` per step, `section` per decoded
section, `final`. Servers older than `plan`, `phase` and `queued` send only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, Mapping


class EventKind(str, Enum):
    PROGRESS = "progress"  # one sampling step
    SECTION = "section"  # one decoded section's frames
    FINAL = "final"  # the job's last response
    DESCRIBE = "describe"  # the answer to a describe request
    QUEUED = "queued"  # the job waits behind others
    PLAN = "plan"  # the video the job will make, before any model runs
    PHASE = "phase"  # a phase of the job begins

    def __str__(self) -> str:
        return self.value


class UnknownEventKind(ValueError):
    """An event kind this side does not know (from a newer server): skip it."""


def _str(meta: Mapping[str, Any], key: str) -> str:
    value = meta[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r} is not a string")
    return value


def _int(meta: Mapping[str, Any], key: str) -> int:
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not an integer")
    return value


def _float(meta: Mapping[str, Any], key: str) -> float:
    value = meta[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a number")
    return float(value)


def _bool(meta: Mapping[str, Any], key: str) -> bool:
    value = meta[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not true or false")
    return value


def _dict(meta: Mapping[str, Any], key: str) -> dict:
    value = meta[key]
    if not isinstance(value, dict):
        raise ValueError(f"{key}={value!r} is not a JSON object")
    return value


def _list(meta: Mapping[str, Any], key: str) -> list:
    value = meta[key]
    if not isinstance(value, list):
        raise ValueError(f"{key}={value!r} is not a JSON array")
    return value


class _Meta:
    kind: ClassVar[EventKind]

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent in the `event` output: `kind` and every field."""
        return {"kind": self.kind.value, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]


@dataclass(frozen=True)
class QueuedMeta(_Meta):
    """The job waits: `position` jobs run or wait before it (1: it is next); sent every few seconds."""

    kind: ClassVar[EventKind] = EventKind.QUEUED
    position: int
    waited_s: float

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> QueuedMeta:
        return cls(_int(meta, "position"), _float(meta, "waited_s"))


@dataclass(frozen=True)
class PlanMeta(_Meta):
    """The video the job makes: whole sections of `window` latent frames, so often longer than asked."""

    kind: ClassVar[EventKind] = EventKind.PLAN
    sections: int
    window: int
    latent_frames: int
    frame_count: int
    fps: int
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.frame_count / self.fps

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> PlanMeta:
        return cls(*(_int(meta, key) for key in (
            "sections", "window", "latent_frames", "frame_count", "fps", "width", "height")))


@dataclass(frozen=True)
class PhaseMeta(_Meta):
    """A phase begins: "text" and "image" (encoding, section 0), "sampling" and "decode" of section i/n."""

    kind: ClassVar[EventKind] = EventKind.PHASE
    phase: str
    section: int
    sections: int
    elapsed_s: float  # since the job started on the server

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> PhaseMeta:
        return cls(_str(meta, "phase"), _int(meta, "section"), _int(meta, "sections"), _float(meta, "elapsed_s"))


@dataclass(frozen=True)
class ProgressMeta(_Meta):
    kind: ClassVar[EventKind] = EventKind.PROGRESS
    section: int  # 1-based, in generation order
    sections: int
    step: int  # 1-based
    steps: int
    elapsed_s: float  # since the job started on the server
    computed: bool = True  # False when TeaCache reused the cached residual

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> ProgressMeta:
        return cls(_int(meta, "section"), _int(meta, "sections"), _int(meta, "step"), _int(meta, "steps"),
                   _float(meta, "elapsed_s"), _bool(meta, "computed") if "computed" in meta else True)


@dataclass(frozen=True)
class SectionMeta(_Meta):
    """Frames [start_frame, start_frame + frame_count) of the video; they supersede earlier ones."""

    kind: ClassVar[EventKind] = EventKind.SECTION
    section: int
    sections: int
    start_frame: int
    frame_count: int
    total_frames: int
    fps: int

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> SectionMeta:
        # frame_count is optional on reading: the frames tensor says it too (older servers' events).
        count = _int(meta, "frame_count") if "frame_count" in meta else 0
        return cls(_int(meta, "section"), _int(meta, "sections"), _int(meta, "start_frame"), count,
                   _int(meta, "total_frames"), _int(meta, "fps"))


@dataclass(frozen=True)
class FinalMeta(_Meta):
    """The job's end: the video's size and rate, the seed, every setting used, timings, and
    what repeats it (the parameters, the model's identity, versions)."""

    kind: ClassVar[EventKind] = EventKind.FINAL
    frame_count: int
    fps: int
    width: int
    height: int
    seed: int
    settings: dict
    timings: dict
    # What repeats the job; empty from servers older than them.
    parameters: dict = field(default_factory=dict)  # the request's, every setting resolved
    model: dict = field(default_factory=dict)  # sha256 of the whole model and of each component
    versions: dict = field(default_factory=dict)  # package -> version

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> FinalMeta:
        optional = {key: _dict(meta, key) for key in ("parameters", "model", "versions") if key in meta}
        return cls(_int(meta, "frame_count"), _int(meta, "fps"), _int(meta, "width"), _int(meta, "height"),
                   _int(meta, "seed"), _dict(meta, "settings"), _dict(meta, "timings"), **optional)


@dataclass(frozen=True)
class DescribeMeta(_Meta):
    """What the server accepts, so front ends show the engine's values without importing it."""

    kind: ClassVar[EventKind] = EventKind.DESCRIBE
    settings: dict  # request parameter name -> type, default, low, high, choices, doc
    presets: dict  # preset name -> the settings it sets
    flow_presets: list
    # The server's LoRA folder: {name, size_bytes, rank, format} each (empty: none, or an older server)
    loras: list = field(default_factory=list)
    # The `video` input: max_frames, max_frame_pixels, context_frames (sampling variant ->
    # how many of a clip's last frames a job reads), sampling (the loaded variant, if said).
    # Empty from servers older than video extension.
    video: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> DescribeMeta:
        return cls(_dict(meta, "settings"), _dict(meta, "presets"), _list(meta, "flow_presets"),
                   _list(meta, "loras") if "loras" in meta else [], _dict(meta, "video") if "video" in meta else {})


EventMeta = QueuedMeta | PlanMeta | PhaseMeta | ProgressMeta | SectionMeta | FinalMeta | DescribeMeta
_BY_KIND: dict[str, type] = {
    m.kind.value: m for m in (QueuedMeta, PlanMeta, PhaseMeta, ProgressMeta, SectionMeta, FinalMeta, DescribeMeta)
}


def event_from_json(meta: object) -> EventMeta:
    """The event a JSON object describes; UnknownEventKind for a kind this version does not
    know, ValueError (or KeyError for a missing field) for anything else wrong."""
    if not isinstance(meta, dict):
        raise ValueError(f"event={meta!r} is not a JSON object")
    kind = meta.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"event kind {kind!r} is not a string")
    if kind not in _BY_KIND:
        raise UnknownEventKind(f"unexpected event kind {kind!r}")
    return _BY_KIND[kind].from_json(meta)
