"""Fault injection for reliability tests: make one job fail inside the engine, on purpose.

A request parameter `fault` (e.g. `"raise@3"`) makes that job raise `InjectedFault`
from within the engine, just before its 3rd model evaluation (where the engine polls its
cancel callable), so the test sees the server's real error path: the job's response,
the log, memory clean-up, and the next job.

It is honoured only when the server was started for it (`framepack-server
--fault-injection`, which sets FRAMEPACK_FAULT_INJECTION=1). Otherwise the parameter
is left in place and the settings parser refuses it like any unknown setting, so a
production server cannot be made to fail by a request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from framepack_backend.settings import SettingsError

FAULT_PARAMETER = "fault"
_FAULT_PATTERN = re.compile(r"raise@([1-9][0-9]{0,5})")


class InjectedFault(RuntimeError):
    """The failure a `fault` parameter asked for."""


@dataclass(frozen=True)
class Fault:
    raise_at_evaluation: int  # counted from 1, as the engine polls before each evaluation

    def wrap(self, cancel: Callable[[], bool]) -> Callable[[], bool]:
        """`cancel`, raising InjectedFault on the chosen poll instead of answering it."""
        polls = 0

        def cancel_or_fail() -> bool:
            nonlocal polls
            polls += 1
            if polls == self.raise_at_evaluation:
                raise InjectedFault(f"injected fault before model evaluation {polls}")
            return cancel()

        return cancel_or_fail


def take_fault(parameters: dict[str, object], enabled: bool) -> Fault | None:
    """Remove and parse the `fault` parameter when fault injection is enabled."""
    if not enabled or FAULT_PARAMETER not in parameters:
        return None
    value = parameters.pop(FAULT_PARAMETER)
    match = _FAULT_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise SettingsError(FAULT_PARAMETER, value, "'raise@N' with N >= 1 (the model evaluation to fail before)")
    return Fault(int(match.group(1)))
