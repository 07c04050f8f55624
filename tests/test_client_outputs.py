"""Output paths checked before a job, and the final video never lost to a failed write.

These tests run as root too, where permission bits are ignored: unwritable places are a
path under a regular file (no folder can exist there), /proc (no files can be created
there, even by root), /dev/null (not a regular file), or a monkeypatched `open`. The one
test with a read-only folder (chmod 555) expects whatever a real write there does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import av
import numpy as np
import pytest

from client import outputs
from client.outputs import (
    OutputPathError,
    SavedFile,
    VideoWriteError,
    check_output_paths,
    write_file_safely,
    write_video_safely,
)
from client.video import write_mp4

needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


def frames(count: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:32, 0:48]
    return np.stack([np.stack([x * 5 + t, y * 7, np.full_like(x, 90)], -1) for t in range(count)]).astype(np.uint8)


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(OutputPathError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ValueError)
    assert caught.value.__cause__ is None
    return message


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- check_output_paths ------------------------------------------------------------------


def test_writable_paths_pass_and_leave_nothing_behind(tmp_path):
    (tmp_path / "existing.mp4").write_bytes(b"old")
    check_output_paths(tmp_path / "existing.mp4")
    check_output_paths(tmp_path / "new.mp4", tmp_path / "sections", tmp_path / "deep" / "previews")
    check_output_paths(tmp_path / "not" / "yet" / "there.mp4")  # the writer creates folders
    check_output_paths(tmp_path / "video.mkv")  # any name: the writer writes MP4 regardless
    assert listing(tmp_path) == ["existing.mp4"]
    assert (tmp_path / "existing.mp4").read_bytes() == b"old"


def test_output_naming_a_folder(tmp_path):
    message = one_line_error(check_output_paths, tmp_path)
    assert message == f"--output {tmp_path}: is a folder; give a file name, e.g. {tmp_path / 'video.mp4'}"


def test_output_under_a_regular_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    message = one_line_error(check_output_paths, blocker / "out.mp4")
    assert message == f"--output {blocker / 'out.mp4'}: {blocker} is a file, not a folder"
    message = one_line_error(check_output_paths, blocker / "a" / "b" / "out.mp4")
    assert message.endswith(f": {blocker} is a file, not a folder")


def test_output_that_is_not_a_regular_file():
    message = one_line_error(check_output_paths, "/dev/null")
    assert message == "--output /dev/null: is not a regular file (a device, pipe or socket)"


def test_missing_output_folder_when_folders_are_not_created(tmp_path):
    path = tmp_path / "typo" / "out.mp4"
    message = one_line_error(check_output_paths, path, create_folders=False)
    assert message == f"--output {path}: its folder {tmp_path / 'typo'} does not exist"


@needs_proc
def test_unwritable_places_even_for_root():
    message = one_line_error(check_output_paths, "/proc/out.mp4")
    assert message.startswith("--output /proc/out.mp4: cannot write in its folder /proc (")
    message = one_line_error(check_output_paths, "/proc/framepack/out.mp4")
    assert message.startswith("--output /proc/framepack/out.mp4: cannot create the folder /proc/framepack (")
    message = one_line_error(check_output_paths, None, save_previews="/proc/previews")
    assert message.startswith("--save-previews /proc/previews: cannot create the folder /proc/previews (")


def test_sections_and_previews_folders(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    message = one_line_error(check_output_paths, tmp_path / "out.mp4", save_sections=blocker)
    assert message == f"--save-sections {blocker}: is a file, not a folder"
    message = one_line_error(check_output_paths, tmp_path / "out.mp4", save_previews=blocker / "previews")
    assert message == f"--save-previews {blocker / 'previews'}: {blocker} is a file, not a folder"
    assert listing(tmp_path) == ["file"]


def test_a_folder_that_refuses_files(tmp_path, monkeypatch):
    # A read-only mount or a folder root cannot write either: simulated at the write itself.
    real_open = open

    def refusing_open(file, mode="r", *args, **kwargs):
        if "x" in mode and Path(file).parent == tmp_path / "sections":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(outputs, "open", refusing_open, raising=False)
    (tmp_path / "sections").mkdir()
    message = one_line_error(check_output_paths, tmp_path / "out.mp4", save_sections=tmp_path / "sections")
    assert message == f"--save-sections {tmp_path / 'sections'}: cannot write in the folder (Permission denied)"


def test_read_only_permission_bits_agree_with_a_real_write(tmp_path):
    # Root writes through mode 555, anyone else cannot: the check must agree with reality,
    # not with os.access or the permission bits.
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            (folder / "probe").write_bytes(b"")
            (folder / "probe").unlink()
            writable = True
        except PermissionError:
            writable = False
        if writable:
            check_output_paths(folder / "out.mp4")
        else:
            message = one_line_error(check_output_paths, folder / "out.mp4")
            assert message == f"--output {folder / 'out.mp4'}: cannot write in its folder {folder} (Permission denied)"
        assert listing(folder) == []
    finally:
        folder.chmod(0o755)


# --- write_video_safely ------------------------------------------------------------------


def test_the_requested_path_when_it_works(tmp_path):
    saved = write_video_safely(tmp_path / "out.mp4", frames(), 30, None, write_mp4)
    assert saved == SavedFile(tmp_path / "out.mp4", None) and not saved.fell_back
    assert frame_count(saved.path) == 3


def test_an_unwritable_path_falls_back_and_says_where(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    requested = blocker / "out.mp4"
    saved = write_video_safely(requested, frames(4), 30, 20, write_mp4, fallback_dirs=[fallback])
    assert saved.fell_back and saved.path.parent == fallback
    assert saved.path.name.startswith("out-") and saved.path.suffix == ".mp4"
    assert frame_count(saved.path) == 4
    assert saved.message.startswith(f"could not write {requested} (")
    assert saved.message.endswith(f"; the video was saved to {saved.path} instead") and "\n" not in saved.message
    assert listing(fallback) == [saved.path.name]  # the atomic writer left no temporary file


def test_default_fallback_is_the_current_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert outputs.default_fallback_dirs()[0] == here
    saved = write_video_safely(blocker / "out.mp4", frames(), 30, None, write_mp4)
    assert saved.path.parent == here and frame_count(saved.path) == 3


def test_the_fallback_names_are_unique(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    paths = {write_video_safely(blocker / "v.mp4", frames(1), 30, None, write_mp4, fallback_dirs=[tmp_path]).path
             for _ in range(3)}
    assert len(paths) == 3 and all(path.exists() for path in paths)


def test_a_write_that_fails_late_is_retried_elsewhere_with_the_same_frames(tmp_path):
    calls = []

    def writer(path, video, fps, crf):
        calls.append((Path(path), video, fps, crf))
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        Path(path).write_bytes(b"mp4")
        return path

    video = frames()
    saved = write_video_safely(tmp_path / "full" / "out.mp4", video, 24, 18, writer, fallback_dirs=[tmp_path])
    assert saved.message == (f"could not write {tmp_path / 'full' / 'out.mp4'} (No space left on device); "
                             f"the video was saved to {saved.path} instead")
    assert [call[0] for call in calls] == [tmp_path / "full" / "out.mp4", saved.path]
    assert all(call[1] is video and call[2:] == (24, 18) for call in calls)


def test_the_requested_folder_is_not_retried_as_a_fallback(tmp_path):
    tried = []

    def writer(path, *_):
        tried.append(Path(path).parent)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with pytest.raises(VideoWriteError) as caught:
        write_video_safely(tmp_path / "out.mp4", frames(), 30, None, writer, fallback_dirs=[tmp_path, tmp_path / "b"])
    assert tried == [tmp_path, tmp_path / "b"]
    message = str(caught.value)
    assert message == (f"could not write {tmp_path / 'out.mp4'} (Read-only file system), nor a copy elsewhere "
                       f"({tmp_path / 'b'}: Read-only file system)")


def test_interrupts_are_not_swallowed(tmp_path):
    def writer(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video_safely(tmp_path / "out.mp4", frames(), 30, None, writer, fallback_dirs=[tmp_path / "b"])


def test_write_file_safely_for_other_files(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    saved = write_file_safely(blocker / "preview.png", lambda path: Path(path).write_bytes(b"png"),
                              fallback_dirs=[tmp_path], what="preview")
    assert saved.path.parent == tmp_path and saved.path.read_bytes() == b"png"
    assert saved.path.name.startswith("preview-") and saved.path.suffix == ".png"
    assert "the preview was saved to" in saved.message


def test_a_path_that_cannot_even_be_looked_at(tmp_path, monkeypatch):
    def refusing_is_dir(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "is_dir", refusing_is_dir)
    message = one_line_error(check_output_paths, tmp_path / "out.mp4")
    assert message == f"--output {tmp_path / 'out.mp4'}: cannot be checked (Permission denied)"
