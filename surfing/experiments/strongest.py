"""Surfing against the strongest baseline (issue 16): success against generator evaluations.

For each stored trajectory and measurement setting, on the same trials (x*, x_init from the
manifest's latent prior, y = A G_T(x*), success ||x_T - x*|| < 0.01), curves rather than
single points, each read off one run through `SolveResult.rounds` (a run with fewer rounds
ends exactly at that point):

- `lm-restarts`: Levenberg–Marquardt on G_T, then restart rounds r = 1 .. R (never looks at
  the trajectory);
- `lm-stride s`: surfing with schedule "lm-stride" on every s-th checkpoint, then its rescue
  rounds (what "auto" runs when m > 2k);
- `portfolio p`: the default (lm-restarts with p rounds, then lm-stride + rescue for the
  targets still unfitted), one curve per p;
- optionally the paper's surfing and 2,000-step Adam on G_T (one point each).

`--real N` adds off-range targets: N held-out Fashion-MNIST test images (Fig 4's error,
||G(x_T) - y||^2 / n) for each method's end point. Rows accumulate in the CSV across runs
(`--merge`), so the grid can be filled one model at a time.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import time
from collections.abc import Callable
from pathlib import Path

import torch

from surfing.experiments.common import (
    SUCCESS,
    add_common,
    command,
    link,
    open_store,
    pyplot,
    save_figure,
)
from surfing.experiments.report import markdown_table, wilson_interval, write_csv, write_section
from surfing.experiments.sensing import measurement_matrix
from surfing.latents import sample_latents
from surfing.portfolio import portfolio
from surfing.restarts import direct, lm_restarts
from surfing.solvers import MISS_RTOL, SolveResult, StageRule, surf
from surfing.trajectory import final_generator, generators

HELP = "Issue 16: surfing vs. LM with restarts, success against evaluations per target"
COMMAND_KEYS = ("models", "m", "trials", "rounds", "strides", "rescue_rounds",
                "portfolio_rounds", "miss_rtol", "lm_stall", "paper", "adam", "real",
                "seed")  # fmt: skip
FAMILIES = ("lm-restarts", "lm-stride", "portfolio")
# The miss test of every row without a "miss=" tag (sessions 8-11, before MISS_RTOL became 1e-5).
UNTAGGED_MISS = 1e-4
CSV_NAME = "strongest.csv"
REAL_CSV_NAME = "strongest_real.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, help="trajectory ids")
    p.add_argument("--m", nargs="+", default=["0"],
                   help="measurements per setting: 0 = A = I, an integer, or '2k'")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="lm-restarts' largest round count")
    p.add_argument("--strides", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rescue-rounds", type=int, default=2, help="lm-stride's rescue rounds")
    p.add_argument("--portfolio-rounds", type=int, nargs="+", default=[2, 5])
    p.add_argument("--methods", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                   help="which curves to run (a partial run merges into earlier rows)")  # fmt: skip
    p.add_argument("--miss-rtol", type=float,
                   help="the miss test's threshold on ||r||^2/||b||^2 for every method (default "
                   f"the solvers' {MISS_RTOL:g}); method names say it unless it is "
                   f"{UNTAGGED_MISS:g}")  # fmt: skip
    p.add_argument("--lm-stall", type=float, default=StageRule.lm_stall,
                   help="StageRule.lm_stall for lm-restarts and the portfolio (default "
                   f"{StageRule.lm_stall:g}); method names say it unless it is 0")  # fmt: skip
    p.add_argument("--paper", action="store_true", help="add the paper's surfing (slow)")
    p.add_argument("--adam", action="store_true", help="add 2,000-step Adam on G_T (slow)")
    p.add_argument("--real", type=int, default=0,
                   help="held-out test images (off-range); with --trials 0 only these")  # fmt: skip
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default $SURFING_DATA_DIR)")
    p.add_argument("--merge", action="store_true", help="keep other runs' rows in the CSVs")
    add_common(p, trials=300)


def m_of(token: str, k: int) -> int:
    """'0' -> 0 (A = I), '2k' -> 2k, else the integer."""
    return 2 * k if token == "2k" else int(token)


Solver = Callable[[torch.Tensor, torch.Tensor], SolveResult]


def solvers(args: argparse.Namespace, store, model_id: str, G, A, prior: str) -> dict:
    """name -> solve(b, x_init) for every method of the grid, in the order reported."""

    def surfer(stride: int, schedule: str, **kw) -> Solver:
        stages = generators(store, model_id, stride, args.device)
        return lambda b, x0: surf(stages, b, x0, A, steps=args.steps, lr=args.lr,
                                  final_steps=args.final_steps, schedule=schedule,
                                  prior=prior, **kw)  # fmt: skip

    miss = MISS_RTOL if args.miss_rtol is None else args.miss_rtol
    tag = "" if miss == UNTAGGED_MISS else f" miss={miss:g}"
    rule = StageRule(rescue_rounds=args.rescue_rounds, rescue_rtol=miss)
    stall = StageRule(lm_stall=args.lm_stall)  # the restart phases' LM
    stall_tag = tag + ("" if args.lm_stall == 0 else f" stall={args.lm_stall:g}")
    out: dict[str, Solver] = {} if "lm-restarts" not in args.methods else {
        f"lm-restarts{stall_tag}": lambda b, x0: lm_restarts(
            G, b, x0, A, rounds=args.rounds, rtol=miss, seed=args.seed, prior=prior, rule=stall),
    }  # fmt: skip
    for s in args.strides if "lm-stride" in args.methods else []:
        out[f"lm-stride s={s}{tag}"] = surfer(s, "lm-stride", rule=rule)
    stages = generators(store, model_id, 1, args.device)
    for p in args.portfolio_rounds if "portfolio" in args.methods else []:
        out[f"portfolio p={p}{stall_tag}"] = lambda b, x0, p=p: portfolio(
            stages, b, x0, A, args.steps, args.lr, None, args.final_steps, prior=prior,
            rule=StageRule(rescue_rtol=miss, lm_stall=args.lm_stall), rounds=p,
        )
    if args.paper:
        out["paper"] = surfer(1, "paper")
    if args.adam:
        out["adam"] = lambda b, x0: direct(G, b, x0, A, args.direct_steps, args.lr)
    return out


def points(res: SolveResult) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, x, per-target evals) after every pass, or the end point alone."""
    if res.rounds:
        return [(r.name, r.x, r.target_evals) for r in res.rounds]
    cost = res.target_evals if res.target_evals is not None else torch.full(
        (res.x.shape[0],), float(res.evals), dtype=torch.float64)  # fmt: skip
    return [("end", res.x, cost)]


def run_setting(args, store, model_id: str, token: str) -> tuple[list[dict], list[dict]]:
    manifest = store.manifest(model_id)
    k, n, prior = manifest.latent_dim, manifest.n_pixels, manifest.latent_prior
    m = m_of(token, k)
    device = torch.device(args.device)
    G = final_generator(store, model_id, device)
    x_star = sample_latents(args.trials, k, args.seed, prior, device)
    x_init = sample_latents(args.trials, k, args.seed + 1, prior, device)
    A = None if m == 0 else measurement_matrix(args.seed, m, n, device)
    b = torch.empty(0)
    if args.trials:
        with torch.no_grad():
            y = G(x_star).flatten(1)
        b = y if A is None else y @ A.T
    setting = "A = I" if m == 0 else f"m = {m}"
    real = None
    if args.real:
        from surfing.experiments.fig4 import test_images

        real = test_images(args.real, args.seed, args.data_dir).flatten(1).to(device)
    rows, real_rows = [], []
    for name, solve in solvers(args, store, model_id, G, A, prior).items():
        t0 = time.perf_counter()
        res = solve(b, x_init) if args.trials else None  # --trials 0: off-range targets only
        seconds = time.perf_counter() - t0
        found = points(res) if res is not None else []
        for i, (label, x, cost) in enumerate(found):
            wins = int(((x - x_star).norm(dim=1) < SUCCESS).sum())
            lo, hi = wilson_interval(wins, args.trials)
            rows.append({
                "model": model_id, "k": k, "setting": setting, "method": name,
                "after": label, "end": i == len(found) - 1, "trials": args.trials,
                "success %": round(100.0 * wins / args.trials, 2),
                "95% CI": f"{100 * lo:.1f}-{100 * hi:.1f}",
                "evals / target": round(float(cost.double().mean()), 1),
                "seconds": round(seconds, 1) if i == len(found) - 1 else "",
            })  # fmt: skip
        if found:
            print(
                f"  {model_id} {setting:8s} {name:16s} {rows[-1]['success %']:6.2f}% "
                f"{rows[-1]['evals / target']:8.1f} evals  {seconds:6.1f}s",
                flush=True,
            )
        if real is not None:
            x0 = sample_latents(len(real), k, args.seed + 2, prior, device)
            rr = solve(real if A is None else real @ A.T, x0)
            with torch.no_grad():
                err = (G(rr.x).flatten(1) - real).pow(2).mean(dim=1).cpu()
            cost = points(rr)[-1][2]
            real_rows.append({
                "model": model_id, "setting": setting, "method": name, "images": len(real),
                "median pixel error": round(float(err.median()), 4),
                "mean pixel error": round(float(err.mean()), 4),
                "p95 pixel error": round(float(err.quantile(0.95)), 4),
                "evals / target": round(float(cost.double().mean()), 1),
            })  # fmt: skip
    return rows, real_rows


def merged(path: Path, new: list[dict], keep: bool) -> list[dict]:
    """The new rows, plus (with `keep`) the old rows of (model, setting, method) not re-run."""
    if not keep or not path.exists():
        return new
    done = {(r["model"], r["setting"], r["method"]) for r in new}
    with path.open() as f:
        old = [r for r in csv.DictReader(f) if (r["model"], r["setting"], r["method"]) not in done]
    return old + new


def plot(rows: list[dict], path: Path) -> None:
    """One panel per (model, setting): success % against evaluations per target (log)."""
    plt = pyplot()
    panels = sorted({(r["model"], r["setting"]) for r in rows})
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, (model, setting) in zip(axes.flat, panels, strict=False):
        mine = [r for r in rows if (r["model"], r["setting"]) == (model, setting)]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = [r for r in mine if r["method"] == method]
            xs = [float(r["evals / target"]) for r in pts]
            ys = [float(r["success %"]) for r in pts]
            ax.plot(xs, ys, marker="o", markersize=3, label=method)
        ax.set_xscale("log")
        ax.set_title(f"{model}, {setting}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("evaluations / target", fontsize=7)
        ax.set_ylabel("success %", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    store = open_store(args)
    rows, real_rows = [], []
    out: dict[str, list[dict]] = {"rows": [], "real": []}  # this run's own rows
    keep = args.merge
    for model_id in args.models:
        for token in args.m:
            rows, real_rows = run_setting(args, store, model_id, token)
            # written after every setting (merged with what is there), so a stopped run keeps
            # what it finished; other runs may write at the same time, hence the lock
            args.out.mkdir(parents=True, exist_ok=True)
            with (args.out / f".{CSV_NAME}.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                report(args, rows, real_rows, args.out / CSV_NAME, keep)
            out["rows"] += rows
            out["real"] += real_rows
            keep = True  # later settings of this run add to the first
    return out


POOLED = ("lm-restarts", "lm-stride s=1", "portfolio p=2")  # compared like with like
POOLED_DEFAULT = ("lm-restarts", "lm-stride s=1", "portfolio p=5")  # m <= 2k default, sessions 9-10
ROUNDS = ("portfolio p=2", "portfolio p=5")  # the default's restart rounds, before and after


# Pooled tables split by operator too: A = I settings far outnumber the others and are solved
# by every method, so pooled over everything they would hide the compressed-sensing gaps.
OPERATORS = {
    "all": lambda setting: True,
    "A = I": lambda setting: setting == "A = I",
    "m < n": lambda setting: setting != "A = I",
}


def pooled(
    ends: list[dict], methods: tuple[str, ...] = POOLED, operators: str = "all"
) -> list[dict]:
    """Successes summed over the (model, setting) pairs (of `operators`) where every one of
    `methods` has an end point, with a 95 % Wilson interval: differences too small for one
    setting's trials."""
    by_pair: dict[tuple, dict[str, dict]] = {}
    for r in ends:
        if OPERATORS[operators](r["setting"]):
            by_pair.setdefault((r["model"], r["setting"]), {})[r["method"]] = r
    pairs = [p for p, ran in by_pair.items() if set(methods) <= set(ran)]
    out = []
    for method in methods:
        rows = [by_pair[p][method] for p in pairs]
        n = sum(int(r["trials"]) for r in rows)
        wins = sum(round(float(r["success %"]) * int(r["trials"]) / 100) for r in rows)
        evals = sum(float(r["evals / target"]) * int(r["trials"]) for r in rows)
        lo, hi = wilson_interval(wins, n)
        out.append({"operators": operators, "method": method, "settings": len(pairs),
                    "trials": n, "successes": wins,
                    "success %": round(100 * wins / max(n, 1), 2),
                    "95% CI": f"{100 * lo:.1f}-{100 * hi:.1f}",
                    "evals / target": round(evals / max(n, 1), 1)})  # fmt: skip
    return out


def order(row: dict) -> tuple:
    """Model, then A = I before growing m, then the methods in the order they were run."""
    m = 0 if row["setting"] == "A = I" else int(str(row["setting"]).split("= ")[1])
    return (row["model"], m)


def report(
    args: argparse.Namespace, rows: list[dict], real_rows: list[dict], csv_path: Path, keep: bool
) -> None:
    """Merge with earlier rows (`keep`), write the CSVs, the curves and the results section."""
    rows = sorted(merged(csv_path, rows, keep), key=order)
    if not rows:
        raise SystemExit("nothing to report: --trials 0 needs --merge with earlier rows")
    write_csv(csv_path, rows)
    png = args.out / "strongest_curves.png"
    plot(rows, png)
    ends = [{key: v for key, v in r.items() if key != "end"}
            for r in rows if str(r["end"]) == "True"]  # fmt: skip
    body = [
        "### Pooled over the settings every compared method ran in\n",
        markdown_table([r for op in OPERATORS for r in pooled(ends, POOLED, op)]),
        "\n### The same with the default's 5 restart rounds (fewer settings: where p = 5 ran)\n",
        markdown_table([r for op in OPERATORS for r in pooled(ends, POOLED_DEFAULT, op)]),
        "\n### The default's restart rounds: portfolio p = 2 against p = 5 where both ran\n",
        markdown_table([r for op in OPERATORS for r in pooled(ends, ROUNDS, op)]),
        "\n### Curves: success against evaluations per target\n",
        f"Last run: `{command('strongest', args, COMMAND_KEYS)}` on {args.device} "
        f"(`--merge` keeps other models' rows; each row says its trial count). Every point "
        f"below is read off one run per method through `SolveResult.rounds`; the table shows "
        f"end points, [{CSV_NAME}]({link(csv_path, args.results_md)}) every point.\n",
        markdown_table(ends),
        f"\n![success against evaluations]({link(png, args.results_md)})\n",
    ]
    real_path = args.out / REAL_CSV_NAME
    if real_rows or (keep and real_path.exists()):
        real_rows = sorted(merged(real_path, real_rows, keep), key=order)
        write_csv(real_path, real_rows)
        body += [
            "\nOff-range targets (held-out test images, per-pixel error "
            "||G(x_T) - y||^2 / n, each method's end point):\n",
            markdown_table(real_rows),
        ]
    write_section("strongest-grid", "\n".join(body), args.results_md)
