"""Finding a `tritonserver` to run, and what its Python backend needs to run our model.

The embedded default is the server inside the `nvidia-pytriton` wheel. Its Python
backend needs a stub built for the running Python's minor version, placed beside
`libtriton_python.so`; the wheel ships stubs for several versions in a side folder. We
assemble a backend folder under the cache from symbolic links rather than writing into
site-packages. Links keep the stub's relative library search path (`$ORIGIN/...`)
pointing into the wheel, because the loader resolves `$ORIGIN` of an executable through
the link.
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import framepack_server

STUB_NAME = "triton_python_backend_stub"


class TritonNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    """FRAMEPACK_CACHE, else $XDG_CACHE_HOME/framepack, else ~/.cache/framepack."""
    if os.environ.get("FRAMEPACK_CACHE"):
        return Path(os.environ["FRAMEPACK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "framepack"


def source_root() -> Path:
    """The folder holding our packages (the repository root in a source checkout)."""
    return Path(framepack_server.__file__).resolve().parent.parent


def default_model_repository() -> Path:
    """FRAMEPACK_MODEL_REPOSITORY, else `model_repository/` of the source checkout."""
    if os.environ.get("FRAMEPACK_MODEL_REPOSITORY"):
        return Path(os.environ["FRAMEPACK_MODEL_REPOSITORY"]).expanduser()
    return source_root() / "model_repository"


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_directory: Path
    library_path: tuple[Path, ...]  # folders to add to LD_LIBRARY_PATH


def embedded_install(cache: Path) -> TritonInstall:
    """The server of the nvidia-pytriton wheel, with a backend folder for this Python."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound(
            "the embedded Triton server comes with nvidia-pytriton: pip install -e '.[server]' "
            "(or pass --tritonserver PATH for another install)"
        )
    package = Path(spec.submodule_search_locations[0])
    dist = package / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / STUB_NAME
    if not binary.is_file():
        raise TritonNotFound(f"no tritonserver binary at {binary}")
    if not stub.is_file():
        shipped = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise TritonNotFound(
            f"the embedded Triton has Python backend stubs for {', '.join(shipped)}, not for this Python {version}"
        )
    backends = cache / "triton-backends" / f"python{version}"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for target in (
        dist / "backends" / "python" / "libtriton_python.so",
        dist / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        _link(python_backend / target.name, target)
    libs = package.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, backends, (libs,) if libs.is_dir() else ())


def external_install(binary: Path, backend_directory: Path | None = None) -> TritonInstall:
    """Another Triton install, e.g. /opt/tritonserver/bin/tritonserver in the NGC image."""
    binary = binary.expanduser().resolve()
    if not binary.is_file():
        raise TritonNotFound(f"--tritonserver {binary}: no such file")
    backends = backend_directory or binary.parent.parent / "backends"
    if not (backends / "python").is_dir():
        raise TritonNotFound(f"no Python backend under {backends}: pass --backend-directory")
    return TritonInstall(binary, backends, ())


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)  # atomic, so concurrent launchers never see a missing file


def stub_python_path() -> list[str]:
    """The folders our model needs on the stub's sys.path, in import order.

    PYTHONPATH entries, the folder holding our packages, then this interpreter's
    site-packages (with their .pth files: an editable install lives there).
    """
    folders = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    folders.append(str(source_root()))
    folders += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    unique = []
    for folder in folders:
        folder = os.path.abspath(folder)
        if folder not in unique and os.path.isdir(folder):
            unique.append(folder)
    return unique


def python_library_dir() -> Path | None:
    """The folder of this interpreter's libpython, when it is a shared library.

    The stub links libpython by name; putting this folder first makes it embed the same
    Python build as the environment whose packages it imports.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("LDLIBRARY")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and library and (Path(libdir) / library).exists():
        return Path(libdir)
    return None
