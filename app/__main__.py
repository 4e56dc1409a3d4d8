"""`python -m app [--host H] [--port P]`: the same as `surfing serve` (used by the Docker image)."""

import argparse

from app.main import serve

parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
args = parser.parse_args()
serve(host=args.host, port=args.port)
