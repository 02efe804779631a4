#!/usr/bin/env bash
# Create .venv (if needed) and install binopt into it, editable, with all extras.
#
# torch is special (a bare `torch` requirement pulls a multi-GB CUDA build):
#  - when the venv has no torch, `torch==2.13.0` is installed first (a local CPU wheel on
#    the project's machines);
#  - a torch that is already installed is never replaced, upgraded or downgraded. When the
#    Python that creates the venv ($PYTHON, default python3) has torch, the venv sees it
#    (--system-site-packages, or a .pth file when that Python is itself a virtualenv), so an
#    existing CUDA build stays in use. A torch older than the minimum in pyproject.toml
#    stops the script with a message (pip would otherwise replace it), and the editable
#    install runs with torch constrained to the installed version.
# Re-running is cheap: the pip step is skipped while pyproject.toml, the checkout's path
# and torch are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

PY=${PYTHON:-python3}
VENV=.venv
VPY=$VENV/bin/python
TORCH_DEFAULT=2.13.0
# Minimum versions, from pyproject.toml (requires-python = ">=X.Y", "torch>=X.Y").
MIN_PY=$(sed -n 's/^requires-python *= *">=\([0-9.]*\)".*/\1/p' pyproject.toml)
MIN_TORCH=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
[ -n "$MIN_PY" ] && [ -n "$MIN_TORCH" ] || die "cannot read the minimum Python/torch from pyproject.toml"

# Exit status 0 when interpreter $1 is at least Python $MIN_PY (works on any Python).
python_ok() {
  "$1" -c "import sys; m = tuple(int(x) for x in '$MIN_PY'.split('.')); sys.exit(sys.version_info[:len(m)] < m)" \
    >/dev/null 2>&1
}
python_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "?"; }

created=
if [ ! -e "$VENV" ] && [ ! -L "$VENV" ]; then
  created=1
  command -v "$PY" >/dev/null 2>&1 ||
    die "'$PY' not found: install Python >= $MIN_PY, or name one with PYTHON=/path/to/python3"
  python_ok "$PY" ||
    die "'$PY' is Python $(python_version "$PY"); binopt needs >= $MIN_PY: name a newer one with PYTHON=/path/to/python3.X"
  "$PY" -c "import venv, ensurepip" >/dev/null 2>&1 ||
    die "'$PY' cannot create virtual environments (no venv/ensurepip module); on Debian/Ubuntu: apt-get install python3-venv (or python3.X-venv for your version)"
  # Does that Python have torch? Then the venv uses it instead of installing another one:
  # through --system-site-packages, or, when $PY is itself a virtualenv (whose packages
  # --system-site-packages does not reach), a .pth file naming its site-packages.
  base=$("$PY" -c '
import importlib.metadata as m, site, sys
try:
    print(m.version("torch"))
except Exception:
    print("")
print(sys.prefix != sys.base_prefix)
print("\n".join(getattr(site, "getsitepackages", list)()))')
  base_torch=$(printf '%s\n' "$base" | sed -n 1p)
  base_nested=$(printf '%s\n' "$base" | sed -n 2p)
  if [ -n "$base_torch" ] && ! "$PY" -c "import re, sys
k = lambda v: tuple(int(x) for x in re.findall(r'\d+', v)[:2])
sys.exit(k('$base_torch') < k('$MIN_TORCH'))"; then
    die "'$PY' has torch $base_torch, but binopt needs torch >= $MIN_TORCH. It is left alone (pip would replace it): upgrade it yourself with the build you want (CUDA or CPU), or name a Python without torch with PYTHON=/path/to/python3 (torch==$TORCH_DEFAULT is then installed into $VENV)"
  fi
  venv_args=()
  [ -z "$base_torch" ] || [ "$base_nested" = True ] || venv_args=(--system-site-packages)
  say "creating $VENV with $PY (Python $(python_version "$PY"))${base_torch:+; it has torch $base_torch, which $VENV will use}"
  if ! "$PY" -m venv "${venv_args[@]+"${venv_args[@]}"}" "$VENV"; then
    rm -rf "$VENV"
    die "'$PY -m venv $VENV' failed (see above; on Debian/Ubuntu: apt-get install python3-venv); nothing was left behind"
  fi
  if [ -n "$base_torch" ] && [ "$base_nested" = True ]; then
    # addsitedir (not a bare path) so that .pth files over there are processed too
    printf '%s\n' "$base" | sed -n '3,$p' | "$VPY" -c '
import os, sys, sysconfig
dirs = [d for d in sys.stdin.read().splitlines() if d]
pth = os.path.join(sysconfig.get_paths()["purelib"], "_binopt_parent_site.pth")
with open(pth, "w") as fh:
    fh.write("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))'
  fi
fi

"$VPY" -c "" >/dev/null 2>&1 ||
  die "$VENV exists but $VPY does not run (made by a Python that is gone, or not a venv): remove it with 'rm -rf $VENV' and re-run"
python_ok "$VPY" ||
  die "$VENV has Python $(python_version "$VPY"); binopt needs >= $MIN_PY: remove it with 'rm -rf $VENV' and re-run (PYTHON=/path/to/python3.X picks the interpreter)"
"$VPY" -m pip --version >/dev/null 2>&1 ||
  die "$VENV has no pip (an interrupted creation?): remove it with 'rm -rf $VENV' and re-run"
if [ -z "$created" ] && [ -n "${PYTHON:-}" ]; then
  say "note: $VENV already exists (Python $(python_version "$VPY")); PYTHON is only used to create it"
fi

# torch: "missing", "ok VERSION", "old VERSION", "broken VERSION ERROR" or "unlisted VERSION".
torch_probe() {
  "$VPY" -W ignore - "$MIN_TORCH" <<'EOF'
import importlib.metadata as md, re, sys
def key(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])
try:
    version = md.version("torch")
except md.PackageNotFoundError:
    version = None
try:
    import torch
except Exception as exc:
    if version is None:
        print("missing")
    else:
        print("broken", version, (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0])
    sys.exit()
if version is None:  # importable but not installed as a package (PYTHONPATH?)
    print("unlisted", torch.__version__)
elif key(version) < key(sys.argv[1]):
    print("old", version)
else:
    print("ok", version)
EOF
}

state=$(torch_probe | tail -n 1)
if [ "$state" = missing ]; then
  say "no torch in $VENV: installing torch==$TORCH_DEFAULT (CPU build)"
  "$VPY" -m pip install --quiet "torch==$TORCH_DEFAULT"
  state=$(torch_probe | tail -n 1)
fi
read -r kind torch_version detail <<<"$state"
case $kind in
  ok) ;;
  old)
    die "$VENV sees torch $torch_version, but binopt needs torch >= $MIN_TORCH. It is left alone (pip would replace it): upgrade it yourself with the build you want (CUDA or CPU), or use another venv (rm -rf $VENV; PYTHON=/path/to/python3 without torch installs torch==$TORCH_DEFAULT)" ;;
  broken)
    die "torch $torch_version is installed but does not import ($detail); it is left alone: repair it, or use another venv (rm -rf $VENV; PYTHON=/path/to/python3 without torch)" ;;
  unlisted)
    die "torch $torch_version imports but is not an installed package (PYTHONPATH?); pip would install a second torch: install binopt by hand (pip install --no-deps -e .) or unset PYTHONPATH" ;;
  *) die "unexpected torch check result: $state" ;;
esac

# The editable install with every extra; skipped when nothing it depends on has changed.
stamp=$VENV/.binopt-installed
want="$(pwd -P) | $(cksum <pyproject.toml) | torch $torch_version"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  constraint=$VENV/.torch-constraint.txt
  printf 'torch==%s\n' "$torch_version" >"$constraint"
  say "installing binopt (editable) with extras dev,data,tune; torch stays $torch_version"
  "$VPY" -m pip install --quiet --constraint "$constraint" -e ".[dev,data,tune]"
  printf '%s\n' "$want" >"$stamp"
fi
"$VPY" -c "import torch, binopt; print(f'[setup] binopt {binopt.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
# The compiled CPU kernel of L0-ARM's MLP step (applications/sparsify/cpu_extension.py):
# built once here (about 30 s, cached under ~/.cache/torch_extensions), so that the first
# training run does not pause for it. Without a C++ compiler it is skipped and training
# uses the Python implementation (same results, slower); this never fails the setup.
"$VPY" -m applications.sparsify.cpu_extension | sed 's/^/[setup] /' ||
  say "could not check the compiled CPU kernel; training falls back to Python"
