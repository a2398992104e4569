# edgevirt: the README's two commands, and their parts.
SHELL := /bin/bash
VENV  := .venv/bin

.PHONY: demo test install lint unit integration e2e up down status image deploy undeploy

## demo: fresh machine -> everything installed, local cluster up, the demo workload shown
demo: install
	deploy/local/demo

## test: ruff + unit, integration and e2e tests against the real components
test: install lint
	$(VENV)/pytest -v --durations=15 tests/unit tests/integration tests/e2e

install:
	deploy/install/install

## lint: ruff, the one-way layers (import-linter, contracts in pyproject.toml) and types (mypy)
lint:
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports
	$(VENV)/mypy

## image: the edgevirt image, built without Docker (OCI layout in ~/.cache/edgevirt/image/);
## `make image IMAGE_FLAGS=--push` also pushes it to the local cluster's registry (127.0.0.1:5000)
image:
	deploy/images/build-edgevirt-image $(IMAGE_FLAGS)

## deploy: edgevirt's cluster side on the local cluster as an operator installs it (the image built
## and pushed, kubectl apply -k deploy/ pinned to its digest, the rollouts); undeploy removes it
deploy:
	deploy/local/install-edgevirt
undeploy:
	deploy/local/install-edgevirt --uninstall

unit:
	$(VENV)/pytest tests/unit
integration:
	$(VENV)/pytest tests/integration
e2e:
	$(VENV)/pytest tests/e2e

up:
	deploy/local/up
down:
	deploy/local/down
status:
	deploy/local/status
