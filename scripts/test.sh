#!/usr/bin/env bash
# README command 2 (and exactly what CI runs): install everything the tests need, run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
KGPU_EXTRAS=test scripts/bootstrap.sh promtool:prometheus mosquitto:mosquitto
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
