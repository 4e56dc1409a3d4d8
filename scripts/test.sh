#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up, services, lint, pytest. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
python3 -m ruff check .
bash scripts/clean_install_check.sh  # fresh venv: declared dependencies only (~2 min)
python3 -m pytest -q -p no:cacheprovider "$@"
