"""Benchmark: what one surfing pass costs for a handful of targets, and where the time goes.

The default solver surfs only the targets no restart fitted, often 1-5 of 100, and a pass for a
few targets costs nearly what it costs for many: every checkpoint is still read, hash-checked
and parsed, and every forward pass still reads all the weights. This times one `lm-stride` pass
(no rescue) from the same starts, for each batch size B, in four ways, all in one run:

- read ahead: a background reader thread reads, checks and decodes the next checkpoints while
  the solver works (what `Generators` does by default), with a fresh store that trusts the
  files' seals (a file verified once is not hashed again by any process), then with a fresh
  store that ignores them (`seals=False`: every file hashed, as a store did before seals)
- read when due: each checkpoint is read when the solver asks for it (`readers=0`), with a
  fresh unsealed store, then again with the same store (it skips the hash of files it has
  checked: a rescue pass, or the worker's next job on the same model)
- preloaded: every checkpoint decoded into memory first, so only the solver is timed
- stream only: the stream with no solver (the pipeline's own cost, nothing to overlap with),
  with a fresh unsealed store, the same store again, and a fresh store that trusts the seals
- with --cold, read ahead and read when due again with the page cache dropped before each pass

Not a timed test; e.g.

    python bench/pass_cost.py --model dcgan-k10 --targets 2 20 100 --threads 2 --cold
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

from models_store import ModelStore, default_store_root
from models_store.reading import SEAL_AFTER_S, is_sealed
from surfing.solvers import StageRule, surf, uniform_latents
from surfing.trajectory import Generators, final_generator

RULE = StageRule(rescue_rtol=None)  # one pass only: the rescue would stream it again


def timed_pass(stages: object, b: torch.Tensor, x0: torch.Tensor) -> float:
    t0 = time.perf_counter()
    surf(stages, b, x0, schedule="lm-stride", rule=RULE)  # type: ignore[arg-type]
    return time.perf_counter() - t0


def targets(G_T: torch.nn.Module, B: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, x_init) for B targets on the final network's range, as surf_bench draws them."""
    x_star = uniform_latents(B, k, seed)
    with torch.no_grad():
        b = G_T(x_star).flatten(1)
    return b, uniform_latents(B, k, seed + 1)


def drop_page_cache() -> None:
    """Cold start: the trajectory must come from the disk again (root only; Linux)."""
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)


def stream_only(store: ModelStore, model_id: str) -> float:
    """Seconds to stream every checkpoint with no solver."""
    t0 = time.perf_counter()
    for _ in Generators(store, model_id):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dcgan-k10")
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 2, 5, 20])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="stream-only passes (the machine drifts)")
    ap.add_argument("--cold", action="store_true",
                    help="also time read ahead / when due with the page cache dropped (root)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = default_store_root()
    manifest = ModelStore(root).manifest(args.model)
    n = len(manifest.checkpoints)
    G_T = final_generator(ModelStore(root), args.model)
    print(f"model {args.model}: {n} checkpoints, encoding {manifest.encoding}, "
          f"{args.threads} threads, torch {torch.__version__}")
    held = list(Generators(ModelStore(root), args.model))  # also warms the page cache
    folder = root / args.model
    sealed = sum(is_sealed(folder / c.file, c.sha256) for c in manifest.checkpoints)
    print(f"files sealed: {sealed} of {n} (a file is sealed once verified {SEAL_AFTER_S:g} s "
          "or more after its last change)")
    for _ in range(args.repeat):
        store = ModelStore(root, seals=False)
        first, again = stream_only(store, args.model), stream_only(store, args.model)
        sealed_s = stream_only(ModelStore(root), args.model)
        print(f"stream only: {1e3 * first / n:.1f} ms per checkpoint (fresh store, unsealed), "
              f"{1e3 * again / n:.1f} ms (the same store again), {1e3 * sealed_s / n:.1f} ms "
              "(fresh store, sealed)")
    print("| B | read ahead, sealed s | read ahead, unsealed s | read when due, unsealed s | "
          "read when due, again s | preloaded s | read ahead sealed / preloaded |")
    print("|---|---|---|---|---|---|---|")
    for B in args.targets:
        b, x0 = targets(G_T, B, manifest.latent_dim, args.seed)
        ahead = timed_pass(Generators(ModelStore(root), args.model, readers=1), b, x0)
        unsealed = timed_pass(
            Generators(ModelStore(root, seals=False), args.model, readers=1), b, x0
        )
        store = ModelStore(root, seals=False)  # fresh: it has hash-checked nothing yet
        due = timed_pass(Generators(store, args.model, readers=0), b, x0)
        again = timed_pass(Generators(store, args.model, readers=0), b, x0)
        pre = timed_pass(held, b, x0)
        print(f"| {B} | {ahead:.2f} | {unsealed:.2f} | {due:.2f} | {again:.2f} | {pre:.2f} | "
              f"{ahead / pre:.2f} |", flush=True)
    if not args.cold:
        return
    print("\ncold page cache (dropped before each pass), twice each:")
    print("| B | read ahead (1 reader) s | read when due s |")
    print("|---|---|---|")
    for B in args.targets:
        b, x0 = targets(G_T, B, manifest.latent_dim, args.seed)
        times: dict[int, list[float]] = {1: [], 0: []}
        for readers in (1, 0, 1, 0):
            drop_page_cache()
            stages = Generators(ModelStore(root), args.model, readers=readers)
            times[readers].append(timed_pass(stages, b, x0))
        fmt = " / ".join
        print(f"| {B} | {fmt(f'{t:.2f}' for t in times[1])} | "
              f"{fmt(f'{t:.2f}' for t in times[0])} |", flush=True)

if __name__ == "__main__":
    main()
