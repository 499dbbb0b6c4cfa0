"""Mutation testing of the paper's mathematics and the metrics (``make mutation``, docs/mutation.md).

mutmut 3 leaves every decorated function alone, and the functions that matter most here are decorated
(``@gin.configurable`` dsm_loss / dlsm_loss / total_loss, ``@torch.no_grad()`` annealed_langevin, ...). So this
script stages a copy of the project in ``.mutation/`` in which, in the files listed in pyproject's
``[tool.mutmut] only_mutate``, each module-level ``@a @b def f`` becomes ``def f`` followed by ``f = a(b(f))`` (the
same object, by the definition of decorators), runs ``mutmut run`` there, and prints a table per module. The
working tree is only read; mutants live in ``.mutation/mutants/``.

Results are kept between runs while the mutated modules are unchanged (a glob such as ``'dlsm.math.losses*'``
reruns just those mutants); a change of one of them or ``--fresh`` starts over.

    python tools/mutation.py [--fresh] [--max-children N] [--table-only] [MUTANT_GLOB ...]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKDIR = ROOT / ".mutation"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
COLUMNS = ("mutants", "killed", "survived", "timeout", "no tests", "not run", "other")


def lift_decorators(source: str) -> str:
    """``source`` with each module-level decorated function ``@a @b def f`` rewritten as ``def f`` and, after its
    body, ``f = a(b(f))``: what Python does with the decorators, in a form mutmut mutates."""
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []  # (first line, end line, replacement), 0-based, end exclusive
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.decorator_list:
            continue
        applied = node.name
        for dec in reversed(node.decorator_list):
            applied = f"{ast.get_source_segment(source, dec)}({applied})"
        first = node.decorator_list[0].lineno - 1
        edits.append((first, node.lineno - 1, ""))  # drop the decorator lines (the def line keeps its place)
        edits.append((node.end_lineno, node.end_lineno, f"{node.name} = {applied}\n"))
    for first, end, text in sorted(edits, reverse=True):
        lines[first:end] = [text] if text else []
    return "".join(lines)


def mutmut_config() -> dict:
    try:
        from tomllib import loads
    except ModuleNotFoundError:  # Python 3.10: mutmut depends on toml there
        from toml import loads
    return loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def stage(workdir: Path, fresh: bool) -> None:
    """Copies dlsm/ (decorators lifted in the mutated files), tests/ and pyproject.toml into ``workdir``; drops the
    previous mutants and results when a mutated module changed (or ``fresh``). mutmut copies the other modules into
    ``mutants/`` once: ``--fresh`` picks up their later changes."""
    to_mutate = set(mutmut_config()["only_mutate"])
    workdir.mkdir(exist_ok=True)
    for name in ("dlsm", "tests"):
        shutil.rmtree(workdir / name, ignore_errors=True)
        shutil.copytree(ROOT / name, workdir / name, ignore=IGNORE)
    shutil.copy2(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    digest = hashlib.sha256()
    for path in sorted((workdir / "dlsm").rglob("*.py")):
        rel = path.relative_to(workdir).as_posix()
        if rel in to_mutate:
            path.write_text(lift_decorators(path.read_text()))
            digest.update(rel.encode() + b"\0" + path.read_bytes())
    stamp = workdir / "staged-sources.sha256"
    if fresh or not stamp.exists() or stamp.read_text() != digest.hexdigest():
        shutil.rmtree(workdir / "mutants", ignore_errors=True)
    stamp.write_text(digest.hexdigest())


def results(workdir: Path) -> dict[str, Counter]:
    """Module -> counts of mutmut's statuses, from ``mutants/**/*.py.meta``."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, Counter] = {}
    for meta in sorted((workdir / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = meta.relative_to(workdir / "mutants").as_posix().removesuffix(".meta")
        count = Counter(status_by_exit_code[c] for c in codes.values())
        count["mutants"] = len(codes)
        out[module] = count
    return out


def survivors(workdir: Path) -> list[str]:
    from mutmut.stats import status_by_exit_code

    names = []
    for meta in sorted((workdir / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        names += [k for k, c in codes.items() if status_by_exit_code[c] in ("survived", "no tests", "suspicious")]
    return names


def table(counts: dict[str, Counter]) -> str:
    """A markdown table: per module the mutants, killed, survived, timed out, without tests, not run yet, other
    (suspicious, segfault) and the kill rate (killed + timed out) / (mutants run)."""
    rows = ["| module | " + " | ".join(COLUMNS) + " | kill rate |", "|---" * (len(COLUMNS) + 2) + "|"]
    for module, c in counts.items():
        cells = [c["mutants"], c["killed"], c["survived"], c["timeout"], c["no tests"], c["not checked"]]
        cells.append(c["mutants"] - sum(cells[1:]))
        tried = c["mutants"] - c["not checked"]
        rate = f"{100 * (c['killed'] + c['timeout']) / tried:.1f} %" if tried else "-"
        rows.append(f"| {module} | " + " | ".join(str(v) for v in cells) + f" | {rate} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("globs", nargs="*", help="mutant names or globs, e.g. 'dlsm.math.losses*' (default: all)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier mutants and results")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="print the table of the last run, run nothing")
    args = parser.parse_args(argv)
    rc = 0
    if not args.table_only:
        stage(WORKDIR, args.fresh)
        t0 = time.perf_counter()
        mutmut = Path(sys.executable).with_name("mutmut")
        with open(WORKDIR / "mutmut.log", "w") as log:  # mutmut's progress spinner: a log, not the terminal
            rc = subprocess.run([str(mutmut), "run", "--max-children", str(args.max_children), *args.globs],
                                cwd=WORKDIR, stdout=log, stderr=subprocess.STDOUT).returncode
        what = " ".join(args.globs) if len(args.globs) <= 3 else f"{len(args.globs)} mutants"
        print(f"mutmut run {what or '(all)'}: {time.perf_counter() - t0:.0f} s, exit code {rc}"
              + (" (see .mutation/mutmut.log)" if rc else ""))
    print(table(results(WORKDIR)))
    left = survivors(WORKDIR)
    if left:
        print(f"\nnot killed ({len(left)}; `cd .mutation && mutmut show NAME` shows one):")
        print("\n".join(f"  {name}" for name in left))
    return rc


if __name__ == "__main__":
    sys.exit(main())
