"""The documentation stays true: links resolve, every command and option is documented, examples run.

Checked files: README.md, docs/*.md and benchmarks/README.md.

* Every relative link (and image) points to an existing file, and a ``#fragment`` to a heading of that
  file (GitHub's slugs) or an HTML anchor.
* Every ``tl-embed`` command the CLI's parser registers has a ``## `tl-embed NAME` `` section in
  docs/commands.md naming each of its long options.
* README.md carries the test command ``.ci/run`` runs, verbatim.
* Every ```python block runs: per file, in order, in one fresh interpreter, in a folder holding
  ``photos/cats/*.jpg`` and ``photos/dogs/*.jpg``, with the genuine weights from ../shared/weights.
  A block is skipped only after a ``<!-- not run: REASON -->`` line directly before it, and there may be
  at most 3 of those in all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import ROOT, make_image

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"])
COMMANDS_MD = ROOT / "docs" / "commands.md"
MAX_NOT_RUN = 3

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*\S.*-->\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SECTION = re.compile(r"^## `tl-embed ([a-z][a-z-]*)`\s*$")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------- parsing
def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)[0] * len(m.group(2))
            continue
        if fence is not None:
            if m and m.group(2).startswith(fence) and not m.group(3).strip():
                fence = None
            continue
        out.append((n, re.sub(r"(`+)(?:(?!\1).)+?\1", lambda c: " " * len(c.group(0)), line)))
    return out


def code_blocks(text: str) -> list[tuple[int, str, str, str]]:
    """(line of the opening fence, info string, code, the line before the fence) of every fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close.group(2).startswith(fence[0] * len(fence)) and not close.group(3).strip():
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        blocks.append((i + 1, info, "\n".join(body) + "\n", lines[i - 1] if i else ""))
        i = j + 1
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link may name in a Markdown file: heading slugs (-1, -2 for repeats) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines_with_code(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def prose_lines_with_code(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced blocks, inline code kept (headings keep their backticked words)."""
    inside = {n for n, _ in prose_lines(text)}
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if n in inside]


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        found += [(n, target) for target in LINK.findall(line)]
        m = REF_DEF.match(line)
        if m:
            found.append((n, m.group(1)))
    return found


# ------------------------------------------------------------------ links
def test_the_checked_files_exist():
    names = {rel(p) for p in DOCS}
    for required in ("README.md", "docs/index.md", "docs/commands.md", "docs/store.md", "docs/service.md",
                     "docs/performance.md", "benchmarks/README.md"):
        assert required in names and (ROOT / required).is_file(), f"{required} is missing"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_point_to_existing_files_and_headings(doc):
    broken = []
    for line, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / unquote(file_part)).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{rel(doc)}:{line}: {target}: no such file {dest}")
            continue
        if fragment and dest.suffix == ".md" and unquote(fragment) not in anchors(dest):
            broken.append(f"{rel(doc)}:{line}: {target}: {rel(dest)} has no heading with anchor #{fragment}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slugs_follow_github():
    assert slug("Test-time augmentation: `--tta flip`") == "test-time-augmentation---tta-flip"
    assert slug("`tl-embed export-model`") == "tl-embed-export-model"
    assert slug("embed_scale.py") == "embed_scalepy"
    assert slug("Runtimes: how the backbone runs") == "runtimes-how-the-backbone-runs"


def test_readme_links_to_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
            assert f"({page.name}" in index, f"docs/index.md does not link {page.name}"
    assert "(docs/python-api.md)" in readme and "(python-api.md)" in index


def test_readme_stays_short_and_shows_python():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md is over 200 lines: move details to docs/"
    parts = text.split("\n## Python\n", 1)
    assert len(parts) == 2, "README.md has no '## Python' section"
    section = parts[1].split("\n## ", 1)[0]
    assert "```python" in section, "README.md's Python section has no example (the examples test runs it)"
    assert "(docs/python-api.md)" in section, "README.md's Python section does not link docs/python-api.md"


# --------------------------------------------------------------- commands
def cli_commands() -> dict[str, argparse.ArgumentParser]:
    from tl_embed.cli.main import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1, "the tl-embed parser should have one set of sub-commands"
    return dict(subs[0].choices)


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({s for a in parser._actions for s in a.option_strings
                   if s.startswith("--") and s != "--help" and a.help != argparse.SUPPRESS})


def command_sections() -> dict[str, str]:
    """docs/commands.md's ``## `tl-embed NAME` `` sections: name -> their text (code blocks included)."""
    text = COMMANDS_MD.read_text(encoding="utf-8")
    starts = {n for n, line in prose_lines_with_code(text) if line.startswith("## ")}
    sections: dict[str, list[str]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        if n in starts:
            m = SECTION.match(line)
            current = m.group(1) if m else None
            if current:
                assert current not in sections, f"docs/commands.md has two sections for `tl-embed {current}`"
                sections[current] = []
        elif current:
            sections[current].append(line)
    return {name: "\n".join(lines) + "\n" for name, lines in sections.items()}


def test_every_command_has_a_section_with_an_example():
    commands, sections = cli_commands(), command_sections()
    missing = sorted(set(commands) - set(sections))
    assert not missing, f"docs/commands.md has no '## `tl-embed NAME`' section for: {', '.join(missing)}"
    unknown = sorted(set(sections) - set(commands))
    assert not unknown, f"docs/commands.md documents commands the CLI does not have: {', '.join(unknown)}"
    for name, text in sections.items():
        examples = [code for _, info, code, _ in code_blocks(text) if info in ("bash", "sh", "console", "")]
        assert any(re.search(rf"(^|\s)tl-embed {re.escape(name)}(\s|$)", code, re.M) for code in examples), \
            f"docs/commands.md: the section of `tl-embed {name}` has no example running it"


def test_every_long_option_is_documented_in_its_command_section():
    sections = command_sections()
    missing = []
    for name, parser in cli_commands().items():
        text = sections.get(name, "")
        for option in long_options(parser):
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                missing.append(f"tl-embed {name} {option}")
    assert not missing, "docs/commands.md does not document:\n" + "\n".join(missing)


def test_readme_command_table_lists_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [n for n in cli_commands() if not re.search(rf"^\| `tl-embed {re.escape(n)}[ `]", readme, re.M)]
    assert not missing, f"README.md's command table lacks: {', '.join(missing)}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marker = next(i for i, line in enumerate(ci) if "the README's test command, verbatim" in line)
    command = ci[marker + 1].strip()
    assert command, ".ci/run: no command after its README marker"
    readme_code = "".join(code for _, info, code, _ in code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
                          if info in ("bash", "sh", ""))
    assert any(line.split("#")[0].strip() == command for line in readme_code.splitlines()), \
        f"README.md's code blocks do not carry .ci/run's test command verbatim: {command}"


# ------------------------------------------------------------ python blocks
def python_blocks(doc: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(blocks to run, blocks excluded with their reason) of one Markdown file, each with its line."""
    run, skipped = [], []
    for line, info, code, before in code_blocks(doc.read_text(encoding="utf-8")):
        if info.split()[:1] != ["python"]:
            continue
        if NOT_RUN.match(before):
            skipped.append((line, before.strip()))
        else:
            run.append((line, code))
    return run, skipped


def test_at_most_three_python_blocks_are_not_run():
    skipped = [f"{rel(doc)}:{line} {why}" for doc in DOCS for line, why in python_blocks(doc)[1]]
    assert len(skipped) <= MAX_NOT_RUN, f"more than {MAX_NOT_RUN} python blocks are excluded:\n" + "\n".join(skipped)


RUNNER = textwrap.dedent("""
    import json, sys, traceback
    blocks = json.load(open(sys.argv[1], encoding="utf-8"))
    scope = {"__name__": "__main__"}
    for i, (line, code) in enumerate(blocks):
        try:
            exec(compile(code, f"{sys.argv[2]}:{line}", "exec"), scope)
        except BaseException:
            sys.stdout.flush()
            traceback.print_exc()
            print(f"@@FAILED_BLOCK {i}", file=sys.stderr)
            sys.exit(1)
""")


@pytest.fixture(scope="module")
def example_cache(tmp_path_factory) -> Path:
    """One converted-model cache for every file's examples: the backbone converts once."""
    return tmp_path_factory.mktemp("docs_tl_embed_cache")


def photos_folder(root: Path) -> None:
    """photos/cats and photos/dogs: 8 generated images each, of distinct colours."""
    for i in range(8):
        make_image(root / "photos" / "cats" / f"cat_{i}.jpg", (200, 120, 60), i, size=(64, 48))
        make_image(root / "photos" / "dogs" / f"dog_{i}.jpg", (60, 90, 200), 100 + i, size=(64, 48))


DOCS_WITH_PYTHON = [doc for doc in DOCS if python_blocks(doc)[0]]


@pytest.mark.skipif(not DOCS_WITH_PYTHON, reason="no python blocks in the docs")
@pytest.mark.parametrize("doc", DOCS_WITH_PYTHON, ids=rel)
def test_python_examples_run(doc, tmp_path, keras_home, example_cache):
    blocks, _ = python_blocks(doc)
    work = tmp_path / "work"
    work.mkdir()
    photos_folder(work)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    env = {**os.environ, "KERAS_HOME": str(keras_home), "TL_EMBED_CACHE": str(example_cache),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                    os.environ.get("PYTHONPATH")])),
           # `tl-embed` as the examples call it: this interpreter's environment first
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json"), rel(doc)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        failed = re.search(r"@@FAILED_BLOCK (\d+)", proc.stderr)
        line, code = blocks[int(failed.group(1))] if failed else (0, "(before any block ran)")
        pytest.fail(f"{rel(doc)}: the python block at line {line} failed (exit status {proc.returncode})\n"
                    f"--- block ---\n{code}--- stdout (end) ---\n{proc.stdout[-2000:]}\n"
                    f"--- stderr (end) ---\n{proc.stderr[-6000:]}", pytrace=False)
