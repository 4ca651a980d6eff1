"""The README and docs/ stay true: the commands they name exist, their links resolve, every page is one
click from the README, no page repeats another, the tests the guarantees name exist, and the generated
tables are what `make docs` writes."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ROOT

from sdmme.tools import docs

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INDENTED = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)  # an indented code block (after a blank line)
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MAKE = re.compile(r"(?<![\w./-])make((?:[ \t]+[a-z][a-z0-9-]*)+)")
PYTHON_M = re.compile(r"(?<![\w-])python3?[ \t]+-m[ \t]+([A-Za-z_][\w.]*)")


def split(text: str) -> tuple[list[str], str]:
    """A page's code (fenced and indented blocks, inline spans) and its prose with the code taken out."""
    code = [m.group(0) for m in FENCE.finditer(text)]
    prose = FENCE.sub("\n", text)
    code += [m.group(0) for m in INDENTED.finditer(prose) if prose.endswith("\n\n", 0, m.start())]
    code += [m.group(2) for m in SPAN.finditer(prose)]
    return code, SPAN.sub("CODE", prose)


def commands(pattern: re.Pattern) -> dict[str, set[str]]:
    """What each page names in its code: shell comments in blocks are prose, not commands."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        for code in split(page.read_text())[0]:
            for line in code.splitlines():
                line = re.sub(r"(^|\s)#.*", "", line)
                for match in pattern.finditer(line):
                    found.setdefault(match.group(1).strip(), set()).add(page.relative_to(ROOT).as_posix())
    return found


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"^([A-Za-z0-9_./$()%-][^:=#\t]*?)\s*&?::?(?!=)", line)
        if rule:
            targets.update(rule.group(1).split())
    return targets


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        found.add(f"{base}-{counts[base]}" if counts.get(base) else base)  # a second one gets -1
        counts[base] = counts.get(base, 0) + 1
    return found


def links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(split(page.read_text())[1])]


def test_the_docs_are_found():
    """What the tests below read is there (they would pass on an empty tree)."""
    assert len(PAGES) >= 10 and len(README.read_text().splitlines()) < 200
    assert {"test", "demo", "package", "mme", "deploy"} <= set(commands(MAKE))
    assert {"client", "sdmme.tools.weights"} <= set(commands(PYTHON_M))
    assert sum(len(links(page)) for page in PAGES) > 40
    assert {"wire-contract", "gen_args", "client"} <= anchors(ROOT / "docs/serving.md")


def test_every_make_target_named_exists():
    targets = makefile_targets()
    assert {"test", "docs", "venv"} <= targets, "the Makefile's rules were not read"
    missing = {
        f"make {named} (in {', '.join(sorted(pages))}): no target {target}"
        for named, pages in commands(MAKE).items()
        for target in named.split()
        if target not in targets
    }
    assert not missing, "\n".join(sorted(missing))


def test_every_python_module_named_answers_help():
    def help_of(module: str) -> tuple[str, subprocess.CompletedProcess]:
        run = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        return module, run

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(help_of, sorted(commands(PYTHON_M))))
    wrong = [
        f"python -m {module} --help: exit {run.returncode}\n{run.stdout[-500:]}{run.stderr[-2000:]}"
        for module, run in answers
        if run.returncode != 0 or "usage:" not in run.stdout
    ]
    assert not wrong, "\n\n".join(wrong)


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            name = f"{page.relative_to(ROOT)}: ({target})"
            if not where.is_relative_to(ROOT) or not where.exists():
                broken.append(f"{name}: no {path}")
            elif anchor and (where.suffix != ".md" or anchor not in anchors(where)):
                broken.append(f"{name}: no heading #{anchor} in {where.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_every_page_is_one_click_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_no_page_repeats_another():
    """A sentence-length line of prose stands in one page only (tables and code may quote commands)."""
    where: dict[str, set[str]] = {}
    for page in PAGES:
        for line in split(page.read_text())[1].splitlines():
            line = line.strip().lstrip("-*> ").strip()
            if len(line) >= 60 and not line.startswith(("|", "#", "<!--")):
                where.setdefault(line, set()).add(page.relative_to(ROOT).as_posix())
    repeated = {line: sorted(pages) for line, pages in where.items() if len(pages) > 1}
    assert not repeated, "\n".join(f"{pages}: {line}" for line, pages in repeated.items())


def test_every_test_the_guarantees_name_exists():
    named, missing = 0, []
    for row in (ROOT / "docs/guarantees.md").read_text().splitlines():
        module = None
        for span in re.findall(r"`([^`]+)`", row.partition(" | ")[2] if row.startswith("| ") else ""):
            test = re.fullmatch(r"(test_\w+\.py)?(?:::(\w+)(?:\[.*\])?)?", span)
            if not test or not (test.group(1) or module):
                continue
            module = test.group(1) or module
            source = ROOT / "tests" / module
            named += 1
            if not source.exists() or (test.group(2) and f"def {test.group(2)}(" not in source.read_text()):
                missing.append(span if test.group(1) else f"{module}{span}")
    assert named > 30, "the guarantees' tests were not read"
    assert not missing, f"guarantees name tests that do not exist: {missing}"


def test_the_generated_tables_are_what_make_docs_writes():
    pages = docs.render(ROOT)
    assert {p.relative_to(ROOT).as_posix() for p in pages} == {page for page, _ in docs.TABLES.values()}
    stale = [p.relative_to(ROOT).as_posix() for p, text in pages.items() if p.read_text() != text]
    assert not stale, f"generated tables are stale in {stale}: run `make docs` and commit them"


def test_a_page_that_lost_its_markers_is_named(tmp_path: Path):
    page, _ = docs.TABLES["metrics"]
    (tmp_path / "docs").mkdir()
    for name, _ in docs.TABLES.values():
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / page).write_text((ROOT / page).read_text().replace("<!-- metrics:end -->", ""))
    with pytest.raises(ValueError, match=f"{page} must hold <!-- metrics:begin --> ... <!-- metrics:end -->"):
        docs.render(tmp_path)
