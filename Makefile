# Set-up is automatic: `make demo` and `make test` create .venv and install the
# package (editable, with the dev extra) when it is missing or pyproject.toml changed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.glofnd-installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/glofnd-train recipes/demo.yaml --overwrite_output_dir true

# CI runs this target alone (.ci/run): style first (seconds), then the suite.
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check glofnd_hf tests benchmarks
	$(BIN)/ruff format --check glofnd_hf tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format glofnd_hf tests benchmarks
	$(BIN)/ruff check --fix glofnd_hf tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info outputs
