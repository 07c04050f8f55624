"""Who may use the web UI: the login a page listening beyond this machine asks for.

The page runs jobs on the server with the UI's own connection (and its API key), so
anyone who reaches the page can use the GPUs. On a loopback address only local users
reach it; on any other address `framepack ui` refuses to start without `--login-file`,
a file of `user:password` lines, and Gradio's login then guards every page and API call.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def read_logins(path: Path) -> list[tuple[str, str]]:
    """The (user, password) pairs of a login file: one `user:password` a line; blank lines
    and lines starting with # are skipped. ValueError naming the file and line otherwise."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--login-file {path}: cannot read it ({e})") from None
    logins = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        user, separator, password = text.partition(":")
        if not separator or not user or not password:
            raise ValueError(f"--login-file {path}, line {number}: expected user:password (both non-empty)")
        logins.append((user, password))
    if not logins:
        raise ValueError(f"--login-file {path}: no user:password line")
    return logins


def login_problem(host: str, login_file: Path | None) -> str | None:
    """Why the UI must not start on `host` as asked, or None."""
    if login_file is None and not is_loopback(host):
        return (f"--host {host} serves the page beyond this machine: give --login-file FILE (lines user:password) "
                "so it asks for a login")
    return None
