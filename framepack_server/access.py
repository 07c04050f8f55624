"""An API key for the inference protocol, enforced by Triton itself.

Triton's restricted-protocol options (`--grpc-restricted-protocol`, `--http-restricted-api`,
both in tritonserver 2.51) refuse a request of the listed protocols unless it carries a
header with the given value. Everything but `health` is restricted, so Kubernetes probes,
load balancers and the client's readiness check still get answers without a key, while
generating, describing, model metadata and statistics need it. The client sends the key
in the `API_KEY_HEADER` header (framepack_wire).

The key comes from a file, so it is not in the shell's history. Triton takes it only on
its command line, so local users of the same machine can read it from the process list:
run the server where that is nobody (a container, a dedicated host). The launcher's log
shows the command with the key replaced by `***`.
"""

from __future__ import annotations

from pathlib import Path

from framepack_wire import API_KEY_HEADER

# Every protocol but `health` (the names tritonserver 2.51 allows for both endpoints).
RESTRICTED = ("metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics",
              "trace", "logging")
MIN_KEY_LENGTH = 16
HIDDEN = "***"


class ApiKeyError(ValueError):
    pass


def read_api_key(path: Path | str) -> str:
    """The key in `path` (surrounding whitespace and the final newline dropped), checked."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ApiKeyError(f"--api-key-file {path}: cannot read it ({e})") from None
    return check_api_key(key, f"--api-key-file {path}")


def check_api_key(key: str, source: str) -> str:
    """`key` if a header can carry it: at least MIN_KEY_LENGTH visible ASCII characters."""
    if len(key) < MIN_KEY_LENGTH or not all("!" <= c <= "~" for c in key):
        raise ApiKeyError(
            f"{source}: the API key is not allowed: expected at least {MIN_KEY_LENGTH} visible ASCII characters "
            "(no spaces), e.g. from `openssl rand -hex 32`"
        )
    return key


def restricted_protocol_arguments(key: str) -> list[str]:
    """tritonserver options requiring `API_KEY_HEADER: key` on gRPC and HTTP, health excepted."""
    rule = f"{','.join(RESTRICTED)}:{API_KEY_HEADER}={key}"
    return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]


def hide_api_key(command: list[str], key: str | None) -> list[str]:
    """`command` as it may be logged: the key replaced by HIDDEN."""
    return command if not key else [argument.replace(key, HIDDEN) for argument in command]
