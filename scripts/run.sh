#!/usr/bin/env bash
# First use: install what the embedded default needs (setup.sh --minimal: the package and, if
# missing, the Fashion-MNIST Debian package), train the small demo trajectory if the store is
# empty, serve the API and its page (SQLite + in-process runner), and print the page's URL as
# soon as the server answers.   PORT=8080 bash scripts/run.sh   or   bash scripts/run.sh --port 8080
# (also --host / HOST: anything but loopback turns API keys on, see README "Access").
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=${2:?--port needs a number}; shift 2 ;;
    --port=*) PORT=${1#--port=}; shift ;;
    --host) HOST=${2:?--host needs an address}; shift 2 ;;
    --host=*) HOST=${1#--host=}; shift ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# On a busy machine OpenMP's spinning threads fight the other processes: the demo's training
# steps measured 8x slower with the default policy (docs: README "The two commands").
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

"$PY" - "$HOST" "$PORT" <<'EOF' || exit 2
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        s.bind((host, port))
    except OSError as e:
        sys.exit(f"run.sh: cannot serve on {host}:{port} ({e.strerror}); "
                 f"pick another port: PORT=8080 bash scripts/run.sh")
EOF

bash scripts/setup.sh --minimal
"$PY" -m surfing.cli demo

"$PY" -m surfing.cli serve --host "$HOST" --port "$PORT" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' INT TERM EXIT
shown=$HOST
case "$HOST" in 0.0.0.0|::) shown=127.0.0.1 ;; *:*) shown="[$HOST]" ;; esac
URL="http://$shown:$PORT/"
"$PY" - "$URL" "$server" <<'EOF' || exit 1
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(url + "healthz", timeout=2).close()
        break
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("run.sh: the server stopped before it answered (see its log above)")
        time.sleep(0.3)
bar = "=" * (len(url) + 28)
print(f"\n{bar}\n  Surfing is ready: {url}\n  API docs: {url}docs   (Ctrl-C stops)\n{bar}\n",
      flush=True)
EOF
wait "$server"
