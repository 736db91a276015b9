#!/usr/bin/env bash
# README command 2 (and exactly what CI runs): install everything the tests need, run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
# PostgreSQL's server binaries live outside PATH on Debian (/usr/lib/postgresql/N/bin): check there.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  extra_pg=postgresql-server:postgresql  # no such command: always installs the package
fi
# RabbitMQ (the second broker of the broker tests, tests/test_brokers.py) is started by the tests
# from its own script, outside PATH: check there too.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  extra_rabbitmq=rabbitmq-server-script:rabbitmq-server  # no such command: always installs the package
fi
KGPU_EXTRAS=test scripts/bootstrap.sh ${extra_pg:-} ${extra_rabbitmq:-} promtool:prometheus mosquitto:mosquitto mosquitto_sub:mosquitto-clients chromium:chromium faketime:faketime gcc:gcc
echo "==> ruff (rules in pyproject.toml)"
.venv/bin/ruff check shared edge cloud kgpu bench tests
echo "==> mypy (files and options in pyproject.toml)"
.venv/bin/mypy
# Three workers (pytest-xdist), also on a 2-core CI machine: most tests wait on real processes
# (brokers, daemons, Prometheus), so the cores are mostly idle in a serial run (14:58 serial,
# 5:55 in three workers on the 2-core development machine), and every test must hold up on a
# busy machine anyway. The 25 slowest tests close the report: one creeping toward its timeout
# shows here first.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 3 --durations=25 "$@"
