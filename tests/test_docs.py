"""The README and docs/ point at things that exist: relative links (files and heading anchors) and
the result files they quote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_RESULT = re.compile(r"benchmarks/results/[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            out.add(slug(m.group(1)))
    return out


def test_slug_matches_githubs_rule_on_known_headings():
    # Hand-checked against GitHub's rendering of headings of this kind.
    assert slug("Re-rank: analysis and changes between leases") == "re-rank-analysis-and-changes-between-leases"
    assert slug("What `make demo` does, and what it measured") == "what-make-demo-does-and-what-it-measured"
    assert slug("Multi-GPU training and fault handling") == "multi-gpu-training-and-fault-handling"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_reach_a_file_and_heading(page):
    assert page.exists()
    bad = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_result_files_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = set()
    for m in _RESULT.finditer(text):
        if text[m.end():m.end() + 1] in ("<", "{"):
            continue  # a pattern (`kernels-<device>.json`, `scenario-2.{json,md}`), not one file
        path = m.group(0).rstrip(".")
        if not (ROOT / path).exists():
            missing.add(path)
    assert not missing, f"{page.name} quotes result files that are not there: {sorted(missing)}"
