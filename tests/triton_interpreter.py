"""Run a test module's Triton cases on the CPU in a child process started with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET once, when triton is first imported (torch imports it early), so it
cannot be switched on inside the test process. A test module defines `INTERPRETER_CASES`
{test name: (case, args)} and `_case_<case>(*args)` functions that assert; `interpreter_results`
runs them all in one child and returns {test name: "ok" or what failed}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_cases(namespace: dict[str, Any], cases: dict[str, tuple[str, tuple]], unavailable: str | None) -> dict[str, str]:
    """In the child: run every case, one failure never hiding the others."""
    import torch

    torch.set_num_threads(2)
    if unavailable is not None:
        return {name: unavailable for name in cases}
    results = {}
    for name, (case, args) in cases.items():
        torch.manual_seed(0)
        try:
            namespace[f"_case_{case}"](*args)
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001  (reported per case)
            results[name] = f"{type(e).__name__}: {e}"
    return results


def interpreter_results(module: str, entry: str = "run_interpreter_cases") -> dict[str, str]:
    """In the test process: `module.entry()` run in a TRITON_INTERPRET=1 child; its results."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1])\n"
        f"from {module} import {entry}\n"
        f"print('RESULTS=' + json.dumps({entry}()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS=")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULTS="))


