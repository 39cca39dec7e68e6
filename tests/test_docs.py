"""README.md and docs/*.md: every relative link names a file that exists, and every #anchor a heading in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images
FENCE = re.compile(r"^ *(```|~~~).*?^ *\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
SHELL_FENCE = re.compile(r"^ *```(?:bash|sh)\n(.*?)^ *```", re.S | re.M)
INLINE_COMMAND = re.compile(r"`(advface [a-z][a-z-]*\s[^`]*--[^`]*)`")  # with an option: a command to paste


def _prose(text: str) -> str:
    """The page without its fenced blocks and inline code, where brackets are not links."""
    return CODE.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def test_pages_exist_and_have_links():
    assert (ROOT / "docs" / "ALGORITHM.md") in PAGES and len(PAGES) >= 7
    assert all(links(page) for page in PAGES if page.name != "ALGORITHM.md")


def test_anchor_slugs_follow_github():
    text = "# A b\n## The guard's cost (issue 18)\n```\n# not a heading\n```\n## A b\n### `check_fit(z)`\n"
    assert anchors(text) == {"a-b", "the-guards-cost-issue-18", "a-b-1", "check_fitz"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def command_lines(text: str) -> list[str]:
    """The ``advface`` commands of a page: in its bash blocks (continuation lines joined, comments dropped, one
    entry per command of a ``&&`` or ``;`` chain), then in its inline code where one is given with options."""
    out = []
    for block in SHELL_FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|;", line.split(" #")[0]):
                if command.strip().startswith("advface "):
                    out.append(command.strip())
    return out + [" ".join(c.split()) for c in INLINE_COMMAND.findall(FENCE.sub("", text))]


def test_command_lines_are_found_in_bash_blocks_and_inline_commands_with_options():
    text = ("```bash\nadvface demo --threads 1   # a comment\npip install x && advface eval \\\n  --scale tiny\n```\n"
            "`advface protect` and `advface eval --scale\nmedium` and `advface COMMAND --help`\n"
            "```python\nadvface = 1\n```\n")
    assert command_lines(text) == ["advface demo --threads 1", "advface eval    --scale tiny",
                                   "advface eval --scale medium"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documented_commands_parse(page: Path):
    """Every command a page shows (``command_lines``) takes the options it is shown with: pasted, it does not
    stop at its parser."""
    import shlex

    from advface_engine.cli import build_parser

    refused = []
    for command in command_lines(page.read_text()):
        argv = shlex.split(command)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as stop:  # --help and --version exit 0, an unknown option 2
            if stop.code:
                refused.append(command)
    assert not refused, f"{page.relative_to(ROOT)}: the parser refuses {refused}"
