#!/usr/bin/env bash
# Run README's "API examples" exactly as written against a fresh embedded server, so they keep
# copy-pasting. Every curl gets --fail-with-body (an HTTP error stops the run and shows the
# problem), `H=localhost:8000` points at the server started here, and the commands run in a
# scratch folder. Needs demo-dcgan-k10 in the store ($SURFING_MODELS_DIR or ./data/models):
# `surfing demo` makes it when the store is empty.       bash scripts/check_readme_examples.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
PORT=${PORT:-8765}
export SURFING_MODELS_DIR=${SURFING_MODELS_DIR:-$ROOT/data/models}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

"$PY" -m surfing.cli demo
[ -f "$SURFING_MODELS_DIR/demo-dcgan-k10/manifest.json" ] || {
  echo "check_readme_examples: the examples use demo-dcgan-k10, which $SURFING_MODELS_DIR lacks;" \
       "point SURFING_MODELS_DIR at an empty folder to have it made" >&2
  exit 2
}

WORK=$(mktemp -d)
unset DATABASE_URL REDIS_URL SURFING_AUTH  # embedded, loopback: no keys needed
export SURFING_STATE_DIR=$WORK/state  # a throwaway SQLite database
"$PY" -m surfing.cli serve --port "$PORT" > "$WORK/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 300); do
  curl -sf "localhost:$PORT/healthz" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
  sleep 0.2
done

"$PY" - "$ROOT/README.md" "$WORK/examples.sh" "$PORT" <<'EOF'
import re, sys
readme, out, port = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(readme, encoding="utf-8").read()
section = re.search(r"^## API examples\n(.*?)(?=^## |\Z)", text, re.S | re.M)
assert section, "README has no '## API examples' section"
blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
assert blocks, "no bash blocks under '## API examples'"
script = "\n".join(blocks)
assert "H=localhost:8000" in script, "the examples no longer set H=localhost:8000"
preamble = "set -euo pipefail -x\ncurl() { command curl --fail-with-body \"$@\"; }\n"
open(out, "w").write(preamble + script.replace("H=localhost:8000", f"H=localhost:{port}"))
EOF

cd "$WORK"
if ! bash "$WORK/examples.sh"; then
  echo "check_readme_examples: an example failed; server log:" >&2
  tail -20 "$WORK/server.log" >&2
  exit 1
fi
echo "check_readme_examples: every command ran; waiting for the jobs they submitted"
# Each job must end as the README says: succeeded, except the one it cancels.
"$PY" - "$SURFING_STATE_DIR/surfing.db" <<'EOF'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
deadline = time.monotonic() + 900
while True:
    rows = db.execute(
        "SELECT j.id, j.kind, j.method, j.status, j.error, r.objective, r.pixel_error "
        "FROM jobs j LEFT JOIN job_results r ON r.job_id = j.id ORDER BY j.created_at"
    ).fetchall()
    if all(r[3] in ("succeeded", "failed", "canceled") for r in rows):
        break
    if time.monotonic() > deadline:
        break
    time.sleep(2)
for r in rows:
    print(f"  {r[1]:6s} {r[2]:8s} {r[3]:9s} objective {r[5]} pixel error {r[6]} {r[4] or ''}")
canceled = [r for r in rows if r[3] == "canceled"]
assert len(rows) >= 7 and len(canceled) == 1, "expected 7+ jobs, one of them canceled"
bad = [r for r in rows if r[3] not in ("succeeded", "canceled")]
sys.exit(f"check_readme_examples: {len(bad)} job(s) did not succeed" if bad else 0)
EOF
echo "check_readme_examples: all README API examples ran and their jobs ended as expected"
