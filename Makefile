# loramesh: `make run` starts the mesh, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GEN    := gen
PROTOS := $(wildcard protos/loramesh/v1/*.proto)
export PYTHONPATH := $(CURDIR):$(CURDIR)/$(GEN)

.PHONY: run test chaos protos lint bench clean k8s

# The locked development set (requirements/dev.txt: the CPU server set and the tools).
# PyPI has no CPU build of torch: its PyTorch index is added unless pip already finds it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(VENV)/.installed: requirements.txt requirements/dev.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	torch=$$(grep -m1 '^torch==' requirements/dev.txt); \
	$(PY) -m pip install -q --dry-run --no-deps "$$torch" >/dev/null 2>&1 || index="--extra-index-url $(TORCH_CPU_INDEX)"; \
	$(PY) -m pip install -q $$index -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# Re-resolves requirements/*.txt after pyproject.toml's dependencies change.
.PHONY: lock
lock: $(VENV)/.installed
	$(PY) requirements/lock.py

# Python stubs and the descriptor set Envoy and the OpenAPI generator read.
$(GEN)/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m services.common.protos_build --out $(GEN)
	$(PY) -m loramesh.client.stubgen  # the client's static types follow the protos
	printf '#!/bin/sh\n# The loramesh command of this checkout (`pip install .` installs it elsewhere).\nPYTHONPATH="%s:%s$${PYTHONPATH:+:$$PYTHONPATH}" exec "%s" -m loramesh.cli "$$@"\n' \
		"$(CURDIR)" "$(CURDIR)/$(GEN)" "$(abspath $(PY))" > $(VENV)/bin/loramesh
	chmod +x $(VENV)/bin/loramesh
	touch $@

protos: $(GEN)/.stamp

run: protos web
	$(PY) -m launcher.mesh

test: protos browser web
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

# The dashboard's chart library: its pinned npm tarball, integrity-checked, unpacked into
# gateway/web/vendor/ (git-ignored). Envoy's config names the files, so this comes first.
.PHONY: web
web: $(VENV)/.installed
	@command -v npm >/dev/null || { \
		sudo=$$( [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null && echo sudo ); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
	$(PY) -m gateway.web_assets

lint: $(VENV)/.installed
	$(PY) -m ruff check services gateway launcher tinymodels loramesh tests bench setup.py requirements

bench: protos
	$(PY) bench/tagger.py
	$(PY) bench/gateway.py
	$(PY) bench/train_step.py
	$(PY) bench/captioner.py
	$(PY) bench/preprocess.py
	$(PY) bench/inference.py
	$(PY) bench/queue_scale.py
	$(PY) bench/upscale.py
	$(PY) bench/previews.py
	$(PY) bench/observability.py

# Regenerates the Envoy config and OpenAPI document that deploy/k8s ships.
k8s: protos
	bash deploy/k8s/generate.sh

# The Secrets deploy/k8s reads (JWKS, API keys, NATS users' passwords, webhook key), with a
# signed operator token, into var/k8s-secrets (git-ignored). FORCE=1 replaces existing ones.
.PHONY: k8s-secrets
k8s-secrets: $(VENV)/.installed
	$(PY) deploy/k8s/make_secrets.py $(if $(FORCE),--force)

clean:
	rm -rf $(GEN) var .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
