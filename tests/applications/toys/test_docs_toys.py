"""The toys pages run and link to committed figures: every ```python block of each page in
docs/toys/ runs in one namespace per page, and every image it shows exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[3] / "docs" / "toys"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def test_pages_exist():
    assert {"index.md", "yin_zhou.md", "vae.md", "maxcut.md", "variance.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_images_and_links_exist(page):
    text = (DOCS / page).read_text()
    for target in IMAGE.findall(text):
        assert (DOCS / target).resolve().is_file(), f"{page} shows missing {target}"
    for target in re.findall(r"\]\(([^)#]+\.md)\)", text):
        assert (DOCS / target).is_file(), f"{page} links to missing {target}"
    assert "TABLE" not in text, f"{page} has an unfilled placeholder"


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page, capsys):
    blocks = BLOCK.findall((DOCS / page).read_text())
    if page == "vae.md":
        pytest.importorskip("mlxtend")
    namespace: dict = {"__name__": f"docs_toys_{Path(page).stem}"}
    state = torch.get_rng_state()
    torch.manual_seed(0)
    try:
        for k, code in enumerate(blocks):
            try:
                exec(compile(code, f"{DOCS / page}:block{k}", "exec"), namespace)
            except Exception as err:  # pragma: no cover - the message is the point
                raise AssertionError(f"{page}, python block {k} failed:\n{code}") from err
    finally:
        torch.set_rng_state(state)
