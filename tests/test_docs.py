"""Every relative link and #anchor in README.md and docs/*.md resolves: the file (or
directory) exists, and an anchor names a heading of the target page, spelt as GitHub spells
its heading ids. Links inside code (fenced blocks, `inline`) are not links."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence is None:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's id for a heading: the text without markup, lower case, every character but
    letters, digits, spaces, hyphens and underscores dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose(page.read_text()):
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path) -> Iterator[tuple[int, str]]:
    for n, line in prose(page.read_text()):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield n, m.group(1)


def broken(page: Path, root: Path = ROOT) -> list[str]:
    out = []
    for n, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            out.append(f"{where}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            out.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return out


def test_slugs_are_githubs():
    assert slug("Performance (measured, not promised)") == "performance-measured-not-promised"
    assert slug("ftpalg — an FTP-aware NAT gateway helper") == "ftpalg--an-ftp-aware-nat-gateway-helper"
    assert slug("`ftpalg doctor`: a [preflight](x.md)") == "ftpalg-doctor-a-preflight"
    assert slug("What is refused, and what happens then") == "what-is-refused-and-what-happens-then"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    assert not broken(page)


def test_the_readme_is_a_front_door():
    """Short, the quick start's two commands, and a link to every page of docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "./dev.sh demo" in text and "./dev.sh test" in text
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Two words\n\n[ok](#two-words) [bad](#two-word) [gone](b.md)\n"
                                   "```\n[in code](c.md)\n```\n`[inline](d.md)`\n")
    found = [b.split(": ", 1)[1] for b in broken(tmp_path / "a.md", tmp_path)]
    assert found == ["#two-word: no heading #two-word in a.md", "b.md: no such file"]

