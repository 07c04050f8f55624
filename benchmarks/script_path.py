"""benchmarks/ off `sys.path` once a script has imported its sibling modules.

A script's own folder is first on its path, and benchmarks/kernels.py would then shadow
the `kernels` package that transformers imports when it is installed (ImportError on
`from kernels import ...`). A script that loads transformers' models calls
`leave_benchmarks_folder()` right after its sibling imports.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def leave_benchmarks_folder() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
