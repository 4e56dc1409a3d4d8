#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh Debian machine: system packages, then Python packages.
# torch is installed first and pinned: a loose range would pull a multi-GB CUDA build.
# `--minimal` (scripts/run.sh): only what the embedded default needs, see below.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--minimal" ]; then
  # The data set the demo trains on (if missing) and the package: no services, browsers or dev
  # tools (docker-compose, redis, postgresql, chromium are for scripts/test.sh).
  if [ ! -f "${SURFING_DATA_DIR:-/usr/share/datasets/fashion-mnist}/train-images-idx3-ubyte.gz" ]
  then
    echo "setup: installing dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q dataset-fashion-mnist
  fi
  "${PYTHON:-python3}" -m pip install -q --disable-pip-version-check torch==2.13.0
  "${PYTHON:-python3}" -m pip install -q --disable-pip-version-check -e . \
    --config-settings editable_mode=compat
  exit 0
fi

missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
# tests/test_browser.py: the page at / in a real headless browser (Selenium)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q "${missing[@]}"
fi

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat
# The worked example declares a generator in the `surfing.architectures` entry-point group;
# installed here so its test (tests/test_example_digits.py) finds it. Brings scikit-learn.
"$PY" -m pip install -q --disable-pip-version-check -e examples/digits --config-settings editable_mode=compat
