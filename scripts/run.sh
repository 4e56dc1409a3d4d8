#!/usr/bin/env bash
# Set up, make a small demo trajectory if the store is empty, and serve the API on the
# embedded default (SQLite + in-process runner): http://127.0.0.1:8000/docs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
surfing demo
exec surfing serve "$@"
