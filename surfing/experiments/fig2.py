"""Figures 2 and 5: the distribution of ||x_T - x*|| for surfing vs. Adam on the final net.

The success rate of Table 1 hides *how* a solver fails; the histogram shows it: direct
descent either lands on x* or stalls far away, surfing should move mass to zero. One panel
per trajectory, laid out as the paper's figures (rows = training method, columns = k).
With `--trials-csv` the distances come from a finished table1 run instead of new solves.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from surfing.experiments.common import (
    COMMON_KEYS,
    SUCCESS,
    add_common,
    command,
    link,
    method_of,
    open_store,
    pyplot,
    save_figure,
    solve_batched,
    surf_with_bar,
)
from surfing.experiments.report import markdown_table, write_csv, write_section
from surfing.experiments.table1 import PAPER
from surfing.solvers import direct, uniform_latents
from surfing.trajectory import final_generator, generators

HELP = "Figs 2/5: distance-to-truth distributions, surf vs. Adam, per trajectory"
METHODS = ("vae", "dcgan", "wgan", "wgan-gp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, help="trajectory ids")
    p.add_argument("--trials-csv", type=Path, help="reuse table1_trials.csv (no new solves)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep other models' rows already in OUT/fig2*.csv (add trajectories run by run)",
    )
    add_common(p, trials=300)


def distances(model_id: str, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """||x_T - x*|| of surf and Adam on the same trials (the draws table1 uses too)."""
    store = open_store(args)
    k, device = store.manifest(model_id).latent_dim, torch.device(args.device)
    G = final_generator(store, model_id, device)
    x_star = uniform_latents(args.trials, k, args.seed, device)
    x_init = uniform_latents(args.trials, k, args.seed + 1, device)
    with torch.no_grad():
        b = G(x_star).flatten(1)
    stages = generators(store, model_id, args.stride, device)
    q = args.no_progress
    res = {
        "surf": solve_batched(
            lambda lo, hi: surf_with_bar(stages, b[lo:hi], x_init[lo:hi], None, args, "surf"),
            args.trials,
            args.batch,
            f"{model_id} surf",
            q,
        ),
        "adam": solve_batched(
            lambda lo, hi: direct(G, b[lo:hi], x_init[lo:hi], steps=args.direct_steps, lr=args.lr),
            args.trials,
            args.batch,
            f"{model_id} adam",
            q,
        ),
    }
    return {name: (r.x - x_star).norm(dim=1).cpu() for name, r in res.items()}


def from_csv(path: Path, model_id: str) -> dict[str, torch.Tensor]:
    """Distances of one model from table1's per-trial CSV (columns `dist surf`, `dist adam`)."""
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model_id]
    if not rows:
        raise ValueError(f"{path} has no trials of model {model_id!r}")
    return from_rows(rows, model_id)


def from_rows(rows: list[dict], model_id: str) -> dict[str, torch.Tensor]:
    """Distances of one model from per-trial rows (table1's or fig2's own CSV)."""
    mine = [r for r in rows if r["model"] == model_id]
    return {n: torch.tensor([float(r[f"dist {n}"]) for r in mine]) for n in ("surf", "adam")}


def kept_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """--merge: the summary and per-trial rows of earlier runs for models not in --models
    (their trajectories need not exist any more: everything shown is in the CSVs)."""
    summary, trials = args.out / "fig2.csv", args.out / "fig2_trials.csv"
    if not (args.merge and summary.exists() and trials.exists()):
        return [], []
    with summary.open() as f:
        rows = [r for r in csv.DictReader(f) if r["model"] not in args.models]
    with trials.open() as f:
        trial_rows = [r for r in csv.DictReader(f) if r["model"] not in args.models]
    for r in rows:
        r.setdefault("stream", "before fix")  # rows written before the column existed
        r["k"] = int(r["k"])
        r["trials"] = int(r["trials"])
        for key in r:
            if key.endswith(("%", "dist")):
                r[key] = float(r[key])
    return rows, trial_rows


def plot(panels: dict[str, tuple[str, int, dict[str, torch.Tensor]]], path: Path) -> None:
    """Histograms in a method x k grid (the paper's Fig 2 is the DCGAN row, Fig 5 the rest)."""
    plt = pyplot()
    methods = [m for m in METHODS if any(p[0] == m for p in panels.values())]
    methods += sorted({p[0] for p in panels.values()} - set(methods))
    ks = sorted({p[1] for p in panels.values()})
    fig, axes = plt.subplots(
        len(methods), len(ks), figsize=(4 * len(ks), 3 * len(methods)), squeeze=False
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for model_id, (method, k, d) in panels.items():
        ax = axes[methods.index(method)][ks.index(k)]
        ax.set_visible(True)
        hi = max(float(v.max()) for v in d.values()) or 1.0
        bins = torch.linspace(0, hi, 30).tolist()
        for name, color, label in (
            ("adam", "tab:blue", "Regular Adam"),
            ("surf", "tab:red", "Surfing"),
        ):
            weights = [1.0 / len(d[name])] * len(d[name])
            ax.hist(
                d[name].tolist(), bins=bins, weights=weights, alpha=0.6, color=color, label=label
            )
        ax.set_title(f"{method.upper()}, dim {k} ({model_id})", fontsize=9)
        ax.set_xlabel("distance to the truth")
        ax.set_ylabel("frequency")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> list[dict]:
    store = open_store(args)
    rows, trial_rows = kept_rows(args)
    panels = {r["model"]: (r["method"], r["k"], from_rows(trial_rows, r["model"])) for r in rows}
    kept = [r["model"] for r in rows]
    for model_id in args.models:
        method, k = method_of(store, model_id)
        d = from_csv(args.trials_csv, model_id) if args.trials_csv else distances(model_id, args)
        panels[model_id] = (method, k, d)
        paper_adam, paper_surf = PAPER.get((method, k), (float("nan"), float("nan")))
        rows.append(
            {
                "model": model_id,
                "method": method,
                "k": k,
                "trials": len(d["surf"]),
                "adam %": 100.0 * float((d["adam"] < SUCCESS).float().mean()),
                "surf %": 100.0 * float((d["surf"] < SUCCESS).float().mean()),
                "paper adam %": paper_adam,
                "paper surf %": paper_surf,
                "adam median dist": float(d["adam"].median()),
                "surf median dist": float(d["surf"].median()),
                "adam dist > 0.5 %": 100.0 * float((d["adam"] > 0.5).float().mean()),
                "surf dist > 0.5 %": 100.0 * float((d["surf"] > 0.5).float().mean()),
                "stream": "fixed",
            }
        )
        trial_rows += [
            {
                "model": model_id,
                "trial": i,
                "dist surf": float(d["surf"][i]),
                "dist adam": float(d["adam"][i]),
            }
            for i in range(len(d["surf"]))
        ]
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order.get(r["method"], len(order)), r["k"], r["model"]))
    write_csv(args.out / "fig2.csv", rows)
    write_csv(args.out / "fig2_trials.csv", trial_rows)
    png = args.out / "fig2_distances.png"
    plot(panels, png)
    source = (
        f"distances read from `{args.trials_csv}`, i.e. surf as table1 ran it -- see its "
        "section for the schedule; the flags below other than --models do not apply"
        if args.trials_csv
        else f"new solves, surfing schedule `{args.schedule}`"
    )
    keys = ["models", "trials", *COMMON_KEYS]
    earlier = (
        f" Rows of {', '.join(kept)} are kept from earlier runs (`--merge`: their flags are "
        "not recorded here; trial counts below). `stream` = `before fix`: solved before "
        "issue 12's stream fix, when each stage ran on the next checkpoint (θ_0 never used, "
        "θ_T twice); superseded, kept until those trajectories are retrained and re-run."
        if kept
        else ""
    )
    body = (
        "## Figures 2 and 5: distribution of ||x_T - x*||\n\n"
        f"`{command('fig2', args, keys)}` on {args.device} ({source}). x*, x_init ~ U[-1,1]^k "
        f"(the same draws as table1), y = G_T(x*).{earlier}\n\n"
        "Paper: on DCGAN (Fig 2) and on WGAN / WGAN-GP (Fig 5) direct Adam is bimodal -- "
        "it either recovers x* or stops far away (distances up to 2-5) -- while surfing puts "
        "almost all mass at 0; on the VAE both are at 0 (Fig 5, top row).\n\n"
        + markdown_table(rows)
        + f"\n\n![distance to the truth]({link(png, args.results_md)})\n"
    )
    write_section("fig2", body, args.results_md)
    return rows
