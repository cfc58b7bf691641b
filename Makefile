# Two commands do all the set-up on a fresh machine:
#   make demo   - the whole product on this machine (RabbitMQ, PostgreSQL, S3, simulator, worker)
#   make test   - lint, type-check and the full test suite against real services
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The official API-document parsers (Node packages, pinned by tests/contracts/package-lock.json).
CONTRACTS       := tests/contracts
CONTRACTS_STAMP := $(CONTRACTS)/node_modules/.installed

.PHONY: demo test test-rabbitmq4 lint typecheck services tools browser install contracts clean

$(STAMP): pyproject.toml
	# Debian's python3 comes without venv; on such a machine, install it first.
	$(PYTHON) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv \
		&& $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# npm ci installs exactly the lock file. No install scripts: the parser needs none, and one of
# its dependencies would otherwise try to send a telemetry ping.
$(CONTRACTS_STAMP): $(CONTRACTS)/package.json $(CONTRACTS)/package-lock.json
	command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
	npm ci --prefix $(CONTRACTS) --ignore-scripts --prefer-offline --no-audit --no-fund \
		--loglevel=error
	touch $(CONTRACTS_STAMP)

contracts: $(CONTRACTS_STAMP)

services:
	scripts/ensure-services.sh

# promtool, for the alert rules' tests (tests/test_alerts.py). Debian ships it only inside
# the prometheus package (19 MB; no daemon starts without an init system); the recommended
# node exporter is left out.
tools:
	@command -v promtool >/dev/null || { apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null; }
	@promtool --version | head -n1

# Debian's Chromium and its chromedriver, for the status pages' browser tests
# (tests/web/test_web_pages.py): headless, no browser download of selenium's own.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium chromium-driver >/dev/null; }
	@chromium --version 2>/dev/null

demo: $(STAMP) services
	$(BIN)/batch-worker demo

lint: $(STAMP)
	$(BIN)/ruff check worker tests bench examples scripts
	$(BIN)/ruff format --check worker tests bench examples scripts
	# the layers of docs/design.md: a module imports only from layers below its own
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy scripts/chart_readme.py

# Most tests wait on I/O (jobs running in the simulator): the suite's own processes use about
# 435 CPU-seconds in all, so six processes share two cores well, and work stealing keeps the
# long end-to-end tests from finishing last on one. The few that restart the shared broker
# run alone afterwards.
test: $(STAMP) $(CONTRACTS_STAMP) services tools browser lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider -n 6 --dist worksteal -m "not serial"
	$(BIN)/pytest -q -p no:cacheprovider -m serial
	$(MAKE) --no-print-directory test-rabbitmq4

# The broker-facing tests (marked `broker`: topology, consumer, relay, DLQ tools) once more,
# against RabbitMQ 4.0: a node of its own (port 5673, its own epmd) from Debian 13's
# packages in a chroot that the script builds once into /var/cache/batch-worker. It fails,
# never skips, where that cannot be had (no root, no Debian mirror).
test-rabbitmq4: $(STAMP)
	scripts/rabbitmq4.sh run $(BIN)/pytest -q -p no:cacheprovider -n 4 -m "broker and not serial"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(CONTRACTS)/node_modules
