"""scripts/setup.sh (behind ``make run`` / ``make test``): its refusals and torch detection.

Each test runs the script in a scratch copy of the checkout (the script and
pyproject.toml) and stops it before any pip install, so nothing is downloaded: the
minimum Python or torch is raised in the copied pyproject.toml where a test needs the
script to refuse.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def checkout(tmp_path: Path, *, min_python: str | None = None, min_torch: str | None = None):
    """A copy of the files setup.sh reads, in a folder whose name has a space."""
    repo = tmp_path / "my checkout"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, repo / "scripts" / "setup.sh")
    text = (ROOT / "pyproject.toml").read_text()
    if min_python is not None:
        text, n = re.subn(
            r'requires-python = ">=[0-9.]+"', f'requires-python = ">={min_python}"', text
        )
        assert n == 1
    if min_torch is not None:
        text, n = re.subn(r'"torch>=[0-9.]+"', f'"torch>={min_torch}"', text)
        assert n == 1
    (repo / "pyproject.toml").write_text(text)
    return repo


def run_setup(repo: Path, python=None, cwd: Path | None = None, env: dict | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")} | (env or {})
    if python is not None:
        env["PYTHON"] = str(python)
    return subprocess.run(
        ["bash", str(repo / "scripts" / "setup.sh")],
        cwd=cwd or repo.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def venv_with_this_torch(where: Path) -> Path:
    """A venv (no pip of its own) that sees this interpreter's packages, torch included."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    purelib = subprocess.run(
        [
            str(where / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    mine = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in dict.fromkeys(mine))
    Path(purelib, "_test_parent.pth").write_text(lines)
    return where / "bin" / "python"


def test_missing_interpreter_is_named(tmp_path):
    repo = checkout(tmp_path)
    res = run_setup(repo, python=tmp_path / "no-such-python")
    assert res.returncode != 0
    assert "not found" in res.stderr and "PYTHON=" in res.stderr, res.stderr
    assert not (repo / ".venv").exists()


def test_too_old_python_is_refused_before_creating_the_venv(tmp_path):
    repo = checkout(tmp_path, min_python="3.99")
    res = run_setup(repo, python=sys.executable)
    assert res.returncode != 0
    assert "binopt needs >= 3.99" in res.stderr, res.stderr
    assert not (repo / ".venv").exists()


def test_folder_without_python_is_not_reused(tmp_path):
    repo = checkout(tmp_path)
    (repo / ".venv").mkdir()
    res = run_setup(repo)
    assert res.returncode != 0
    assert "rm -rf .venv" in res.stderr, res.stderr


def test_venv_without_pip_is_reported(tmp_path):
    repo = checkout(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(repo / ".venv")], check=True)
    res = run_setup(repo)
    assert res.returncode != 0
    assert "has no pip" in res.stderr, res.stderr


def test_existing_torch_below_the_minimum_is_left_alone(tmp_path):
    """A torch older than pyproject's minimum stops the script; pip never runs."""
    import torch

    repo = checkout(tmp_path, min_torch="99.0")
    venv_with_this_torch(repo / ".venv")
    res = run_setup(repo, cwd=tmp_path)  # from another working directory
    assert res.returncode != 0
    assert "needs torch >= 99.0" in res.stderr, res.stderr
    assert torch.__version__.split("+")[0] in res.stderr
    assert "installing" not in res.stdout, res.stdout
    assert not (repo / ".venv" / ".binopt-installed").exists()


def test_old_torch_of_the_creating_python_is_refused_before_creating_the_venv(tmp_path):
    parent = venv_with_this_torch(tmp_path / "parent env")
    repo = checkout(tmp_path, min_torch="99.0")
    res = run_setup(repo, python=parent)
    assert res.returncode != 0
    assert "has torch" in res.stderr and "needs torch >= 99.0" in res.stderr, res.stderr
    assert not (repo / ".venv").exists()


def test_torch_of_the_creating_virtualenv_is_used(tmp_path):
    """PYTHON names a virtualenv with torch: the new .venv sees that torch (a .pth file),
    installs none, and pins it for the editable install (stopped here by an offline pip)."""
    import torch

    parent = venv_with_this_torch(tmp_path / "parent env")
    repo = checkout(tmp_path)
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    res = run_setup(repo, python=parent, env=offline)
    assert "it has torch" in res.stdout, res.stdout + res.stderr
    assert "installing torch" not in res.stdout
    probe = subprocess.run(
        [str(repo / ".venv" / "bin" / "python"), "-c", "import torch; print(torch.__file__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(probe).resolve() == Path(torch.__file__).resolve()
    assert not list((repo / ".venv").glob("lib/python*/site-packages/torch"))
    pin = (repo / ".venv" / ".torch-constraint.txt").read_text().strip()
    assert re.fullmatch(r"torch==\S+", pin) and torch.__version__.split("+")[0] in pin, pin


def test_makefile_ci_and_readme_agree():
    """The README's two commands are Makefile targets that set up through setup.sh, and
    CI runs exactly the README's test command."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## The two commands\n+```bash\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make run", "make test"], commands
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        rule = re.search(rf"^{target}:(.*)$", makefile, re.M)
        assert rule is not None and "setup" in rule.group(1).split(), target
    assert re.search(r"^setup:\n\tbash scripts/setup\.sh$", makefile, re.M)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [line for line in ci if line and not line.startswith("#")]
    assert ci[-1] == "make test", ci


def test_readme_states_the_minimum_torch():
    pyproject = (ROOT / "pyproject.toml").read_text()
    minimum = re.search(r'"torch>=([0-9.]+)"', pyproject).group(1)
    assert f"older than {minimum}," in (ROOT / "README.md").read_text()
    assert f"torch >= {minimum}" in (ROOT / "docs" / "quickstart.md").read_text()
    assert re.search(r"^TORCH_DEFAULT=2\.13\.0$", SETUP.read_text(), re.M)
