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
