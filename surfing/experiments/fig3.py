"""Figure 3: compressed sensing, exact recovery rate vs. the number of measurements m.

y = G_T(x*) is observed only through b = A y (A: m x n Gaussian, N(0, 1/m) entries); a trial
succeeds when ||x_T - x*|| < 0.01. With k latent dimensions and m >= k measurements the
truth is identifiable, so failures are optimisation failures: the question is whether
surfing's head start on the smooth early surfaces survives a random projection of the output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from surfing.experiments import sensing
from surfing.experiments.common import (
    SUCCESS,
    command,
    link,
    method_of,
    open_store,
    pyplot,
    save_figure,
)
from surfing.experiments.report import markdown_table, wilson_interval, write_csv, write_section
from surfing.solvers import uniform_latents
from surfing.trajectory import final_generator

HELP = "Fig 3: compressed sensing exact-recovery rate vs. m, surf vs. Adam"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sensing.add_arguments(p, trials=200)


def run_model(model_id: str, args: argparse.Namespace) -> list[dict]:
    store = open_store(args)
    method, k = method_of(store, model_id)
    x_star = uniform_latents(args.trials, k, args.seed, args.device)
    x_init = uniform_latents(args.trials, k, args.seed + 1, args.device)
    with torch.no_grad():
        y = final_generator(store, model_id, args.device)(x_star).flatten(1)
    rows = []
    for m, res in sensing.sweep(model_id, args, y, x_init):
        row: dict[str, object] = {"model": model_id, "method": method, "k": k, "m": m}
        for name, r in res.items():
            d = (r.x - x_star).norm(dim=1)
            wins = int((d < SUCCESS).sum())
            lo, hi = wilson_interval(wins, len(d))
            row |= {f"{name} rate": wins / len(d), f"{name} lo": lo, f"{name} hi": hi}
            row[f"{name} median dist"] = float(d.median())
        row["trials"] = args.trials
        print(
            f"  {model_id} m={m:4d}  surf {row['surf rate']:.2f}  adam {row['adam rate']:.2f}",
            flush=True,
        )
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """One panel per model: recovery rate vs. m (log axis), 95% Wilson intervals as bars."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.2), squeeze=False)
    for ax, model_id in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model_id]
        ms = [r["m"] for r in mine]
        for name, color, label in (
            ("adam", "tab:blue", "Regular Adam"),
            ("surf", "tab:red", "Surfing"),
        ):
            rate = [r[f"{name} rate"] for r in mine]
            err = [
                [r[f"{name} rate"] - r[f"{name} lo"] for r in mine],
                [r[f"{name} hi"] - r[f"{name} rate"] for r in mine],
            ]
            ax.errorbar(ms, rate, yerr=err, color=color, marker="o", ms=3, capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xticks(ms, [str(m) for m in ms], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("number of measurements m")
        ax.set_ylabel("proportion recovered")
        ax.set_title(f"{mine[0]['method'].upper()}, k={mine[0]['k']} ({model_id})", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> list[dict]:
    rows = [r for model_id in args.models for r in run_model(model_id, args)]
    write_csv(args.out / "fig3.csv", rows)
    png = args.out / "fig3_cs_recovery.png"
    plot(rows, png)
    strides = ", ".join(f"{m}: {sensing.describe_stride(args, m)}" for m in args.models)
    keys = sensing.COMMAND_KEYS
    table = [
        {
            "model": r["model"],
            "m": r["m"],
            "surf %": 100 * r["surf rate"],
            "surf 95% CI": f"{100 * r['surf lo']:.0f}-{100 * r['surf hi']:.0f}",
            "adam %": 100 * r["adam rate"],
            "adam 95% CI": f"{100 * r['adam lo']:.0f}-{100 * r['adam hi']:.0f}",
        }
        for r in rows
    ]
    body = (
        "## Figure 3: compressed sensing, exact recovery\n\n"
        f"`{command('fig3', args, keys)}` on {args.device}; checkpoint stride {strides}. "
        "Success = ||x_T - x*|| < 0.01; bars are 95% Wilson intervals.\n\n"
        "Paper (DCGAN and WGAN, k = 20, 200 trials per m, checkpoints every 100 steps): the "
        "proportion recovered grows with m and surfing's line lies above Adam's at every m. "
        "The paper gives no table and its OCR'd plot is unreadable, so only that shape is "
        "compared.\n\n"
        + markdown_table(table)
        + f"\n\n![compressed sensing recovery]({link(png, args.results_md)})\n"
    )
    write_section("fig3", body, args.results_md)
    return rows
