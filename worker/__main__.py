"""`python -m worker [--burst]`: the same as `surfing worker` (used by the Docker image)."""

import argparse

from worker.main import run_worker

parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
run_worker(burst=parser.parse_args().burst)
