"""Several command-line cases in one new interpreter: each case calls an entry point's ``main(argv)`` in a folder and
environment of its own and records its exit code, stderr and wall time. A fresh interpreter (no state from the
test process: MLflow's tracking URI, gin, torch's threads), whose start-up (torch, MLflow: 5-10 s on 2 cores) is
paid once for all cases instead of once per case. For errors that stop a launch before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_RUNNER = """
import contextlib, importlib, io, json, os, sys, time
{prelude}
out = []
for case in json.loads(sys.stdin.read()):
    saved = dict(os.environ)
    os.environ.update(case["env"])
    for key in case["unset"]:
        os.environ.pop(key, None)
    os.makedirs(case["cwd"], exist_ok=True)
    os.chdir(case["cwd"])
    err, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            rc = importlib.import_module(case["module"]).main(case["argv"])
        except SystemExit as stop:
            rc = stop.code
    out.append({{"rc": rc, "err": err.getvalue(), "wall_s": time.perf_counter() - t0}})
    os.environ.clear()
    os.environ.update(saved)
print("CASES " + json.dumps(out))
"""


def run_cases(cases: list[dict], *, prelude: str = "", env: dict | None = None, timeout: int = 300) -> list[dict]:
    """``cases``: dicts with ``cwd`` (created), ``argv``, optionally ``module`` (default ``dlsm.launch``), ``env``
    (set for that case) and ``unset`` (names removed for that case). ``prelude``: Python run once before the cases
    (e.g. a stand-in for a check the test data cannot pass). Returns, per case, ``{'rc', 'err', 'wall_s'}``."""
    payload = [{"cwd": str(c["cwd"]), "argv": list(c["argv"]), "module": c.get("module", "dlsm.launch"),
                "env": c.get("env", {}), "unset": c.get("unset", [])} for c in cases]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _RUNNER.format(prelude=prelude)], input=json.dumps(payload),
                          env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASES ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("CASES "))


def one_line(result: dict) -> str:
    """The one ``dlsm: error:`` line of a case that exits 2 (AssertionError with its stderr otherwise)."""
    lines = [ln for ln in result["err"].splitlines() if ln.strip()]
    assert result["rc"] == 2 and len(lines) == 1 and lines[0].startswith("dlsm: error: "), result["err"][-3000:]
    return lines[0]
