# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
BIN := $(VENV)/bin
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: setup demo test nbtest pytest export clean-nbs bench

setup:
	@bash tools/setup_env.sh

demo: setup
	@bash tools/demo.sh $(SCENE)

test: setup
	@tools/check_unchanged.sh nbs "$(BIN)/nbdev_clean"
	@tools/check_unchanged.sh mvsnb "$(BIN)/nbdev_export"
	$(BIN)/nbdev_test --n_workers 2 --timing
	$(BIN)/python -m pytest tests -q -p no:dash -p no:cacheprovider

export: setup
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

bench: setup
	@bash tools/bench.sh $(if $(FULL),--full,)
