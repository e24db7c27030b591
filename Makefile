# Two commands on a fresh machine (Python >= 3.10; the venv is created on first use):
#   make quickstart   adapt pretrained MiniLM with AdaLoRA to a real-text task (offline, CPU, under 2 minutes)
#   make test         the whole test suite (CI, .ci/run, runs it and then .ci/plain_install.sh)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: venv quickstart test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

quickstart: $(BIN)/.installed
	$(BIN)/lightning-peft fit --config examples/quickstart.yaml --trainer.enable_progress_bar false

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check lightning_peft tests benchmarks
	$(BIN)/mypy lightning_peft

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
