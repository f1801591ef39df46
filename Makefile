# loramesh: `make run` starts the mesh, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GEN    := gen
PROTOS := $(wildcard protos/loramesh/v1/*.proto)
export PYTHONPATH := $(CURDIR):$(CURDIR)/$(GEN)

.PHONY: run test chaos protos lint bench clean k8s

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# Python stubs and the descriptor set Envoy and the OpenAPI generator read.
$(GEN)/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m services.common.protos_build --out $(GEN)
	touch $@

protos: $(GEN)/.stamp

run: protos
	$(PY) -m launcher.mesh

test: protos browser
	$(PY) -m pytest -q

# The fault suite alone, for longer: random SIGKILLs and a NATS restart under load.
CHAOS_SECONDS ?= 300
chaos: protos
	LORAMESH_CHAOS_SECONDS=$(CHAOS_SECONDS) $(PY) -m pytest -q -s -m chaos

# Headless Chromium for the output browser's rendering test (Debian's package).
.PHONY: browser
browser:
	@command -v chromium >/dev/null || { \
		sudo=$$( [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null && echo sudo ); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: $(VENV)/.installed
	$(PY) -m ruff check services gateway launcher tinymodels tests bench

bench: protos
	$(PY) bench/tagger.py
	$(PY) bench/gateway.py
	$(PY) bench/train_step.py
	$(PY) bench/captioner.py
	$(PY) bench/preprocess.py
	$(PY) bench/inference.py
	$(PY) bench/queue_scale.py
	$(PY) bench/upscale.py

# Regenerates the Envoy config and OpenAPI document that deploy/k8s ships.
k8s: protos
	bash deploy/k8s/generate.sh

clean:
	rm -rf $(GEN) var .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
