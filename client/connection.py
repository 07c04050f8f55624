"""Where the server is and how to reach it: address, optional TLS, patience.

Connecting and asking whether the model is ready are idempotent, so they are retried
with exponential backoff for up to `connect_timeout_s`: a server that is starting or
restarting after its model process died (framepack_server/supervisor.py) is waited
for. A generation request is not retried — it is expensive, and whether to resend it
is the caller's decision.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from framepack_wire import GRPC_API_KEY_HEADER, MODEL_NAME

# Triton's gRPC port. An address without a port would otherwise go to gRPC's own default, 443.
DEFAULT_GRPC_PORT = 8001
FIRST_RETRY_S = 0.25
MAX_RETRY_S = 4.0
# One readiness question; a server that accepts the connection but never answers counts
# as not ready rather than blocking the client.
READY_CALL_TIMEOUT_S = 10.0


class Unreachable(Exception):
    """No ready server at the endpoint within its connect timeout."""


@dataclass(frozen=True)
class Endpoint:
    """A FramePack server's gRPC address (HOST or HOST:PORT, port 8001 when none is given);
    TLS when `ssl` (the files are PEM)."""

    address: str
    ssl: bool = False
    root_certificates: Path | None = None  # CA that signed the server's certificate (default: system CAs)
    private_key: Path | None = None  # the client's own key and certificate, for servers that ask for one
    certificate_chain: Path | None = None
    connect_timeout_s: float = 30.0
    # Sent with every request (header GRPC_API_KEY_HEADER) to a server started with --api-key-file.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", with_default_port(self.address))
        timeout = self.connect_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0
        ):
            raise ValueError(f"connect timeout {timeout!r} is not allowed: expected a number of seconds > 0")
        files = {"root_certificates": self.root_certificates, "private_key": self.private_key,
                 "certificate_chain": self.certificate_chain}
        given = {name: path for name, path in files.items() if path is not None}
        if given and not self.ssl:
            raise ValueError(f"{', '.join(given)} need ssl=True (--ssl)")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("private_key and certificate_chain go together (--private-key, --certificate-chain)")
        for name, path in given.items():
            if not Path(path).is_file():
                raise ValueError(f"{name} {path}: no such file")

    def headers(self) -> dict[str, str] | None:
        """The request headers: the API key, when there is one."""
        return {GRPC_API_KEY_HEADER: self.api_key} if self.api_key else None

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(
            self.address,
            ssl=self.ssl,
            root_certificates=_optional_str(self.root_certificates),
            private_key=_optional_str(self.private_key),
            certificate_chain=_optional_str(self.certificate_chain),
        )


def with_default_port(address: str) -> str:
    """`address` with DEFAULT_GRPC_PORT added when it names only a host: "gpu-box" ->
    "gpu-box:8001", "::1" or "[::1]" -> "[::1]:8001". gRPC target URIs (unix:, dns:///, ...)
    are left as they are."""
    address = address.strip()
    if not address or "/" in address or address.startswith("unix:"):
        return address
    if address.startswith("["):  # [IPv6] or [IPv6]:port
        return address if "]:" in address else f"{address}:{DEFAULT_GRPC_PORT}"
    if address.count(":") > 1:  # a bare IPv6 address
        return f"[{address}]:{DEFAULT_GRPC_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_GRPC_PORT}"


def as_endpoint(server: str | Endpoint) -> Endpoint:
    return server if isinstance(server, Endpoint) else Endpoint(server)


def ready_client(
    endpoint: Endpoint, sleep: Callable[[float], None] = time.sleep
) -> grpcclient.InferenceServerClient:
    """A client whose server answers that the model is ready, after retries with backoff.

    Raises Unreachable naming the address, the attempts and the last answer.
    """
    attempts = connect_attempts(endpoint, sleep)
    while True:
        try:
            next(attempts)
        except StopIteration as done:
            return done.value


@dataclass(frozen=True)
class FailedAttempt:
    """One connection attempt that found no ready server; another follows after `retry_in_s`."""

    problem: str  # the server's answer, or why there was none
    waited_s: float  # since the first attempt
    retry_in_s: float
    left_s: float  # of the connect timeout


def connect_attempts(
    endpoint: Endpoint, sleep: Callable[[float], None] = time.sleep
) -> Generator[FailedAttempt, None, grpcclient.InferenceServerClient]:
    """`ready_client` step by step: yields each failed attempt before waiting for the next,
    so a front end can show the problem at once; returns the ready client (the generator's
    value) or raises Unreachable once the connect timeout is spent."""
    started = time.monotonic()
    delay = FIRST_RETRY_S
    attempts = 0
    while True:
        attempts += 1
        client = endpoint.client()
        try:
            if client.is_model_ready(MODEL_NAME, client_timeout=READY_CALL_TIMEOUT_S):
                return client
            problem = f"it has no ready model {MODEL_NAME!r}"
        except InferenceServerException as e:
            problem = e.message()
        client.close()
        waited = time.monotonic() - started
        if waited + delay > endpoint.connect_timeout_s:
            tries = f"{attempts} attempt{'s' if attempts > 1 else ''} over {waited:.1f} s"
            raise Unreachable(f"cannot reach the server at {endpoint.address} ({tries}): {problem}")
        yield FailedAttempt(problem, waited, delay, endpoint.connect_timeout_s - waited)
        sleep(delay)
        delay = min(2 * delay, MAX_RETRY_S)


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(path)
