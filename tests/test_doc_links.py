"""Links in README.md and docs/*.md resolve: each relative link names a file that exists and, with a #fragment
into a Markdown file, one of its headings (the anchors GitHub gives them). The docs point to the generated
sections of docs/benchmarks.md instead of typing figures, so a renamed result or heading must not leave them
pointing nowhere."""

import pathlib
import re
from urllib.parse import unquote

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(path: pathlib.Path) -> str:
    """The file's text without its fenced code blocks."""
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def anchors(path: pathlib.Path) -> set:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation other than '-' and '_' dropped,
    spaces made '-', a repeated anchor numbered -1, -2, ..."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_anchors_are_githubs():
    doc = ROOT / "docs" / "benchmarks.md"
    assert "cpu-epyc-avx2-chopgrad_outcome" in anchors(doc) and "benchmark-results" in anchors(doc)
    assert "before-choosing-a-window-pychopchopgradfidelity" in anchors(ROOT / "docs" / "outcomes.md")


@pytest.mark.parametrize("doc", DOCS, ids=[doc.name for doc in DOCS])
def test_relative_links_resolve(doc):
    for target in LINK.findall(prose(doc)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (doc.parent / unquote(path)).resolve() if path else doc
        assert linked.exists(), f"{doc.name} links to {target}: no such file"
        if fragment and linked.suffix == ".md":
            assert fragment in anchors(linked), f"{doc.name} links to {target}: no such heading in {linked.name}"


def test_no_doc_copies_the_generated_figures():
    """Measured ratios ('1.45x (1.41-1.49)', as the suites' reports print them) and result tables live in the
    generated docs/benchmarks.md only; other docs link to its sections."""
    ratio = re.compile(r"\d+\.\d+x \(\d+\.\d+-\d+\.\d+")
    for doc in DOCS:
        if doc.name != "benchmarks.md":
            assert not ratio.search(prose(doc)), f"{doc.name} copies a measured ratio: link to docs/benchmarks.md"
