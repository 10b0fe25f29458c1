# Everything starts from a fresh machine: these targets set up what they need.
.PHONY: up test setup lint bench docs screenshots

up:          ## set up and run the whole platform locally (embedded NATS, outbox, offline agent)
	./scripts/dev.sh up

test:        ## set up and run ruff, mypy --strict and the whole test suite
	./scripts/dev.sh test

setup:       ## only set up (.venv from uv.lock, the pinned Claude Code CLI)
	./scripts/dev.sh setup

lint:        ## ruff and mypy only
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:       ## the benchmarks (figures go into docs/performance.md)
	.venv/bin/python bench/pipeline.py

docs:        ## regenerate every file derived from the code (docs, NATS permissions, monitoring)
	.venv/bin/podium generate

screenshots: ## take the console's screenshots in docs/screenshots (the browser test)
	PODIUM_SCREENSHOTS=docs/screenshots .venv/bin/pytest -q tests/test_console_browser.py
