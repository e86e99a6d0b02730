# Two entry points (see README): `make demo` serves the embedded demo corpus,
# `make test` runs the test suite. Both create the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, from a spec you choose: the CPU wheel here; `make TORCH_SPEC=torch`
# on a CUDA machine. A bare `torch` requirement would otherwise pull the CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,test,minilm
PYTEST_ARGS ?=

.PHONY: setup system-packages test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# Debian's prometheus and chromium, which some tests start (scripts/system-packages.sh).
system-packages:
	bash scripts/system-packages.sh || echo "system-packages: could not install them; the monitoring tests will say what is missing" >&2

test: setup system-packages
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/serve-app demo

clean:
	rm -rf $(VENV) indexes artifacts
