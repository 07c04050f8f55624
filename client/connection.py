"""Where the server is and how to reach it: address, optional TLS, patience.

Connecting and asking whether the model is ready are idempotent, so they are retried
with exponential backoff for up to `connect_timeout_s`: a server that is starting or
restarting after its model process died (framepack_server/supervisor.py) is waited
for. A generation request is not retried — it is expensive, and whether to resend it
is the caller's decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from framepack_wire import MODEL_NAME

FIRST_RETRY_S = 0.25
MAX_RETRY_S = 4.0
# One readiness question; a server that accepts the connection but never answers counts
# as not ready rather than blocking the client.
READY_CALL_TIMEOUT_S = 10.0


class Unreachable(Exception):
    """No ready server at the endpoint within its connect timeout."""


@dataclass(frozen=True)
class Endpoint:
    """A FramePack server's gRPC address; TLS when `ssl` (the files are PEM)."""

    address: str
    ssl: bool = False
    root_certificates: Path | None = None  # CA that signed the server's certificate (default: system CAs)
    private_key: Path | None = None  # the client's own key and certificate, for servers that ask for one
    certificate_chain: Path | None = None
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
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

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(
            self.address,
            ssl=self.ssl,
            root_certificates=_optional_str(self.root_certificates),
            private_key=_optional_str(self.private_key),
            certificate_chain=_optional_str(self.certificate_chain),
        )


def as_endpoint(server: str | Endpoint) -> Endpoint:
    return server if isinstance(server, Endpoint) else Endpoint(server)


def ready_client(
    endpoint: Endpoint, sleep: Callable[[float], None] = time.sleep
) -> grpcclient.InferenceServerClient:
    """A client whose server answers that the model is ready, after retries with backoff.

    Raises Unreachable naming the address, the attempts and the last answer.
    """
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
        sleep(delay)
        delay = min(2 * delay, MAX_RETRY_S)


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(path)
