"""Where a job's files go: checked before the job starts, and a finished video never lost.

`check_output_paths` is called before a job is sent: a path that cannot be written fails
at once with one line naming the option, the path and the reason, instead of after the
whole video was generated. Writability is checked by really creating and removing a file
in the target folder: permission bits alone say nothing for root, read-only mounts, full
disks or special file systems such as /proc.

`write_video_safely` wraps the final write: when the requested path still cannot be
written (the folder was removed or made read-only during the job, the disk filled up),
the video goes to a fallback file with a unique name, in the current folder, else the
home folder, else the system's temporary folder, and a one-line message says where.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np


class OutputPathError(ValueError):
    """An output path that cannot be written; the message is one line."""


class VideoWriteError(OSError):
    """Neither the requested path nor any fallback could be written; the message is one line."""


class SavedFile(NamedTuple):
    """Where a file was written, and a one-line message when that is not where it was asked for."""

    path: Path
    message: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.message is not None


def check_output_paths(
    output: Path | str | None,
    save_sections: Path | str | None = None,
    save_previews: Path | str | None = None,
    *,
    create_folders: bool = True,
) -> None:
    """Raise OutputPathError (a ValueError, one line) when a path cannot be written.

    `output` is a file (the MP4): it must not be a folder or a special file, and its folder
    must be writable. `save_sections` and `save_previews` are folders: they must be, or be
    creatable as, writable folders. With `create_folders` (the writers' behaviour: they
    create missing folders), a missing folder is fine when it can be created; without it, a
    missing folder of `output` is an error. Folders created for the check are removed again,
    so a check leaves nothing behind. Any file name is allowed for `output`, with or
    without .mp4 (the writer always writes MP4).
    """
    checks = (("--output", output, True), ("--save-sections", save_sections, False),
              ("--save-previews", save_previews, False))
    for option, path, is_file in checks:
        if path is None:
            continue
        try:
            if is_file:
                _check_file(option, Path(path), create_folders)
            else:
                _check_folder(option, Path(path))
        except OSError as e:  # e.g. a folder on the way that may not be searched
            raise OutputPathError(f"{option} {path}: cannot be checked ({_reason(e)})") from None


def write_video_safely(
    path: Path | str,
    frames: np.ndarray,
    fps: int,
    crf: int | None,
    write: Callable[[Path, np.ndarray, int, int | None], object],
    *,
    fallback_dirs: Iterable[Path | str] | None = None,
) -> SavedFile:
    """`write(path, frames, fps, crf)` (e.g. client.video.write_mp4); on failure, the same
    frames to a uniquely named fallback file. Returns where the video went and, when it is
    not `path`, a one-line message saying why and where. Raises VideoWriteError (one line)
    only when every location failed. KeyboardInterrupt passes through."""
    return write_file_safely(path, lambda target: write(target, frames, fps, crf), fallback_dirs=fallback_dirs,
                             what="video")


def write_file_safely(
    path: Path | str,
    write: Callable[[Path], object],
    *,
    fallback_dirs: Iterable[Path | str] | None = None,
    what: str = "file",
) -> SavedFile:
    """`write(path)`, or on failure `write(fallback)` for each fallback folder in turn (by
    default: the current folder, the home folder, the system's temporary folder) with a
    unique name made from the requested one. See write_video_safely."""
    path = Path(path)
    try:
        write(path)
        return SavedFile(path)
    except Exception as e:  # noqa: BLE001 - whatever stopped the write, the frames go elsewhere
        first = _reason(e)
    failures = []
    for folder in _fallback_folders(fallback_dirs, exclude=path.parent):
        fallback = folder / _unique_name(path)
        try:
            write(fallback)
        except Exception as e:  # noqa: BLE001 - try the next folder
            failures.append(f"{folder}: {_reason(e)}")
            continue
        return SavedFile(fallback, f"could not write {path} ({first}); the {what} was saved to {fallback} instead")
    tried = "; ".join(failures) if failures else "no fallback folder"
    raise VideoWriteError(f"could not write {path} ({first}), nor a copy elsewhere ({tried})")


def default_fallback_dirs() -> list[Path]:
    """The current folder, the home folder, the system's temporary folder (in that order)."""
    folders = []
    for get in (Path.cwd, Path.home, lambda: Path(tempfile.gettempdir())):
        try:
            folders.append(get())
        except Exception:  # noqa: BLE001, S112 - a deleted working folder, no home
            continue
    return folders


# --- internals -----------------------------------------------------------------------------


def _check_file(option: str, path: Path, create_folders: bool) -> None:
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file name, e.g. {path / 'video.mp4'}")
    if path.exists() or path.is_symlink():
        if not path.exists():
            raise OutputPathError(f"{option} {path}: is a broken symbolic link")
        if not path.is_file():
            raise OutputPathError(f"{option} {path}: is not a regular file (a device, pipe or socket)")
    if path.name in ("", ".", ".."):
        raise OutputPathError(f"{option} {path}: is not a file name")
    folder = path.parent
    if not folder.exists() and not create_folders:
        raise OutputPathError(f"{option} {path}: its folder {folder} does not exist")
    _check_writable(option, path, folder, "its folder ")


def _check_folder(option: str, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option} {folder}: is a file, not a folder")
    _check_writable(option, folder, folder, "")


def _check_writable(option: str, path: Path, folder: Path, which: str) -> None:
    """Create `folder` if missing, create and remove a file in it, remove what was created."""
    created: list[Path] = []
    try:
        missing = []
        ancestor = folder
        while not ancestor.exists():
            if ancestor.is_symlink():
                raise OutputPathError(f"{option} {path}: {ancestor} is a broken symbolic link")
            missing.append(ancestor)
            if ancestor.parent == ancestor:
                break
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder")
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:
                continue  # made meanwhile by someone else: not ours to remove
            except OSError as e:
                raise OutputPathError(f"{option} {path}: cannot create the folder {new} ({_reason(e)})") from None
            created.append(new)
        probe = folder / f".framepack-write-test-{secrets.token_hex(6)}"
        try:
            with open(probe, "xb") as handle:
                handle.write(b"\0")
        except OSError as e:
            where = f"{which}{folder}" if which else "the folder"
            raise OutputPathError(f"{option} {path}: cannot write in {where} ({_reason(e)})") from None
        try:
            probe.unlink()
        except OSError:
            pass
    finally:
        for new in reversed(created):
            try:
                new.rmdir()
            except OSError:
                pass


def _fallback_folders(folders: Iterable[Path | str] | None, exclude: Path) -> list[Path]:
    candidates = default_fallback_dirs() if folders is None else [Path(folder) for folder in folders]
    seen = {_key(exclude)}
    unique = []
    for folder in candidates:
        key = _key(folder)
        if key not in seen:
            seen.add(key)
            unique.append(folder)
    return unique


def _key(folder: Path) -> str:
    try:
        return str(folder.resolve())
    except OSError:
        return str(folder.absolute())


def _unique_name(path: Path) -> str:
    stem = path.stem or "video"
    suffix = path.suffix or ".mp4"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}{suffix}"


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
