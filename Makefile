# Two commands on a fresh machine (each installs what it needs first, idempotently):
#   make run    the main job: `polysae run` (harvest -> train vanilla + PolySAE -> evaluate -> report)
#   make test   the test suite, CPU only, Triton kernels under the interpreter
# and `make docs`: build the site with `mkdocs build --strict` (CI check);
#     `make lock`: regenerate requirements-lock.txt (what set-up and CI install) from pyproject's ranges;
#     `make test-latest`: the suite in .venv-latest on the newest versions the ranges allow (drift
#     warning; not part of CI);
#     `make peers`: virtualenvs for the peer packages (sae-lens + sae-bench, sae-dashboard, neuronpedia)
#     under .peers/, from the locks in scripts/peers/ (tests that need one skip with the reason
#     without it; CI builds them).
.PHONY: setup run test bench docs lock test-latest peers
VENV ?= .venv
setup:
	bash scripts/setup.sh
run: setup
	$(VENV)/bin/polysae run
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -n 2 --dist loadgroup -q
bench: setup
	$(VENV)/bin/python benchmarks/bench_decoder.py --cpu
docs: setup
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d "$$d"
lock:
	bash scripts/lock.sh
test-latest:
	VENV=.venv-latest bash scripts/setup.sh --latest
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv-latest/bin/python -m pytest -n 2 --dist loadgroup -q
peers:
	bash scripts/peers.sh
