"""The README and docs/ hold together: every relative link resolves, every gin file given to ``--gin`` exists, and
the README stays a five-minute read. Only reads files; no import of dlsm."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" may follow)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# --gin FILE or --gin=FILE, not --gin_param; the name ends at whitespace, a quote, a backtick, '|' or ')'
GIN_ARG = re.compile(r"--gin(?:=|[ \t]+)(?![-\s])([^\s`'\"|)]+)")
# names after --gin that are not meant to exist: placeholders and the deliberate mistakes of docs/errors.md
NOT_FILES = {"FILE", "gin", "missing.gin", "binary.gin", "operative_config.gin"}


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def gin_checked_files() -> list[Path]:
    """README.md and docs/*.md; not docs/results/, whose generated reports may quote history."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def link_targets(text: str) -> list[str]:
    """Relative link targets of a markdown text, fragments stripped; web, mail and pure-anchor links left out."""
    out = []
    for target in LINK.findall(text):
        if re.match(r"^(https?://|mailto:)", target, re.IGNORECASE) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if path:
            out.append(path)
    return out


def gin_names(text: str) -> list[str]:
    return [name for name in GIN_ARG.findall(text) if name not in NOT_FILES]


def test_link_and_gin_parsers_on_examples():
    text = (
        "[a](docs/x.md) ![b](img/y.png \"t\") [c](https://e.org) [d](mailto:a@b) [e](#top) [f](z.md#part)\n"
        "`python -m dlsm.launch --gin gin/moons.gin --gin_param 'A = 1'` --gin=gin/b.gin | --gin FILE --gin`"
    )
    assert link_targets(text) == ["docs/x.md", "img/y.png", "z.md"]
    assert gin_names(text) == ["gin/moons.gin", "gin/b.gin"]


def test_docs_exist():
    assert README.is_file()
    assert (DOCS / "architecture.md").is_file()


@pytest.mark.parametrize("md", markdown_files(), ids=_rel)
def test_relative_links_resolve(md: Path):
    missing = [t for t in link_targets(md.read_text(encoding="utf-8")) if not (md.parent / t).exists()]
    assert not missing, f"{_rel(md)}: links to missing files: {missing}"


@pytest.mark.parametrize("md", gin_checked_files(), ids=_rel)
def test_gin_files_named_exist(md: Path):
    missing = [n for n in gin_names(md.read_text(encoding="utf-8")) if not (ROOT / n).is_file()]
    assert not missing, f"{_rel(md)}: --gin names missing gin files: {missing}"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it to {MAX_README_LINES} (move detail to docs/)"
