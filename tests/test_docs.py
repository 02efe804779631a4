"""The code in the docs runs: every ```python block of the pages below, in order, in one
namespace per page (like a reader pasting them into one session)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import binopt
from binopt.estimators import base as estimator_base

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [
    "quickstart.md",
    "api.md",
    "index.md",
    "parameterizations.md",
    "diagnostics.md",
    "estimators/score_function.md",
    "estimators/arm.md",
    "estimators/relaxed.md",
    "estimators/exact.md",
]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((DOCS / page).read_text())


@pytest.fixture
def isolated_state():
    """Pages may register estimators or flip switches: restore the global state after."""
    registry, aliases = dict(estimator_base._REGISTRY), dict(estimator_base._ALIASES)
    validate = binopt.validate_args_enabled()
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    estimator_base._REGISTRY.clear()
    estimator_base._REGISTRY.update(registry)
    estimator_base._ALIASES.clear()
    estimator_base._ALIASES.update(aliases)
    binopt.set_validate_args(validate)
    torch.set_rng_state(rng)


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page, isolated_state, capsys):
    blocks = python_blocks(page)
    if page in ("quickstart.md", "api.md"):
        assert len(blocks) >= 3, f"{page} should show runnable code"
    namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
    for k, code in enumerate(blocks):
        try:
            exec(compile(code, f"{DOCS / page}:block{k}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page}, python block {k} failed:\n{code}") from err


def test_quickstart_toy_converges(isolated_state, capsys):
    """The quick start's claim: DisARM drives every pi of the toy close to 0."""
    namespace: dict = {}
    exec(compile(python_blocks("quickstart.md")[0], "quickstart", "exec"), namespace)
    pi = torch.sigmoid(namespace["logits"].detach())
    assert pi.shape == (10,) and (pi < 0.1).all(), pi


def test_every_page_is_listed():
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    mine = {"index.md", "quickstart.md", "api.md", "parameterizations.md", "diagnostics.md"}
    mine |= {p for p in pages if p.startswith("estimators/")}
    assert mine <= set(PAGES), sorted(mine - set(PAGES))
    for family in ["score_function", "arm", "relaxed", "exact"]:
        assert f"estimators/{family}.md" in pages


README = DOCS.parent / "README.md"


def test_readme_code_runs(isolated_state, capsys):
    blocks = BLOCK.findall(README.read_text())
    assert blocks, "README should show runnable code"
    namespace: dict = {"__name__": "docs_readme"}
    for k, code in enumerate(blocks):
        exec(compile(code, f"{README}:block{k}", "exec"), namespace)


def test_readme_paths_exist():
    """Every `path/...` the README names exists (layout-table entries in a package's row
    may be relative to that package: `estimators/` in `binopt/`)."""
    root = DOCS.parent
    text = README.read_text()
    named = set(re.findall(r"\[[^\]]*\]\(([^)#\s]+)\)", text))  # markdown links
    named |= {p for p in re.findall(r"`([^`\s]+)`", text) if "/" in p or p.endswith(".toml")}
    named -= {".venv/"}  # made by the README's commands
    missing = [
        p
        for p in sorted(named)
        if not (root / p).exists()
        and not any((root / base / p).exists() for base in ("binopt", "benchmarks"))
    ]
    assert not missing, missing


def test_readme_summary_matches_tutorial():
    """The main job's final summary is quoted in the README and the tutorial: same lines."""

    def summary(path: Path) -> str:
        match = re.search(
            r"^ {4}L0-ARM mlp on mnist5k.*?outputs +runs/quickstart$", path.read_text(), re.S | re.M
        )
        assert match is not None, path
        return match.group(0)

    assert summary(README) == summary(DOCS / "sparsify" / "tutorial.md")


# ----------------------------------------------------------------------------------------
# Cross-checks of the prose: links, commands and file names against the repository.

ROOT = DOCS.parent
ALL_PAGES = [README, *sorted(DOCS.rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (but `-`, `_`) dropped, spaces
    to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", FENCE.sub("", page.read_text()), re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links of ``text`` (written in ``page``) whose file or anchor is missing."""
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    return bad


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = broken_links(page, page.read_text())
    assert not bad, bad


def test_every_page_is_reachable_from_the_index():
    seen, todo = set(), [DOCS / "index.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            path = target.partition("#")[0]
            dest = (page.parent / path).resolve()
            if path.endswith(".md") and dest.is_file() and DOCS in dest.parents:
                todo.append(dest)
    missing = sorted(str(p.relative_to(DOCS)) for p in set(DOCS.rglob("*.md")) - seen)
    assert not missing, f"not linked from docs/index.md (directly or through a page): {missing}"


COMMAND = re.compile(r"(?<![\w/.-])binopt (sparsify|export|tune|variance|toy)\b([^`\n#|]*)")


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """``binopt COMMAND ...`` lines of ``text`` (code blocks and inline code, continuation
    lines joined) as ``(command, tokens)``."""
    text = re.sub(r"\\\n\s*", " ", text)
    return [(m.group(1), m.group(2).split()) for m in COMMAND.finditer(text)]


@pytest.fixture(scope="module")
def subparsers():
    import argparse

    from applications.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def unknown_options(text: str, subparsers) -> list[str]:
    """Options of the ``binopt`` commands in ``text`` that the command does not have, and
    literal values outside an option's choices."""
    bad = []
    for command, tokens in _commands(text):
        if command not in subparsers:  # not shipped in this build (build_parser skips it)
            continue
        options = subparsers[command]._option_string_actions
        for k, token in enumerate(tokens):
            if not token.startswith("--"):
                continue
            flag, _, value = token.partition("=")
            if flag not in options:
                bad.append(f"binopt {command} {flag}")
                continue
            value = value or (tokens[k + 1] if k + 1 < len(tokens) else "")
            choices = options[flag].choices
            literal = re.fullmatch(r"[a-z0-9_.,-]+", value) and not value.startswith("-")
            if choices and literal and value not in choices:
                bad.append(f"binopt {command} {flag} {value} (choices: {', '.join(choices)})")
    return bad


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_binopt_commands_use_existing_options(page, subparsers):
    bad = unknown_options(page.read_text(), subparsers)
    assert not bad, bad


BENCH_COMMAND = re.compile(r"python (benchmarks/\w+\.py)([^`\n#|]*)")


def unknown_benchmark_options(text: str) -> list[str]:
    """``python benchmarks/X.py --flag`` whose script defines no ``"--flag"``."""
    text = re.sub(r"\\\n\s*", " ", text)
    bad = []
    for m in BENCH_COMMAND.finditer(text):
        script = ROOT / m.group(1)
        if not script.is_file():
            bad.append(m.group(1))
            continue
        source = script.read_text()
        bad += [f"{m.group(1)} {flag}" for flag in re.findall(r"(?<!\S)(--[\w-]+)", m.group(2))
                if f'"{flag}"' not in source]
    return bad


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_commands_use_existing_options(page):
    bad = unknown_benchmark_options(page.read_text())
    assert not bad, bad


def _expand_braces(name: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", name)
    if m is None:
        return [name]
    return [x for alt in m.group(1).split(",")
            for x in _expand_braces(name[:m.start()] + alt + name[m.end():])]


def missing_results(text: str) -> list[str]:
    """``benchmarks/results/NAME`` files (braces and ``*`` expanded) that do not exist;
    a path right after ``--out`` is one a command would write, not a committed one."""
    missing = []
    for m in re.finditer(r"(--out\s+)?benchmarks/results/([\w.{},*+-]+)", text):
        if m.group(1):
            continue
        for name in _expand_braces(m.group(2).rstrip(".,")):
            if not list((ROOT / "benchmarks" / "results").glob(name)):
                missing.append(name)
    return missing


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_results_named_in_the_docs_exist(page):
    bad = missing_results(page.read_text())
    assert not bad, bad


def test_the_checks_catch_broken_examples(subparsers):
    """Each check above fails on a planted mistake (so a passing run means something)."""
    page = DOCS / "index.md"
    assert broken_links(page, "[a](no_such_page.md)") == ["no_such_page.md"]
    assert broken_links(page, "[a](tune.md#no-such-section)") == ["tune.md#no-such-section"]
    assert broken_links(page, "[a](tune.md#the-search-space) [b](https://x.org/y.md)") == []
    assert unknown_options("`binopt sparsify --gate-learning-rate 0.1`", subparsers) == [
        "binopt sparsify --gate-learning-rate"]
    assert unknown_options("```bash\nbinopt tune --mode best \\\n  --trials 3\n```",
                           subparsers) == ["binopt tune --mode best (choices: pareto, target)"]
    assert unknown_options("binopt tune --mode target --kept params", subparsers) == []
    assert unknown_benchmark_options("python benchmarks/train_step.py --thread 2") == [
        "benchmarks/train_step.py --thread"]
    assert missing_results("`benchmarks/results/vae_bar_{linear,quadratic}.json`") == [
        "vae_bar_quadratic.json"]
    assert missing_results("--out benchmarks/results/new.json") == []
