#!/usr/bin/env bash
# README command 1: set up on a fresh machine and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
KGPU_EXTRAS=demo scripts/bootstrap.sh mosquitto:mosquitto gcc:gcc   # the lab extra; the demo runs its own broker; gcc builds the simulated AMD library
exec .venv/bin/kgpu demo "$@"
