#!/usr/bin/env bash
# README command 1: set up on a fresh machine and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
KGPU_EXTRAS=demo scripts/bootstrap.sh mosquitto:mosquitto   # the lab extra; the demo runs its own broker
exec .venv/bin/kgpu demo "$@"
