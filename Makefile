# The README's two commands: `make demo` and `make test`. Both create .venv on first use;
# re-running skips what is already installed (stamp files under .venv/.stamps).

PYTHON ?= python3
# torch goes in first, pinned by requirements-torch.txt (the project's one torch pin, which
# the Dockerfile and the README use too): an unpinned torch (asked for by a dependency)
# would pull another build of several GB. To try another build: TORCH='torch==X.Y.Z'.
TORCH ?= -r requirements-torch.txt
CHROMIUM := /usr/bin/chromium

VENV := .venv
BIN := $(VENV)/bin
STAMPS := $(VENV)/.stamps

.PHONY: demo test test-fast lint clean

demo: $(STAMPS)/client-server
	$(BIN)/python -m framepack_server.demo

test: $(STAMPS)/test | $(CHROMIUM)
	$(BIN)/python -m pytest

# The inner loop: no GPU, no tritonserver, nothing marked slow (under two minutes on 2 shared cores).
test-fast: $(STAMPS)/test
	$(BIN)/python -m pytest -m "not slow and not server and not gpu"

# ruff (style, imports) and mypy (the files listed under [tool.mypy] in pyproject.toml).
lint: $(STAMPS)/test
	$(BIN)/ruff check .
	$(BIN)/mypy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/torch: requirements-torch.txt | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	mkdir -p $(STAMPS) && touch $@

$(STAMPS)/client-server: pyproject.toml $(STAMPS)/torch
	$(BIN)/pip install -e '.[client,server]'
	touch $@

$(STAMPS)/test: pyproject.toml $(STAMPS)/torch
	$(BIN)/pip install -e '.[client,server,test]'
	touch $@

# The web UI's browser test drives Debian's chromium through Playwright (which is never
# allowed to download a browser of its own). Installed when missing and possible (root,
# apt-get); otherwise that test skips and says why.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update && apt-get install -y chromium) || \
			echo "could not install chromium: the web UI browser test will be skipped"; \
	else \
		echo "no $(CHROMIUM) and no root apt-get: the web UI browser test will be skipped"; \
	fi

clean:
	rm -rf $(VENV) outputs
