# `make run` and `make test` work on a fresh machine: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# constraints.txt pins the CPU build of torch so pip never pulls a multi-GB CUDA build here
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: install browser run test test-long fuzz lint bench
install: $(VENV)/.installed

# Debian's Chromium and its driver, for the chat page's browser test (needs root, as CI has).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

run: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tandem up

test: install browser
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

fuzz: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m fuzz

# The integration tests `make test` leaves out for time (marker `long`, about 8 minutes on 2 AVX2 cores).
test-long: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m long

lint: install
	$(VENV)/bin/ruff check .

# Every figure in the README's "Measured" section and bench/results/REPORT.md (over an hour on 2 cores).
# The `bench` extra adds the peers the performance figures compare against (Haystack 2).
bench: install
	$(PIP) install -q -c constraints.txt -e '.[dev,bench]'
	for b in intents retrieval oos latency grounding distributed nlu decode e2e serving hardware; do \
	  HF_HUB_OFFLINE=1 $(PY) -m bench $$b || exit 1; done
	TANDEM_RESPONDER_CPU_WEIGHTS=file HF_HUB_OFFLINE=1 $(PY) -m bench serving --out serving_q4_1
	TANDEM_RESPONDER_PREFIX_CACHE_MB=0 HF_HUB_OFFLINE=1 $(PY) -m bench serving --out serving_no_prefix_cache
	HF_HUB_OFFLINE=1 $(PY) -m bench priority
	TANDEM_GEN_POOL=solo HF_HUB_OFFLINE=1 $(PY) -m bench priority --out priority_solo
	HF_HUB_OFFLINE=1 $(PY) -m bench priority --tickets 1024 --no-in-line --out priority_large
	HF_HUB_OFFLINE=1 $(PY) -m bench.peft
	HF_HUB_OFFLINE=1 $(PY) -m bench.load
	TANDEM_GEN_POOL=solo HF_HUB_OFFLINE=1 $(PY) -m bench.load --out load_solo
	$(PY) -m bench report
