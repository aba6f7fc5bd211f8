# Two commands on a fresh machine: `make demo` (train through an embedded augsvc) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install demo test lint protos bench clean

$(STAMP): pyproject.toml setup.py augsvc/datasets/_jpegregion.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build first (held locally); an unpinned torch would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# Also builds the optional C module (setup.py: JPEG region decoding) in place; skipped with a
	# warning where there is no C compiler or libjpeg-turbo headers.
	$(PY) -m pip install -q -e '.[train,tensorboard,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/augsvc-train --out runs/demo

test: install
	$(PY) scripts/gen_protos.py --check
	$(PY) -m ruff check augsvc trainer_client tests scripts benchmarks
	$(PY) -m mypy augsvc trainer_client benchmarks
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check augsvc trainer_client tests scripts benchmarks
	$(PY) -m mypy augsvc trainer_client benchmarks

protos: install
	$(PY) scripts/gen_protos.py

# The engine against albumentations (about a minute); `bash benchmarks/bench_all.sh` makes every README table.
bench: install
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV) runs .pytest_cache
