# Fresh machine: `make demo` runs a real CT study through segnode end to end (segnode demo); `make serve`
# runs the node on embedded defaults; `make test` runs the test suite.
# Each target sets itself up: Debian packages (as root), a virtualenv, pinned Python packages.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segnode-installed
APT_PACKAGES := dcmtk dicom3tools postgresql-15 orthanc orthanc-dicomweb iproute2
export TCP_NODELAY := 1

.PHONY: demo serve bench-e2e test lint typecheck check system-deps bench-ingest clean

system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	[ -x /usr/lib/postgresql/15/bin/initdb ] || missing="$$missing postgresql-15"; \
	[ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,postgres,pipelines,trainer,cpu]'
	touch $(STAMP)

# OHIF's DICOM-SEG reader (@cornerstonejs/adapters) for the SEG read-back tests.
JS_STAMP := tests/js/node_modules/.package-lock.json

$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund

# STUDY=DIR: your own DICOM folder instead of the LiTS CT downloaded from the package index.
demo: system-deps $(STAMP)
	$(BIN)/segnode demo $(if $(STUDY),--study $(STUDY),)

serve: system-deps $(STAMP)
	$(BIN)/segnode serve $(if $(CONFIG),--config $(CONFIG),)

test: system-deps $(STAMP) $(JS_STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

lint: $(STAMP)
	$(BIN)/ruff check node pipelines trainer tests bench
	$(BIN)/ruff format --check node pipelines trainer tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench-ingest: system-deps $(STAMP)
	$(BIN)/python bench/ingest.py

bench-e2e: system-deps $(STAMP)
	$(BIN)/python bench/e2e.py

clean:
	rm -rf $(VENV) segnode-data .pytest_cache .mypy_cache .ruff_cache tests/js/node_modules
