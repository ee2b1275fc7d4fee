# Clovisor: `make setup` (idempotent install), `make demo`, `make test`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := clang llvm libbpf-dev libbpf1 bpftool iproute2 nginx-light curl wrk hey nghttp2-client \
                redis-server tshark linux-perf procps
BPF_SRC := bpf/clovisor.bpf.c
BPF_HDR := bpf/clovisor.h bpf/http1.h
BPF_OBJ := src/clovisor/kernel/clovisor.bpf.o
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
BPF_CFLAGS := -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Wextra -Werror -Wpadded \
              -I/usr/include/$(shell uname -m)-linux-gnu -Ibpf

.PHONY: setup deb venv bpf demo test lint bench bench-smoke clean

setup: deb venv bpf

deb:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed $(VENV)/.compiled

# Dependencies first, with the package pure (mypyc type-checks what it
# compiles against them), then the mypyc build of the hot path in place.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77' wheel
	CLOVISOR_COMPILE=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

# setup.py lists the compiled modules; any change under src/ rebuilds them
# (a stale compiled module would shadow its edited source).
$(VENV)/.compiled: $(VENV)/.installed setup.py $(shell find src -name '*.py')
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

bpf: $(BPF_OBJ)

$(BPF_OBJ): $(BPF_SRC) $(BPF_HDR)
	clang $(BPF_CFLAGS) -c $(BPF_SRC) -o $@

demo: setup
	$(VENV)/bin/clovisor demo

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench.run

clean:
	rm -f $(BPF_OBJ)
	find src -name '*.so' -delete
	rm -rf $(VENV) build src/*.egg-info
