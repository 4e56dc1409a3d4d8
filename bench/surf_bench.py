"""Benchmark: surfing variants vs. one 2,000-step direct-Adam run, same targets, same run.

Prints one table per measurement operator (A = I, and Gaussian A with m rows): variant, wall
time, ratio to the direct-Adam baseline measured in this run, success rate (||x_T - x*|| <
0.01), generator evaluations per target, I/O share (time the solver waited for the next
checkpoint / wall time), bytes on disk of the trajectory, and achieved generator FLOP/s as a
fraction of the machine's measured matmul FLOP/s. Optionally the batching comparison (one
300-target pass vs. single-target jobs). Not a timed test: run it by hand, e.g.

    flock /tmp/surfing-heavy.lock python bench/surf_bench.py --model dcgan-k10 --targets 100

A variant is a schedule name, optionally with StageRule overrides after a colon, so settings
can be measured one by one in the same run, e.g. `lm-stride:skip_xtol=0.01,reuse_max=0` or
`lm:rescue_rtol=none` (no rescue pass);
`portfolio:readers=0` reads each checkpoint in the solver's thread when due (no reader thread);
`portfolio:chain=0` computes every Jacobian with torch.func instead of along the generator's
layer chain (surfing.dual; the baseline rows use the chain: Adam has no Jacobian, LM rows do);
`paper:graphs=1` runs the paper schedule's Adam steps as a replayed CUDA graph
(surfing.graphs), and `--graphs` adds the graphed direct-Adam baseline as a row.
`--tf32 off` turns TF32 off for cuDNN convolutions and matmuls (a GPU's default keeps it on for
convolutions); the "median dist" column shows what that does to precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

import surfing.lm
from models_store import ModelStore, default_store_root
from models_store.reading import is_sealed
from surfing.lm import CHORD, CHORD_THEN_FRESH, FRESH, SKIP, levenberg_marquardt
from surfing.measure import gaussian_matrix
from surfing.nets import InfoGANGenerator
from surfing.solvers import (
    SolveResult,
    StageRule,
    direct,
    lm_restarts,
    surf,
    uniform_latents,
)
from surfing.trajectory import Generators, final_generator, generators

SUCCESS = 0.01


class TimedStages:
    """Wraps a stage stream and adds up the time the consumer waits in next() (I/O share)."""

    def __init__(self, stages: Generators) -> None:
        self.stages, self.wait = stages, 0.0

    def __len__(self) -> int:
        return len(self.stages)

    def final(self) -> tuple:
        """G_T for the schedule "portfolio" (its load counts as waiting too)."""
        t0 = time.perf_counter()
        try:
            return self.stages.final()
        finally:
            self.wait += time.perf_counter() - t0

    def __iter__(self) -> Iterator:
        it = iter(self.stages)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.wait += time.perf_counter() - t0
                return
            self.wait += time.perf_counter() - t0
            yield item


def generator_flops(G: torch.nn.Module) -> float:
    """Multiply-adds x2 of one forward pass for one latent (linear and transposed-conv layers)."""
    if not isinstance(G, InfoGANGenerator):
        return float("nan")
    total = 0.0
    h = 7
    for mod in G.modules():
        if isinstance(mod, torch.nn.Linear):
            total += 2.0 * mod.in_features * mod.out_features
        elif isinstance(mod, torch.nn.ConvTranspose2d):
            k = mod.kernel_size[0]
            total += 2.0 * mod.in_channels * mod.out_channels * k * k * h * h
            h *= 2
    return total


def sync(device: torch.device) -> None:
    """Drain the GPU queue before reading the clock (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device) -> float:
    """The device's fp32 matmul FLOP/s (best of a few n^3 products; n = 1024 on the CPU at the
    current thread count, 8192 on a GPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(20 if device.type == "cpu" else 6):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@dataclass
class Row:
    variant: str
    seconds: float
    success: float
    evals: int
    io: float
    disk: int
    probe: float  # seconds of PROBE_STEPS direct-Adam steps timed just before this row
    median_dist: float  # median ||x_T - x*|| (precision, beyond the 0.01 success threshold)

    def fmt(self, base: Row, flops: float, peak: float) -> str:
        achieved = flops / self.seconds if self.seconds else float("nan")
        normalised = (self.seconds / self.probe) / (base.seconds / base.probe)
        return (
            f"| {self.variant} | {self.seconds:.1f} | {self.seconds / base.seconds:.3f} | "
            f"{normalised:.3f} | {100 * self.success:.1f} | {self.evals} | "
            f"{100 * self.io:.1f} | {self.disk / 1e6:.1f} | {100 * achieved / peak:.1f} | "
            f"{self.median_dist:.1e} |"
        )


PROBE_STEPS = 60


def parse_variant(
    spec: str, base: StageRule
) -> tuple[str, StageRule, bool, int | None, bool]:
    """'schedule[:field=value,...]' -> (schedule, StageRule with those fields overridden,
    whether to use CUDA graphs: the pseudo-field `graphs`, the stream's reader threads: the
    pseudo-field `readers`, 0 = read each checkpoint in the solver's thread when due, None =
    surfing.trajectory.Generators' default, whether Jacobians go along the generator's layer
    chain: the pseudo-field `chain`, 0 = torch.func for every Jacobian, surfing.lm.LAYER_CHAIN)."""
    name, _, opts = spec.partition(":")
    types = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(StageRule)}
    types["rescue_rtol"] = float  # optional: "none" turns the rescue off
    types["head_steps"] = int  # optional: "none" = the call's steps
    types["latent_radius"] = float  # optional: "none" = unbounded
    changes: dict[str, object] = {}
    graphs, readers, chain = False, None, True
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key == "graphs":
            graphs = value.lower() in ("1", "true", "yes")
            continue
        if key == "readers":
            readers = int(value)
            continue
        if key == "chain":
            chain = value.lower() in ("1", "true", "yes")
            continue
        if key not in types:
            raise SystemExit(f"unknown StageRule field {key!r} in variant {spec!r}")
        kind = types[key]
        if value.lower() == "none":
            changes[key] = None
        elif kind is bool:
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = kind(value)
    return name, dataclasses.replace(base, **changes), graphs, readers, chain


def action_shares(res: SolveResult) -> str:
    """For lm-stride: the share of (target, intermediate checkpoint) pairs per action."""
    acts = [t.action for t in res.trace if t.action is not None]
    if not acts:
        return ""
    a = torch.stack(acts)
    names = ((SKIP, "skip"), (CHORD, "chord"), (FRESH, "fresh"), (CHORD_THEN_FRESH, "chord+fresh"))
    return " ".join(f"{n} {100 * float((a == code).float().mean()):.0f}%" for code, n in names)


def rescued(res: SolveResult) -> str:
    """How many targets each pass after the first worked on: surf's rescue rounds, or the
    portfolio's restart rounds, its surf of the unfitted targets and their rescue."""
    seen: dict[tuple[str, int | None], int] = {}
    for t in res.trace:
        if t.moved is not None:
            seen.setdefault((t.pass_name, t.pass_round), int(t.moved.sum()))
    return " ".join(f"{name}{'' if r is None else r} {n}" for (name, r), n in seen.items())


def probe(G: torch.nn.Module, b: torch.Tensor, x: torch.Tensor, A: torch.Tensor | None) -> float:
    """Time a few direct-Adam steps on the same batch: the machine is shared, so its speed
    drifts between rows; dividing each row by the probe taken just before it cancels the drift
    (the 'load-normalised ratio' column)."""
    sync(b.device)
    t0 = time.perf_counter()
    direct(G, b, x, A, steps=PROBE_STEPS)
    sync(b.device)
    return time.perf_counter() - t0


def run_operator(args: argparse.Namespace, store: ModelStore, m: int | None, peak: float) -> None:
    manifest = store.manifest(args.model)
    k, n_pix = manifest.latent_dim, manifest.n_pixels
    dev = torch.device(args.device)
    G = final_generator(store, args.model, dev)
    x_star = uniform_latents(args.targets, k, args.seed, dev)
    x_init = uniform_latents(args.targets, k, args.seed + 1, dev)
    A = gaussian_matrix(args.seed + 2, m, n_pix).to(dev) if m else None
    with torch.no_grad():
        y = G(x_star).flatten(1)
        b = y if A is None else y @ A.T
    per_fwd = generator_flops(G) * args.targets

    def ok(res: SolveResult) -> float:
        return float(((res.x - x_star).norm(dim=1) < SUCCESS).float().mean())

    def dist(res: SolveResult) -> float:
        return float((res.x - x_star).norm(dim=1).median())

    rows: list[tuple[Row, float]] = []
    surfing.lm.LAYER_CHAIN = True  # the rows before the variants (a `chain=0` row changes it)
    # Warm-up: a short LM solve, then a probe. After LM's large tensors the same process runs
    # Adam 15-30 % faster (docs/performance.md, session 12); without it the baseline, always the
    # first row, ran in a colder process than every row after it.
    levenberg_marquardt(G, x_init, b, A, max_iters=2)
    probe(G, b, x_init, A)
    pr = probe(G, b, x_init, A)
    t0 = time.perf_counter()
    base_res = direct(G, b, x_init, A, steps=2000, lr=args.lr)
    sync(dev)
    base = time.perf_counter() - t0
    row = Row("direct Adam 2000 (baseline)", base, ok(base_res), 2000, 0.0, 0, pr, dist(base_res))
    rows.append((row, per_fwd * 2 * 2000))
    print(f"  baseline {base:.1f}s success {ok(base_res):.3f} probe {pr:.2f}s", flush=True)

    if args.graphs:
        direct(G, b, x_init, A, steps=5, lr=args.lr, graphs=True)  # warm-up: first capture
        pr = probe(G, b, x_init, A)
        t0 = time.perf_counter()
        g_res = direct(G, b, x_init, A, steps=2000, lr=args.lr, graphs=True)
        sync(dev)
        dt = time.perf_counter() - t0
        gap = float((g_res.x - base_res.x).abs().max())
        row = Row("direct Adam 2000, CUDA graph", dt, ok(g_res), 2000, 0.0, 0, pr, dist(g_res))
        rows.append((row, per_fwd * 2 * 2000))
        print(f"  graphed baseline {dt:.1f}s, max |x - x_eager| {gap:.1e}", flush=True)

    if args.direct_lm:
        pr = probe(G, b, x_init, A)
        t0 = time.perf_counter()
        lm = levenberg_marquardt(G, x_init, b, A, max_iters=40)
        sync(dev)
        dt = time.perf_counter() - t0
        lm_res = SolveResult(lm.x, lm.objective, int(lm.evals.mean()))
        row = Row("direct LM (no surfing)", dt, ok(lm_res), lm_res.evals, 0.0, 0, pr, dist(lm_res))
        rows.append((row, per_fwd * 2 * float(lm.evals.sum()) / args.targets))

    if args.lm_restarts is not None:
        pr = probe(G, b, x_init, A)
        t0 = time.perf_counter()
        lr_res = lm_restarts(G, b, x_init, A, rounds=args.lm_restarts)
        sync(dev)
        dt = time.perf_counter() - t0
        name = f"lm-restarts, {args.lm_restarts} rounds (no surfing)"
        row = Row(name, dt, ok(lr_res), lr_res.evals, 0.0, 0, pr, dist(lr_res))
        rows.append((row, per_fwd * 2 * lr_res.evals))
        print(f"  {name}: {dt:.1f}s success {ok(lr_res):.3f} evals {lr_res.evals}", flush=True)

    copies = args.compressed if (m or 0) in args.compressed_m else []
    for model_id in [args.model, *copies]:
        disk = sum(c.bytes for c in store.manifest(model_id).checkpoints)
        for variant in args.variants:
            if model_id != args.model and variant not in args.compressed_variants:
                continue
            base_rule = StageRule(lm_stage_iters=args.lm_stage_iters or StageRule.lm_stage_iters)
            schedule, rule, graphs, readers, chain = parse_variant(variant, base_rule)
            surfing.lm.LAYER_CHAIN = chain  # this row's Jacobians (every row sets it)
            # a fresh store per row, as a new process: it hashes every file it reads once,
            # except files sealed by an earlier verification (--no-seals: every file)
            fresh = ModelStore(store.root, seals=not args.no_seals)
            stages = TimedStages(Generators(fresh, model_id, args.stride, dev, readers))
            pr = probe(G, b, x_init, A)
            t0 = time.perf_counter()
            try:
                res = surf(
                    stages,
                    b,
                    x_init,
                    A,
                    steps=args.steps,
                    lr=args.lr,
                    final_steps=args.final_steps,
                    schedule=schedule,
                    rule=rule,
                    graphs=graphs,
                )
            except Exception as err:  # e.g. a graph capture the device refuses: report, go on
                print(f"  surf {variant} FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            sync(dev)
            dt = time.perf_counter() - t0
            name = f"surf {variant}" + ("" if model_id == args.model else f" [{model_id}]")
            row = Row(name, dt, ok(res), res.evals, stages.wait / dt, disk, pr, dist(res))
            rows.append((row, per_fwd * 2 * res.evals))
            print(
                f"  {name}: {dt:.1f}s success {ok(res):.3f} evals {res.evals} probe {pr:.2f}s "
                f"{action_shares(res)} {rescued(res)}",
                flush=True,
            )

    op = "A = I" if A is None else f"Gaussian A, m = {m}"
    where = f"{torch.get_num_threads()} threads" if dev.type == "cpu" else str(dev)
    print(f"\n### {args.model}, {op}, {args.targets} targets, {where}\n")
    print(
        "| variant | wall s | ratio to direct Adam | load-normalised ratio | success % "
        "| evals/target | I/O % | MB on disk | FLOP/s % of matmul | median dist |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, flops in rows:
        print(row.fmt(rows[0][0], flops, peak))
    print(flush=True)


def run_batching(args: argparse.Namespace, store: ModelStore) -> None:
    """One pass with `--batch-targets` targets vs. single-target jobs (sampled, extrapolated)."""
    k = store.manifest(args.model).latent_dim
    dev = torch.device(args.device)
    G = final_generator(store, args.model, dev)
    n = args.batch_targets
    x_star = uniform_latents(n, k, args.seed + 10, dev)
    x_init = uniform_latents(n, k, args.seed + 11, dev)
    with torch.no_grad():
        b = G(x_star).flatten(1)
    # warm-up, untimed: first-call costs (cuDNN algorithm choice, graph pools, page cache)
    surf(generators(store, args.model, args.stride, dev), b[:1], x_init[:1], graphs=args.graphs)
    sync(dev)
    t0 = time.perf_counter()
    together = surf(
        generators(store, args.model, args.stride, dev),
        b,
        x_init,
        steps=args.steps,
        lr=args.lr,
        final_steps=args.final_steps,
        graphs=args.graphs,
    )
    sync(dev)
    batched = time.perf_counter() - t0
    singles = []
    for i in range(args.single_jobs):
        sync(dev)
        t0 = time.perf_counter()
        alone = surf(
            generators(store, args.model, args.stride, dev),
            b[i : i + 1],
            x_init[i : i + 1],
            steps=args.steps,
            lr=args.lr,
            final_steps=args.final_steps,
            graphs=args.graphs,
        )
        sync(dev)
        singles.append(time.perf_counter() - t0)
        diff = float((alone.x - together.x[i : i + 1]).abs().max())
        print(f"  single job {i}: {singles[-1]:.1f}s, max |x_alone - x_batched| = {diff:.2e}")
    per_job = sum(singles) / len(singles)
    graphs = ", CUDA graphs" if args.graphs else ""
    print(f"\n### batching, default schedule{graphs}, {args.model}, A = I, {dev}\n")
    print(f"- one {n}-target pass: {batched:.1f} s ({n / batched:.2f} targets/s)")
    print(
        f"- single-target job (mean of {len(singles)}): {per_job:.1f} s "
        f"({1 / per_job:.3f} targets/s)"
    )
    print(f"- throughput ratio batched / one-by-one: {per_job * n / batched:.1f}x\n", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--targets", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--m", type=int, nargs="*", default=[0, 50], help="0 = identity")
    p.add_argument("--skip-operators", action="store_true", help="only the batching part")
    p.add_argument("--variants", nargs="+", default=["portfolio", "paper", "auto"])
    p.add_argument("--compressed", nargs="*", default=[], help="compressed copies of --model")
    p.add_argument("--compressed-variants", nargs="*", default=["paper", "adaptive"])
    p.add_argument("--compressed-m", type=int, nargs="*", default=[0], help="operators for them")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--final-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-stage-iters", type=int, default=0, help="override StageRule's")
    p.add_argument("--direct-lm", action="store_true", help="also time LM on G_T alone")
    p.add_argument("--lm-restarts", type=int, help="also time lm-restarts with R rounds")
    p.add_argument("--batch-targets", type=int, default=0, help="0 = skip batching comparison")
    p.add_argument("--single-jobs", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--graphs",
        action="store_true",
        help="add the CUDA-graphed baseline row; the batching comparison uses graphs too",
    )
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default")
    p.add_argument("--no-seals", action="store_true",
                   help="every surf row hashes every file it reads (ignore the files' seals)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.tf32 != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    store = ModelStore(args.models_dir or default_store_root())
    dev = torch.device(args.device)
    peak = matmul_flops(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"machine: {name}, {torch.get_num_threads()} CPU threads, fp32 matmul "
        f"{peak / 1e9:.1f} GFLOP/s; torch {torch.__version__}; TF32 conv "
        f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}",
        flush=True,
    )
    manifest = store.manifest(args.model)
    sealed = sum(is_sealed(store.path(args.model) / c.file, c.sha256) for c in manifest.checkpoints)
    print(f"{args.model}: {sealed} of {len(manifest.checkpoints)} checkpoint files sealed "
          f"(a fresh store skips their hash){'; ignored: --no-seals' if args.no_seals else ''}")
    for m in [] if args.skip_operators else args.m:
        run_operator(args, store, m or None, peak)
    print(
        f"matmul FLOP/s measured again at the end: {matmul_flops(dev) / 1e9:.1f} G "
        "(the machine is shared: the best of the two is the peak to compare against)"
    )
    if args.batch_targets:
        run_batching(args, store)


if __name__ == "__main__":
    main()
