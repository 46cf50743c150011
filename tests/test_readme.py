"""The Python examples of README.md and of the docs/ pages run as they are, and their relative links lead to files
that exist (and, for a link into a Markdown page with an anchor, to one of its headings)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Every page: README first, then the docs/ pages.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_readme_has_a_python_example():
    assert python_blocks(README), "README has no python example"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_examples_run(page, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for code in python_blocks(page):
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "loss" in out.stdout


def test_the_docs_pages_are_all_linked_from_the_readme():
    linked = {(README.parent / target).resolve() for _, target, _ in links(README)}
    assert [p.name for p in PAGES[1:]] and all(p.resolve() in linked for p in PAGES[1:])


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def links(page: Path) -> list[tuple[str, str, str]]:
    """(text, file, anchor) of each relative link of the page, outside code."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    found = []
    for label, target in re.findall(r"\[([^\]]*)\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        found.append((label, file, anchor))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings_that_exist(page):
    bad = []
    for label, file, anchor in links(page):
        target = (page.parent / file).resolve() if file else page
        if not target.exists():
            bad.append(f"[{label}]({file}): no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"[{label}]({file}#{anchor}): no such heading in {target.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_the_link_check_sees_a_dead_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n[ok](page.md#a-page) [dead](missing.md) [bad anchor](page.md#nope)\n"
                    "`[in code](missing.md)` [web](https://example.com)\n")
    assert links(page) == [("ok", "page.md", "a-page"), ("dead", "missing.md", ""), ("bad anchor", "page.md", "nope")]
    assert anchors(page) == {"a-page"}
    assert slug("Comparing the methods: `selpo compare`") == "comparing-the-methods-selpo-compare"


def set_options(page: Path) -> list[str]:
    """The ``key=value`` of every ``--set`` in the page's code blocks."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.S)
    return [item for block in blocks for item in re.findall(r"--set\s+(\S+)", block)]


@pytest.mark.parametrize("page", [p for p in PAGES if set_options(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_commands_set_options_selpo_takes(page):
    """Each `--set key=value` a page's commands show names an option and a value selpo accepts (the README's LoRA
    and report_to line among them), as `selpo run` checks them before any work."""
    from selpo.config import RunConfig, apply_overrides

    for item in set_options(page):
        apply_overrides(RunConfig(), [item])
    with pytest.raises(ValueError, match="lora_rnk"):
        apply_overrides(RunConfig(), ["train.lora_rnk=16"])
