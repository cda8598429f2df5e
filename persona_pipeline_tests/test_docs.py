"""The documentation stands alone: every relative link of every Markdown file in the repository
points to a file that exists, and a link to a heading to a heading that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    skip = {".venv", ".git", ".persona", "node_modules"}
    return sorted(p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts))


def headings(path: Path) -> set[str]:
    """GitHub's anchors of a file's headings (code blocks left out)."""
    anchors, fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"^#{1,6} (.*)$", line)):
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def broken_links(path: Path) -> list[str]:
    broken = []
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or ROOT not in [linked, *linked.parents]:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in headings(linked):
            broken.append(f"{target}: no such heading")
    return broken


def test_the_documentation_is_in_the_repository():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    expected = {"README.md", "benchmarks/README.md"}
    expected |= {f"docs/{n}.md" for n in ("architecture", "contracts", "operations", "decisions")}
    expected |= {f"docs/{n}.md" for n in ("evaluation", "configuration", "production")}
    assert expected <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_inside_the_repository(path):
    assert broken_links(path) == []


def test_a_broken_link_and_a_missing_heading_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n[ok](#title) [gone](b.md) [no heading](#nothing)\n")
    assert broken_links(tmp_path / "a.md") == [
        "b.md: no such file in the repository",
        "#nothing: no such heading",
    ]
