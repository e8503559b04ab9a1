# Two commands on a fresh machine (each installs what it needs first, idempotently):
#   make run    the main job: `polysae run` (harvest -> train vanilla + PolySAE -> evaluate -> report)
#   make test   the test suite, CPU only, Triton kernels under the interpreter
# and `make docs`: install the docs extra, build the site with `mkdocs build --strict` (CI check).
.PHONY: setup run test bench docs
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
	$(VENV)/bin/python -m pip install -q -c constraints-cpu.txt -e '.[docs]'
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d "$$d"
