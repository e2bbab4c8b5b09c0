#!/usr/bin/env bash
# Sets up (idempotent), builds a demo dataset of real photos and opens the
# FiftyOne App with the plugin loaded. Ctrl+C to stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FIFTYONE_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
exec .venv/bin/python scripts/demo.py "$@"
