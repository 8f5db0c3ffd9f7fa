# Set-up and the two everyday commands. `make install` only creates .venv; `make demo` and
# `make test` each create it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install demo test lint-imports bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# This machine's CPU build of torch; the package itself accepts any torch >= 2.3.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[training,edge,dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fedrec demo

# Two workers (CI has two cores): the real-process Flower tests wait on processes and timeouts
# most of the time; each xdist_group runs on one worker, the rest spread over both.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# import-linter on .importlinter (fedrec/ links each package folder, so it sees them by import name;
# also part of `make test`).
lint-imports: $(VENV)/.installed
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs
