"""What a request may ask for: LoRAs by name from the server's folder, each with a strength.

On the wire and on the command line a choice is `NAME[:STRENGTH]`; several are joined by
commas (`style:0.8,detail`). Names are file names in the server's LoRA folder, with or
without the `.safetensors` suffix; a client never sends a path. Torch-free: the request
boundary imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Container

from framepack_wire import LORAS_PARAMETER

from ..settings import SettingsError

LORAS_FIELD = LORAS_PARAMETER
LORA_SUFFIX = ".safetensors"
STRENGTH_RANGE = (-2.0, 2.0)
DEFAULT_STRENGTH = 1.0
MAX_LORAS = 8  # per job; each one adds a rank-r product to every layer it adapts
ALLOWED = f"comma-separated NAME[:STRENGTH] entries naming LoRA files of the server's LoRA folder, " \
          f"at most {MAX_LORAS}, strength in [{STRENGTH_RANGE[0]:g}, {STRENGTH_RANGE[1]:g}] (default 1)"


@dataclass(frozen=True)
class LoraChoice:
    name: str  # a file stem in the LoRA folder
    strength: float = DEFAULT_STRENGTH

    def __str__(self) -> str:
        return f"{self.name}:{self.strength:g}"


def lora_name(text: str) -> str:
    """The folder name a client gave, suffix removed; SettingsError for anything path-like."""
    name = text.strip()
    if name.endswith(LORA_SUFFIX):
        name = name[: -len(LORA_SUFFIX)]
    if not name or any(c in name for c in "/\\\0") or ".." in name or name.startswith(".") or not name.isprintable():
        raise SettingsError(LORAS_FIELD, text, "a LoRA file name from the server's folder, not a path "
                            "(no '/', '\\', '..', leading '.', or control characters)")
    return name


def parse_lora_choices(value: object, available: Container[str] | None) -> tuple[LoraChoice, ...]:
    """A request's `loras` parameter → choices, each name checked against `available`
    (the folder's names; None: this server has no LoRA folder). Strength 0 is kept here
    and skipped when applied, so it costs nothing and changes nothing."""
    if value is None or value == "" or value == []:
        return ()
    if not isinstance(value, str):
        raise SettingsError(LORAS_FIELD, value, ALLOWED)
    entries = [entry for entry in value.split(",") if entry.strip()]
    if len(entries) > MAX_LORAS:
        raise SettingsError(LORAS_FIELD, value, ALLOWED)
    choices: list[LoraChoice] = []
    for entry in entries:
        name_text, colon, strength_text = entry.rpartition(":") if ":" in entry else (entry, "", "")
        name = lora_name(name_text)
        strength = DEFAULT_STRENGTH
        if colon:
            try:
                strength = float(strength_text)
            except ValueError:
                raise SettingsError(LORAS_FIELD, entry, ALLOWED) from None
        low, high = STRENGTH_RANGE
        if not (math.isfinite(strength) and low <= strength <= high):
            raise SettingsError(LORAS_FIELD, entry, f"a strength in [{low:g}, {high:g}]")
        if available is None:
            raise SettingsError(LORAS_FIELD, name, "no LoRA: this server was started without a LoRA folder "
                                "(framepack-server --lora-dir)")
        if name not in available:
            raise SettingsError(LORAS_FIELD, name, "the name of a LoRA in the server's folder "
                                "(the describe request lists them)")
        if any(c.name == name for c in choices):
            raise SettingsError(LORAS_FIELD, name, "each LoRA named once")
        choices.append(LoraChoice(name, strength))
    return tuple(choices)
