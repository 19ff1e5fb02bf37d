# The two commands of the README: `make demo` and `make test`. Both do all set-up
# on a fresh machine (Debian, Python >= 3.11, registries only) and are cheap
# to repeat: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
OUT    ?= demo-out
SIZE   ?= small
PYTEST_ARGS ?= -m "not slow"

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: setup fashion-mnist demo test test-slow bench bench-quick clean

FASHION := .cache/datasets/usr/share/datasets/fashion-mnist

setup: $(STAMP) fashion-mnist

# Fashion-MNIST for the linear probe and zero-shot eval: Debian's dataset-fashion-mnist, from the Debian
# registry. Installed system-wide already, or unpacked here without root; skipped (tests say so) if neither works.
fashion-mnist:
	@test -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || test -e $(FASHION)/t10k-images-idx3-ubyte.gz || \
	  (mkdir -p .cache/deb && cd .cache/deb && apt-get download dataset-fashion-mnist >/dev/null 2>&1 && \
	   dpkg -x dataset-fashion-mnist_*.deb ../datasets && echo "fashion-mnist: unpacked into .cache/datasets") || \
	  echo "fashion-mnist: not available (apt-get download failed); its eval is skipped"

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: the local CPU wheel; a bare `torch` would pull GBs of CUDA.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@# OpenAI's reference tokenizer for the tests, from the OpenCLIP wheel; without its dependencies (torchvision)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/clipline demo --out $(OUT) --size $(SIZE)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The slow tier (clusters, killed nodes, Ray jobs, the S3 demo: ~8 minutes); CI runs it after `make test`.
test-slow: setup
	$(BIN)/python -m pytest -m slow

# Benchmarks run in their own venv: clipline plus its peers (img2dataset ...).
$(BENCH_STAMP): pyproject.toml Makefile
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check -e '.[bench]'
	@# OpenAI's own tokenizer, the peer of bench/tokenizer.py (without OpenCLIP's torchvision dependency)
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
	@rm -f $(BENCH_VENV)/.installed-*
	@touch $@

BENCHES := crawl langid dedup dedup_quality curation tokenizer

bench-quick: $(BENCH_STAMP)
	for b in $(BENCHES); do NO_ALBUMENTATIONS_UPDATE=1 $(BENCH_VENV)/bin/python bench/$$b.py --quick || exit 1; done

bench: $(BENCH_STAMP)
	for b in $(BENCHES); do NO_ALBUMENTATIONS_UPDATE=1 $(BENCH_VENV)/bin/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(OUT)
