# One command each: `make run` (the main job on the bundled samples) and `make test`.
# Both create the virtual environment on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint setup clean lock

# Every install takes the versions pinned in constraints.txt, so each machine gets the
# environment CI tested (an unpinned install takes whatever the registry has that day).
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/unimrg run -m data_manifest.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf out .pytest_cache

# Re-resolve the newest versions pyproject.toml allows into constraints.txt (then run make test).
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^unimrg'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv
