#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite against a real mongod.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k label`.
#
# The browser tests (tests/e2e) run in a pytest process of their own:
# Playwright's sync API leaves an asyncio loop running in the main thread,
# and FiftyOne's execute_operator() then returns a Task instead of a result.
# A browser test that fails is retried twice (a real App on 2 busy cores
# can miss a timeout); every failure still leaves its screenshot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FIFTYONE_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider -q -rsR)

status=0
"${PYTEST[@]}" --ignore=tests/e2e "$@" || status=$?
# 5: nothing collected here (e.g. a -k that only matches browser tests)
[ "$status" = 5 ] && status=0
e2e=0
"${PYTEST[@]}" --reruns 2 --reruns-delay 2 tests/e2e "$@" || e2e=$?
[ "$e2e" = 5 ] && e2e=0
[ "$status" = 0 ] && status=$e2e
exit "$status"
