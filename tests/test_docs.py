"""The README and docs/ hold to the repository: a short README whose index reaches every docs page,
links and file pointers that resolve to files git tracks (never to whatever a test left on disk),
`merit_lab` names that exist, a module map that names every module, a CLI reference that names
every command and option, and config and code snippets that load."""

from __future__ import annotations

import argparse
import ast
import re
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.clean_clone import is_tracked, tracked

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CLI_DOC = ROOT / "docs" / "reference" / "cli.md"
MAX_README_LINES = 150

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"\bmerit_lab(?:\.[A-Za-z_]\w*)+")
SLASHED = re.compile(r"\bmerit_lab/[\w/]*\.py\b")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)


def doc_pages() -> list[Path]:
    """Every page under docs/ (on disk: the list is built when the tests are collected; the
    link and pointer tests then hold each page to git's file list)."""
    return sorted((ROOT / "docs").rglob("*.md"))


def pages() -> list[Path]:
    return [README, *doc_pages()]


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def code(text: str) -> list[str]:
    """Every inline code span and fenced block of a page."""
    return SPAN.findall(prose(text)) + [body for _, body in FENCE.findall(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(prose(page.read_text(encoding="utf-8")))}


def links(page: Path) -> list[tuple[str, Path | None, str]]:
    """(link as written, the repository file it points to or None for an outside URL, anchor)."""
    out = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            out.append((target, None, ""))
            continue
        path, _, anchor = target.partition("#")
        out.append((target, (page.parent / path).resolve() if path else page, anchor))
    return out


# ----------------------------------------------------------------------------------- the README
def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move text to docs/ (at most 150)"


def test_every_docs_page_is_reachable_from_the_readme_index():
    """Each page under docs/ is linked from the README's "Docs" section, or from a docs index
    page (docs/**/README.md or index.md) that section reaches."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"^## Docs\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found, "the README has no '## Docs' section (the index of the docs)"
    index_links = LINK.findall(found[1])
    reached = {(README.parent / t.partition("#")[0]).resolve() for t in index_links}
    frontier = [p for p in reached if p.name in ("README.md", "index.md") and p.is_file()]
    while frontier:
        for _, target, _ in links(frontier.pop()):
            if target is not None and target not in reached:
                reached.add(target)
                if target.name in ("README.md", "index.md") and target.is_file():
                    frontier.append(target)
    pages_ = doc_pages()
    assert len(pages_) >= 10, "docs/ should hold the guides and references"
    missing = [rel(p) for p in pages_ if p.resolve() not in reached]
    assert not missing, f"docs pages the README's index does not reach: {missing}"


MAKE = re.compile(r"(?:^|[\s`])make ([a-z][\w-]*)", re.M)


def test_the_two_commands_are_make_targets():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {t for p in pages() for c in code(p.read_text("utf-8")) for t in MAKE.findall(c)}
    assert {"demo", "test"} <= named
    assert named <= targets, f"docs name make targets the Makefile lacks: {named - targets}"


# ----------------------------------------------------------------------- links and file pointers
@pytest.mark.parametrize("page", pages(), ids=rel)
def test_every_relative_link_resolves_to_a_tracked_file(page):
    bad = []
    for written, target, anchor in links(page):
        if target is None:
            continue
        try:
            path = target.relative_to(ROOT).as_posix()
        except ValueError:
            bad.append(f"{written} (outside the repository)")
            continue
        if not is_tracked(path):
            bad.append(f"{written} ({path} is not tracked)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"{written} (no heading '#{anchor}' in {path})")
    assert not bad, f"{rel(page)}: broken links: {bad}"


def _path_pointers(text: str) -> set[str]:
    """Inline code that is a repository path: starts with a tracked top-level entry, one word."""
    tops = {p.split("/")[0] for p in tracked()}
    out = set()
    for span in SPAN.findall(prose(text)):
        if re.fullmatch(r"[\w./:-]+", span) and span.split("/")[0] in tops and "/" in span:
            out.add(span.split("::")[0])
    return out


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_every_file_a_page_names_is_tracked(page):
    """`configs/x.yaml`, `merit_lab/a/b.py`, `tests/bad_inputs/`, a bare `b.py`: files a clean
    clone has, never one a test or a run makes."""
    text = page.read_text(encoding="utf-8")
    bad = sorted(p for p in _path_pointers(text) if not is_tracked(p))
    py_names = {Path(p).name for p in tracked() if p.endswith(".py")}
    for span in SPAN.findall(prose(text)):
        for name in re.findall(r"(?<![\w/.])([\w]+\.py)\b", span):
            if name not in py_names:
                bad.append(name)
    bad += [p for c in code(text) for p in SLASHED.findall(c) if not is_tracked(p)]
    assert not bad, f"{rel(page)} names files no clean clone has: {sorted(set(bad))}"


# -------------------------------------------------------------------------------- merit_lab names
def _module_file(dotted: str) -> str | None:
    path = dotted.replace(".", "/")
    for candidate in (f"{path}.py", f"{path}/__init__.py"):
        if candidate in tracked():
            return candidate
    return None


@cache
def _top_level_names(module_file: str) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """Names a module defines or imports at its top level (and its `__all__`), and each of its
    classes' members."""
    tree = ast.parse((ROOT / module_file).read_text(encoding="utf-8"))
    names, classes = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            members = set()
            for item in ast.walk(node):
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
            classes[node.name] = frozenset(members)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                    if t.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                        names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
                    if t.id == "_EXPORTS" and isinstance(node.value, ast.Dict):  # lazy re-exports
                        names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return frozenset(names), {k: v for k, v in classes.items()}


def _resolves(dotted: str) -> bool:
    """`merit_lab.a.b` is a module, or `merit_lab.a.b.Name(.member)` a name defined in one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:cut]))
        if module is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        names, classes = _top_level_names(module)
        if rest[0] not in names:
            return False
        if len(rest) > 1 and rest[0] in classes:
            return rest[1] in classes[rest[0]]
        return True
    return False


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_every_merit_lab_name_exists(page):
    """Every `merit_lab.a.b.Name` and `merit_lab/a/b.py` a page names is in today's package
    (a module moved or renamed leaves no stale pointer behind)."""
    text = page.read_text(encoding="utf-8")
    dotted = {d.rstrip(".") for d in DOTTED.findall(text)}
    bad = sorted(d for d in dotted if not _resolves(d))
    bad += sorted(p for p in set(SLASHED.findall(text)) if not is_tracked(p))
    assert not bad, f"{rel(page)} names what merit_lab does not hold: {bad}"


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_python_snippets_import_what_exists(page):
    """Every ```python block parses, and each of its `from merit_lab... import x` names exists."""
    bad = []
    for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
        if lang != "python":
            continue
        tree = ast.parse(body)  # a syntax error fails here, naming the line
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("merit_lab"):
                bad += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if not _resolves(f"{node.module}.{a.name}")
                ]
    assert not bad, f"{rel(page)}: snippets import names that do not exist: {bad}"


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_yaml_snippets_are_valid_run_configs(page):
    """Every ```yaml block is a config `RunConfig.from_dict` accepts (keys, types, ranges)."""
    from merit_lab.config.schema import RunConfig

    for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
        if lang == "yaml":
            RunConfig.from_dict(yaml.safe_load(body), where=rel(page))


# -------------------------------------------------------------------------- the architecture map
def _module_paths() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "merit_lab").rglob("*.py")
        if "__pycache__" not in p.parts
    )


def _names_module(text: str, path: str) -> bool:
    """``path`` is named by its slash path, or its dotted path as a whole word; a package's
    ``__init__.py`` also by its folder (``merit_lab/data/``) or dotted package name."""
    p = PurePosixPath(path)
    if path in text:
        return True
    if p.name == "__init__.py":
        if p.parent.name == "merit_lab":
            return False  # the package itself: only by its path
        folder = re.escape(f"{p.parent.as_posix()}/")
        if re.search(rf"{folder}(?![\w.])", text):
            return True
        p = p.parent
    dotted = re.escape(".".join(p.with_suffix("").parts))
    return re.search(rf"(?<![\w.]){dotted}(?!\.?\w)", text) is not None


def test_architecture_names_every_module():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    modules = _module_paths()
    assert len(modules) > 60
    missing = [m for m in modules if not _names_module(text, m)]
    assert not missing, f"docs/architecture.md does not name these modules: {missing}"


def test_architecture_lists_the_library_order_of_test_layers():
    """The subpackage order the page explains is the order tests/test_layers.py holds."""
    source = (ROOT / "tests" / "test_layers.py").read_text(encoding="utf-8")
    assign = next(
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "LIBRARY_ORDER"
    )
    library_order = ast.literal_eval(assign.value)
    text = ARCHITECTURE.read_text(encoding="utf-8")
    found = re.search(r"```\n(io .*?)\n```", text, re.S)
    assert found, "docs/architecture.md should show the library order in a code block"
    levels = [tuple(x.strip() for x in lvl.split()) for lvl in found[1].split("<")]
    assert levels == [tuple(lvl) for lvl in library_order]


# ---------------------------------------------------------------------------- the CLI reference
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from merit_lab.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^### `merit-lab ([\w-]+)`\n", text, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


def test_cli_reference_has_a_section_per_command():
    assert set(_sections(CLI_DOC.read_text(encoding="utf-8"))) == set(_subcommands())


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_cli_reference_names_every_argument_and_default(command):
    section = _sections(CLI_DOC.read_text(encoding="utf-8")).get(command, "")
    bad = []
    for action in _subcommands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # a positional: its name, or each of its choices
            wanted = list(action.choices or [action.dest.upper()])
        else:
            opt = max(action.option_strings, key=len)
            wanted = [f"`{opt}"] + [str(c) for c in action.choices or []]
            if action.default is not None and action.default is not False:
                wanted.append(f"`{opt}` ({action.default})")
        bad += [w for w in wanted if w not in section]
    assert not bad, f"docs/reference/cli.md, merit-lab {command}: missing {bad}"


def test_commands_the_docs_run_exist():
    """Every `merit-lab <command>` in the README's and docs' code is a command of the CLI."""
    known = set(_subcommands())
    used = {
        c
        for p in pages()
        for block in code(p.read_text("utf-8"))
        for c in re.findall(r"(?:^|[\s/`])merit-lab ([a-z][\w-]*)", block, re.M)
    }
    assert "run" in used
    assert used <= known, f"docs run commands the CLI lacks: {sorted(used - known)}"
    assert "--verbose" in CLI_DOC.read_text(encoding="utf-8")
