# The two commands of the README: `make demo` and `make test`. Both do all set-up
# on a fresh machine (Debian, Python >= 3.11, registries only) and are cheap
# to repeat: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
OUT    ?= demo-out
SIZE   ?= small
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: the local CPU wheel; a bare `torch` would pull GBs of CUDA.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/clipline demo --out $(OUT) --size $(SIZE)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OUT)
