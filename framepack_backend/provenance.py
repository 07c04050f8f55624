"""What a finished job reports so it can be repeated: its parameters, the model, the versions.

- `request_parameters(request)`: the request's parameters as accepted, with every
  per-job setting resolved (defaults and the preset's values filled in), so sending them
  again asks for the same job even from a server whose defaults changed. Parameters this
  module does not know (inputs added to the request later) travel as they were accepted.
- `model_identity(model_dir, transformer_folder)`: a SHA-256 per component of
  `components.COMPONENT_SPECS` over its `config.json` and the headers of its safetensors
  files (names, dtypes, shapes, offsets; not the weights, so it is cheap), and one over
  them all. Computed once when the pipeline loads.
- `versions()`: our package and the libraries whose code computes the frames.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from framepack_wire import PROMPT_PARAMETER

from .components import COMPONENT_SPECS
from .settings import ClientOnlySettings

if TYPE_CHECKING:
    from .request import GenerationRequest

PACKAGES = ("framepack-serving", "torch", "diffusers", "transformers")
CONFIG_FILE = "config.json"
# A safetensors file starts with the header's length (little-endian u64), then the JSON header.
HEADER_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


def request_parameters(request: GenerationRequest) -> dict[str, object]:
    """The parameters that ask for this job again: those accepted, every setting resolved."""
    client_only = {name for name in ClientOnlySettings.__dataclass_fields__}
    accepted = {name: value for name, value in request.parameters.items()
                if name not in client_only and not isinstance(value, bytes)}  # bytes: decoded in the request
    overrides = {name: value for name, value in request.engine.to_dict().items() if value is not None}
    # The prompt as sent: a request parsed from it (a timed prompt schedule, say) is made again from it.
    return {PROMPT_PARAMETER: request.prompt, **accepted, **request.settings.to_dict(), **overrides}


def model_identity(model_dir: Path | str, transformer_folder: str = "transformer") -> dict[str, object]:
    """{"sha256": over all components, "components": {name: sha256}} (see the module docstring)."""
    model_dir = Path(model_dir)
    components = {}
    for spec in COMPONENT_SPECS:
        folder = model_dir / (transformer_folder if spec.name == "transformer" else spec.name)
        components[spec.name] = component_digest(folder)
    whole = hashlib.sha256("".join(f"{name}={digest}\n" for name, digest in components.items()).encode())
    return {"sha256": whole.hexdigest(), "components": components}


def component_digest(folder: Path) -> str:
    """SHA-256 over the folder's config.json and each safetensors header, by file name."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.name == CONFIG_FILE:
            content = path.read_bytes()
        elif path.suffix == ".safetensors":
            content = safetensors_header(path)
        else:
            continue
        digest.update(f"{path.relative_to(folder).as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file, as stored (ValueError for a file that is not one)."""
    with open(path, "rb") as file:
        prefix = file.read(HEADER_LENGTH.size)
        if len(prefix) < HEADER_LENGTH.size:
            raise ValueError(f"{path}: too short for a safetensors file")
        (length,) = HEADER_LENGTH.unpack(prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header of {length} bytes, more than a safetensors file has")
        header = file.read(length)
    if len(header) != length:
        raise ValueError(f"{path}: header cut short ({len(header)} of {length} bytes)")
    return header


@functools.cache
def versions() -> dict[str, str]:
    """Installed versions of PACKAGES ("unknown" for one not installed as a distribution);
    looked up once per process."""
    found: dict[str, str] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found
