# The README's two set-up commands are `make run` and `make test`; every other command the
# README names has a target here too.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint format typecheck deploy-check tiny-model serve worker keys clean \
	bench-generation bench-backbone bench-classifier bench-report bench-features bench-broker \
	bench-api-load bench-finetune bench-evaluation bench-scratch default-model default-model-card

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on local disk, never a CUDA build pulled by a dependency
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

install: $(STAMP)

## Serve the API and a worker on the embedded default (SQLite, local files, no servers).
run: $(STAMP)
	$(BIN)/synthderm run

## Lint, type-check, validate the deployment files, then run every test.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app workers
	bash scripts/check_deploy.sh
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy app workers

deploy-check: $(STAMP)
	bash scripts/check_deploy.sh

## Build the random-weight tiny-random generator into var/models/tiny-random.
tiny-model: $(STAMP)
	$(BIN)/synthderm models build-tiny

## The API alone, or a worker alone (settings from SYNTHDERM_* variables).
serve: $(STAMP)
	$(BIN)/synthderm serve

worker: $(STAMP)
	$(BIN)/celery -A workers.celery_app worker -Q gpu,train --pool solo --concurrency 1 --loglevel INFO

## Generation throughput: plain pipeline vs the worker path (see bench/RESULTS.md).
bench-generation: $(STAMP)
	$(BIN)/python -m bench.generation $(ARGS)

## Fine-tuning throughput: the plain DreamBooth loop vs models.finetune.train (bench/RESULTS.md).
bench-finetune: $(STAMP)
	$(BIN)/python -m bench.finetune $(ARGS)

bench-backbone: $(STAMP)
	$(BIN)/python -m bench.backbone $(ARGS)

bench-classifier: $(STAMP)
	$(BIN)/python -m bench.classifier $(ARGS)

bench-report: $(STAMP)
	$(BIN)/python -m bench.report $(ARGS)

bench-features: $(STAMP)
	$(BIN)/python -m bench.features $(ARGS)

## The embedded broker after N messages: file size, empty poll, idle worker CPU vs kombu's stock.
bench-broker: $(STAMP)
	$(BIN)/python -m bench.broker $(ARGS)

## POST /jobs under load on the embedded default and PostgreSQL + Redis vs a bare FastAPI endpoint.
bench-api-load: $(STAMP)
	$(BIN)/python -m bench.api_load $(ARGS)

## Issue 23's evaluation math, 50,000 synthetic x 4,000 real features vs a naive baseline.
bench-evaluation: $(STAMP)
	$(BIN)/python -m bench.evaluation $(ARGS)

## The own generator's full training time projected from each stage's s/step vs the 90-min budget.
bench-scratch: $(STAMP)
	$(BIN)/python -m bench.scratch $(ARGS)

## Train the project's own generator into models/synthderm-fitz64 (issue 24; ARGS: --set NAME=VALUE).
default-model: $(STAMP)
	$(BIN)/python -m workers.default_model $(ARGS)

## Remake its model card: an embedded service of its own generates and evaluates (MODEL_CARD.md).
default-model-card: $(STAMP)
	$(BIN)/python -m workers.default_model_card $(ARGS)

## Create an API key: make keys NAME=alice
keys: $(STAMP)
	$(BIN)/synthderm keys create --name $(or $(NAME),$(USER),me)

clean:
	rm -rf var .mypy_cache .ruff_cache
