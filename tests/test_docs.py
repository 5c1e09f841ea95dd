"""The user-facing docs' relative links land: every file exists and every #anchor names a
heading there (GitHub's anchor rule). The README and docs/ point into each other's sections
by anchor, and a renamed heading otherwise breaks them silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            slug = github_anchor(m.group(1))
            seen[slug] = seen.get(slug, 0) + 1
    return {s if n == 0 else f"{s}-{n}" for s, count in seen.items() for n in range(count)}


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link outside code blocks."""
    out, code = [], False
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            code = not code
        elif not code:
            out += [(i, t) for t in LINK.findall(line) if not t.startswith(("http://", "https://", "mailto:"))]
    return out


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("The image score read at two scales: `local.score_sigma` (the default now)") == \
        "the-image-score-read-at-two-scales-localscore_sigma-the-default-now"
    assert github_anchor("On parts nobody here made (`../shared/data/parts`)") == "on-parts-nobody-here-made-shareddataparts"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_land(doc: Path):
    broken = []
    for line, target in links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path) if path else doc
        if not dest.exists():
            broken.append(f"{doc.name}:{line}: no file {target}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{doc.name}:{line}: no heading for #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)
