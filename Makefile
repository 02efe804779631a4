# The two commands the README names:
#   make run   - set up .venv and run the main job (a small L0-ARM pruning run on embedded data)
#   make test  - set up .venv and run the whole test suite
.PHONY: setup run test lint
setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/binopt sparsify --model mlp --dataset mnist5k --estimator arm --lam 0.02 --gate-lr 0.007 --epochs 200 --threads 1 --baseline dense --out runs/quickstart

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check .
