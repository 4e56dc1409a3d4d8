"""How much of a checkpoint file one posix_fadvise(WILLNEED) brings into the page cache.

Drops the page cache (root, Linux), asks for one file whole in one request, waits, and reads
the resident size with util-linux's `fincore`; then the same with
`models_store.reading.will_need`, which asks in pieces (as a sealed file is read). The kernel
caps one request at its readahead window, so one request for a larger file brings in only the
window. E.g.

    python bench/readahead_check.py --model dcgan-k10 --index 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pass_cost import drop_page_cache

from models_store import ModelStore, default_store_root
from models_store.reading import will_need


def one_request(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def resident_after(path: Path, ask: Callable[[Path], None], wait_s: float) -> str:
    drop_page_cache()
    ask(path)
    time.sleep(wait_s)
    out = subprocess.run(["fincore", "--noheadings", "--bytes", "-o", "RES,SIZE", str(path)],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return f"{int(out[0]) / 2**20:.1f} of {int(out[1]) / 2**20:.1f} MiB resident"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dcgan-k10")
    ap.add_argument("--index", type=int, default=10)
    ap.add_argument("--wait", type=float, default=1.0, help="seconds before fincore looks")
    args = ap.parse_args()
    store = ModelStore(default_store_root())
    path = store.path(args.model) / store.manifest(args.model).checkpoints[args.index].file
    dev = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    ra = next((q for q in (block / "queue", block / "../queue") if q.exists()), None)
    window = f"{(ra / 'read_ahead_kb').read_text().strip()} KB" if ra else "unknown"
    print(f"{path}: readahead window {window}, kernel {os.uname().release}")
    print(f"one WILLNEED for the whole file: {resident_after(path, one_request, args.wait)}")
    print(f"models_store.reading.will_need: {resident_after(path, will_need, args.wait)}")


if __name__ == "__main__":
    main()
