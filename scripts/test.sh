#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite against a real mongod.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k label`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FIFTYONE_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -p no:cacheprovider -q "$@"
