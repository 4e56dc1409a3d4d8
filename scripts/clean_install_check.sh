#!/usr/bin/env bash
# A clean install: a fresh virtualenv that does not see this machine's site-packages gets the
# pinned CPU torch, then this package with its *declared* dependencies only; then the CLI, the
# API start-up and a smoke job run there. It catches imports that work in CI only because
# something else happened to be installed (issue 14: scipy). scripts/test.sh calls it.
#
# The install is editable because the service migrates its SQLite file with the repository's
# alembic.ini + migrations/ (as the Docker image does); the venv still sees no other packages.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

python3 -m venv "$WORK/venv"  # no --system-site-packages: nothing but what we install
PY=$WORK/venv/bin/python
pip_install() {  # quiet, but show pip's output if it fails
  "$PY" -m pip install -q --disable-pip-version-check "$@" >"$WORK/pip.log" 2>&1 \
    || { cat "$WORK/pip.log" >&2; return 1; }
}
pip_install torch==2.13.0
pip_install -e "$REPO" --config-settings editable_mode=compat
echo "clean install: $("$PY" -m pip list --format=freeze 2>/dev/null | wc -l) packages in the venv"

cd "$WORK"  # away from the checkout: imports resolve through the venv only
"$WORK/venv/bin/surfing" --help >/dev/null
"$WORK/venv/bin/surfing" keys --help >/dev/null
"$WORK/venv/bin/surfing" worker --help >/dev/null

export SURFING_STATE_DIR=$WORK/state SURFING_MODELS_DIR=$WORK/models SURFING_TORCH_THREADS=1
"$PY" - <<'EOF'
# A two-checkpoint trajectory of a tiny generator, written through the public store API.
import os, torch
from models_store import ModelStore
from surfing.architectures import build_generator
arch = {"kind": "relu", "latent_dim": 2, "hidden": [8], "out_dim": 16}
with ModelStore(os.environ["SURFING_MODELS_DIR"]).create(
    "smoke", arch=arch, latent_dim=2, output_shape=[16], value_range=[-10.0, 10.0],
    training={"method": "smoke"}, dataset="none",
) as w:
    for step in (0, 10):
        torch.manual_seed(step)
        w.add(step, build_generator(arch).state_dict())
EOF

PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$WORK/venv/bin/surfing" serve --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
if ! "$PY" - "$PORT" <<'EOF'
# /healthz, then one small job end to end through the API (JSON in, result out).
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())
deadline = time.monotonic() + 60
while True:
    try:
        assert call("/healthz") == (200, {"status": "ok"})
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("the API did not start")
        time.sleep(0.3)
status, job = call("/invert", {"model_id": "smoke", "image": [0.5] * 16, "method": "adam",
                               "direct_steps": 50})
assert status == 202, job
while job["status"] not in ("succeeded", "failed", "canceled"):
    if time.monotonic() > deadline:
        raise SystemExit(f"smoke job stuck: {job}")
    time.sleep(0.3)
    job = call(f"/jobs/{job['job_id']}")[1]
assert job["status"] == "succeeded", job
assert len(job["result"]["latent"][0]) == 2, job["result"]
print("clean install: surfing --help, API start-up and a smoke job passed")
EOF
then
  echo "clean install check failed; server log:" >&2
  tail -n 40 "$WORK/serve.log" >&2
  exit 1
fi
