"""Every `surfing experiment` pipeline end to end on tiny networks: flags parse, CSV + PNG +
a results.md section are written. This checks the plumbing, not the science (seconds each)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from models_store import ModelStore
from surfing.cli import build_parser
from surfing.experiments import EXPERIMENTS
from surfing.solvers import hybrid, uniform_latents
from surfing.train import TrainConfig, train
from surfing.trajectory import final_generator, generators

TINY = ["--steps", "3", "--final-steps", "10", "--direct-steps", "10", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A tiny k = 2 VAE trajectory (4 checkpoints) trained on random 'images'."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    s = ModelStore(root)
    images = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(method="vae", latent_dim=2, width=0.05, epochs=10, max_steps=30, every=10)
    train(cfg, s, "tiny-k2", images=images, progress=False)
    return s


def run_cli(name: str, store: ModelStore, out: Path, *extra: str) -> object:
    md = out / "results.md"
    argv = ["--models-dir", str(store.root), "experiment", name, *extra]
    argv += ["--out", str(out), "--results-md", str(md)]
    args = build_parser().parse_args(argv)
    args.models_dir = str(store.root)
    return EXPERIMENTS[name].run(args)


def check_outputs(out: Path, name: str, files: list[str]) -> None:
    for f in files:
        path = out / f
        assert path.exists() and path.stat().st_size > 0, f
        if f.endswith(".png"):
            assert path.stat().st_size < 300_000, f"{f} is too big to commit"
        if f.endswith(".csv"):
            with path.open() as fh:
                assert len(list(csv.DictReader(fh))) > 0
    text = (out / "results.md").read_text()
    assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text


def test_registry_has_every_experiment() -> None:
    assert {"table1", "fig1", "fig2", "fig3", "fig4", "baselines", "alg32", "theorem31"} <= set(
        EXPERIMENTS
    )


def test_fig1(store: ModelStore, tmp_path: Path) -> None:
    rows = run_cli("fig1", store, tmp_path, "--model", "tiny-k2", "--grid", "9", *TINY)
    assert len(rows) == 2
    check_outputs(tmp_path, "fig1", ["fig1_paths.csv", "fig1_surfaces.png"])


def test_fig2(store: ModelStore, tmp_path: Path) -> None:
    rows = run_cli("fig2", store, tmp_path, "--models", "tiny-k2", "--trials", "6", *TINY)
    assert rows[0]["trials"] == 6
    check_outputs(tmp_path, "fig2", ["fig2.csv", "fig2_trials.csv", "fig2_distances.png"])
    # the CSV route reads the same distances back without solving again
    again = run_cli(
        "fig2",
        store,
        tmp_path / "b",
        "--models",
        "tiny-k2",
        "--trials-csv",
        str(tmp_path / "fig2_trials.csv"),
        *TINY,
    )
    assert again[0]["surf median dist"] == pytest.approx(rows[0]["surf median dist"])


def test_fig2_is_reproducible(store: ModelStore, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        run_cli("fig2", store, tmp_path / sub, "--models", "tiny-k2", "--trials", "4", *TINY)
    a, b = ((tmp_path / sub / "fig2_trials.csv").read_text() for sub in ("a", "b"))
    assert a == b


def test_fig2_merge_keeps_earlier_models(store: ModelStore, tmp_path: Path) -> None:
    """--merge adds a trajectory's rows to an earlier run's, whose trajectory may be gone."""
    run_cli("fig2", store, tmp_path, "--models", "tiny-k2", "--trials", "4", *TINY)
    for name in ("fig2.csv", "fig2_trials.csv"):  # as if an earlier run had a model "old-k2"
        path = tmp_path / name
        path.write_text(path.read_text().replace("tiny-k2", "old-k2"))
    old = (tmp_path / "fig2_trials.csv").read_text()
    merge = ["--models", "tiny-k2", "--trials", "4", "--merge", *TINY]
    rows = run_cli("fig2", store, tmp_path, *merge)
    assert sorted(r["model"] for r in rows) == ["old-k2", "tiny-k2"]
    trials = (tmp_path / "fig2_trials.csv").read_text()
    assert trials.count("old-k2") == 4 and trials.count("tiny-k2") == 4
    assert [line for line in trials.splitlines() if "old-k2" in line] == [
        line for line in old.splitlines() if "old-k2" in line
    ]
    assert "Rows of old-k2 are kept" in (tmp_path / "results.md").read_text()
    run_cli("fig2", store, tmp_path, "--models", "tiny-k2", "--trials", "4", *TINY)  # no merge
    assert "old-k2" not in (tmp_path / "fig2_trials.csv").read_text()


def test_fig3(store: ModelStore, tmp_path: Path) -> None:
    rows = run_cli(
        "fig3",
        store,
        tmp_path,
        "--models",
        "tiny-k2",
        "--m",
        "5",
        "50",
        "--trials",
        "4",
        "--batch",
        "3",
        *TINY,
    )
    assert [r["m"] for r in rows] == [5, 50]
    assert all(0 <= r["surf lo"] <= r["surf rate"] <= r["surf hi"] <= 1 for r in rows)
    check_outputs(tmp_path, "fig3", ["fig3.csv", "fig3_cs_recovery.png"])


def test_fig4(store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surfing.experiments import fig4

    fake = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(fig4, "load_fashion_mnist", lambda split, d=None: (fake, None))
    table = run_cli(
        "fig4", store, tmp_path, "--models", "tiny-k2", "--m", "5", "50", "--trials", "4", *TINY
    )
    assert [r["m"] for r in table] == [5, 50]
    check_outputs(tmp_path, "fig4", ["fig4.csv", "fig4_trials.csv", "fig4_rate_distortion.png"])


def test_baselines(store: ModelStore, tmp_path: Path) -> None:
    rows = run_cli(
        "baselines",
        store,
        tmp_path,
        "--models",
        "tiny-k2",
        "--trials",
        "5",
        "--restarts",
        "2",
        *TINY,
    )
    by = {r["solver"]: r for r in rows}
    assert set(by) == {"surf", "adam x1", "adam x2 =", "restarts x1", "hybrid"}
    assert by["hybrid"]["hybrid worse than a part"] == 0
    budget = by["surf"]["evals / target"]
    assert budget <= by["adam x2 ="]["evals / target"] < budget + 2  # ceil(S / R) * R
    check_outputs(tmp_path, "baselines", ["baselines.csv", "baselines.png"])


def test_baselines_hybrid_matches_solvers_hybrid(store: ModelStore) -> None:
    """The experiment composes hybrid from its parts; it must equal solvers.hybrid."""
    from surfing.experiments.baselines import keep_best
    from surfing.solvers import direct_restarts, polish, surf

    G = final_generator(store, "tiny-k2")
    x_init = uniform_latents(5, 2, 1)
    with torch.no_grad():
        b = G(uniform_latents(5, 2, 0)).flatten(1)
    kw = dict(steps=3, lr=0.01, final_steps=10)
    h = hybrid(generators(store, "tiny-k2"), b, x_init, 2, seed=7, direct_steps=10, **kw)
    s = surf(generators(store, "tiny-k2"), b, x_init, **kw)
    r = direct_restarts(G, b, 2, seed=7, steps=10, lr=0.01)
    composed = keep_best(polish(G, s, b), polish(G, r, b))
    torch.testing.assert_close(h.objective, composed.objective)
    torch.testing.assert_close(h.x, composed.x)
    # never worse than either part, up to float32 noise below LM's ftol (1e-12), where the
    # same latent's objective differs by ~1e-14 between batch compositions
    assert (h.objective <= torch.minimum(s.objective, r.objective) + 1e-12).all()


def test_alg32(tmp_path: Path) -> None:
    summary = run_cli(
        "alg32",
        ModelStore(tmp_path / "unused"),
        tmp_path,
        "--hidden",
        "4",
        "8",
        "--n",
        "6",
        "--train-steps",
        "6",
        "--every",
        "2",
        "--taus",
        "0",
        "0.1",
        "--trials",
        "2",
        "--check-every",
        "2",
        "--grid",
        "21",
        *TINY,
    )
    solvers = [r["solver"] for r in summary]
    assert "Alg 3.2 tau=0.1" in solvers and "Alg 3.1 (surf, Adam) from x_init" in solvers
    assert "Alg 3.1 from argmin f_0" in solvers
    check_outputs(
        tmp_path, "alg32-k2", ["alg32_k2.csv", "alg32_k2_trials.csv", "alg32_k2_pieces.png"]
    )


def test_alg32_k3_off_range_targets_with_a_verified_referee(tmp_path: Path) -> None:
    """k = 3, y = F(x*) off the range, the referee polished and checked by enumerating every
    piece: on these tiny nets (~200 pieces) the polished grid must agree with it."""
    summary = run_cli(
        "alg32",
        ModelStore(tmp_path / "unused"),
        tmp_path,
        *("--latent-dim", "3", "--hidden", "4", "8", "--n", "6", "--train-steps", "6"),
        *("--taus", "0", "0.1", "--trials", "2", "--check-every", "2", "--grid", "11"),
        *("--polish-tau", "0.3", "--verify", "1", "--target", "map", "--long-steps", "5"),
        *TINY,
    )
    by = {r["solver"]: r for r in summary}
    assert "Alg 3.1 from argmin f_0, long stages" in by
    assert 0 <= by["Alg 3.2 tau=0.1"]["rescued %"] <= by["Alg 3.2 tau=0.1"]["final %"]
    with (tmp_path / "alg32_k3_referee.csv").open() as fh:
        checked = list(csv.DictReader(fh))
    assert len(checked) == 2 and all(r["agree"] == "True" for r in checked)
    assert all(float(r["exact f"]) <= float(r["grid f"]) + 1e-9 for r in checked)
    check_outputs(tmp_path, "alg32-k3", ["alg32_k3.csv", "alg32_k3_pieces.png"])


def test_theorem31(tmp_path: Path) -> None:
    summary = run_cli(
        "theorem31",
        ModelStore(tmp_path / "unused"),
        tmp_path,
        "--ratios",
        "2",
        "4",
        "--nets",
        "1",
        "--y-norms",
        "1",
        "10",
        "--starts",
        "3",
        "--steps",
        "30",
        "--no-progress",
    )
    assert {r["operator"] for r in summary} == {"identity", "gaussian"}
    assert all(r["runs"] == 6 for r in summary)
    check_outputs(tmp_path, "theorem31", ["theorem31.csv", "theorem31_runs.csv", "theorem31.png"])


def test_beyond(store: ModelStore, tmp_path: Path) -> None:
    """Any stored model: exact recovery at A = I, n/4, n/16 and held-out images, per solver."""
    import numpy as np

    real = tmp_path / "real.npy"
    np.save(real, np.random.default_rng(0).random((5, 28, 28), dtype=np.float32))
    out = run_cli("beyond", store, tmp_path, "--model", "tiny-k2", "--trials", "4",
                  "--real", str(real), "--real-count", "3", *TINY)
    exact, errors = out["exact"], out["real"]  # type: ignore[index]
    settings = ["A = I", f"m = {784 // 4}", f"m = {784 // 16}"]
    assert [(r["setting"], r["solver"]) for r in exact] == [
        (s, n) for s in settings for n in ("default", "paper", "adam", "lm-restarts")
    ]
    assert all(0 <= r["success %"] <= 100 and r["evals / target"] > 0 for r in exact)
    # The paper schedule spends the same evaluations on every target; Adam exactly its steps.
    assert {r["evals / target"] for r in exact if r["solver"] == "adam"} == {10}
    assert len(errors) == 12 and all(0 <= float(r["median pixel error"]) <= 1 for r in errors)
    assert (tmp_path / "beyond_tiny-k2_real.png").stat().st_size > 1000
    assert "<!-- BEGIN beyond-tiny-k2 -->" in (tmp_path / "results.md").read_text()


def test_strongest_reads_curves_off_one_run(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16's grid: one point per pass of each run. LM from x_init is the same first pass of
    lm-restarts and of every portfolio, so their first points must agree; rounds only add cost,
    and on exact-recovery targets a restart never loses a success (fitted targets stay put)."""
    out = run_cli("strongest", store, tmp_path, "--models", "tiny-k2", "--m", "0", "2k",
                  "--trials", "6", "--rounds", "3", "--strides", "1", "2",
                  "--rescue-rounds", "1", "--portfolio-rounds", "0", "1", "--adam",
                  "--miss-rtol", "1e-4", "--lm-stall", "0", *TINY)  # the names carry no tag
    rows = out["rows"]  # type: ignore[index]
    assert {r["setting"] for r in rows} == {"A = I", "m = 4"}
    for setting in ("A = I", "m = 4"):
        mine = [r for r in rows if r["setting"] == setting]
        lm = [r for r in mine if r["method"] == "lm-restarts"]
        assert [r["after"] for r in lm][0] == "final" and len(lm) <= 4
        pairs = list(zip(lm, lm[1:], strict=False))
        assert all(a["evals / target"] <= b["evals / target"] for a, b in pairs)
        assert all(a["success %"] <= b["success %"] for a, b in pairs)
        for p in ("portfolio p=0", "portfolio p=1"):
            first = next(r for r in mine if r["method"] == p)
            assert (first["success %"], first["evals / target"]) == (
                lm[0]["success %"], lm[0]["evals / target"])
        assert [r["end"] for r in mine if r["method"] == "adam"] == [True]
        assert {r["evals / target"] for r in mine if r["method"] == "adam"} == {10.0}
        strides = [r for r in mine if r["method"].startswith("lm-stride") and r["end"]]
        assert len(strides) == 2
    check_outputs(tmp_path, "strongest-grid", ["strongest.csv", "strongest_curves.png"])
    # --merge keeps the rows of settings not re-run; --real adds off-range targets
    from surfing.experiments import fig4

    fake = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(fig4, "load_fashion_mnist", lambda split, d=None: (fake, None))
    again = run_cli("strongest", store, tmp_path, "--models", "tiny-k2", "--m", "0",
                    "--trials", "4", "--rounds", "1", "--strides", "1", "--portfolio-rounds",
                    "0", "--real", "3", "--merge", "--miss-rtol", "1e-4", "--lm-stall", "0",
                    *TINY)  # fmt: skip
    real = again["real"]  # type: ignore[index]
    assert [r["method"] for r in real] == ["lm-restarts", "lm-stride s=1", "portfolio p=0"]
    assert all(0 <= r["median pixel error"] <= 1 and r["images"] == 3 for r in real)
    with (tmp_path / "strongest.csv").open() as fh:
        kept = list(csv.DictReader(fh))
    assert {r["setting"] for r in kept} == {"A = I", "m = 4"}
    rerun = {"lm-restarts", "lm-stride s=1", "portfolio p=0"}
    for r in kept:  # rows merge per (model, setting, method): only the re-run ones changed
        assert r["trials"] == ("4" if r["setting"] == "A = I" and r["method"] in rerun else "6")


def test_pooled_sums_only_the_settings_every_method_ran_in() -> None:
    """A setting where one compared method did not run must not enter the pooled counts."""
    from surfing.experiments.strongest import ROUNDS, pooled

    def end(model: str, setting: str, p: int, trials: int, success: float, evals: float) -> dict:
        return {"model": model, "setting": setting, "method": f"portfolio p={p}",
                "trials": str(trials), "success %": str(success),
                "evals / target": str(evals)}  # fmt: skip

    ends = [end("a", "A = I", 2, 100, 90.0, 10), end("a", "A = I", 5, 100, 95.0, 20),
            end("a", "m = 50", 2, 50, 50.0, 30),  # p = 5 did not run here
            end("b", "A = I", 2, 300, 100.0, 40), end("b", "A = I", 5, 300, 99.0, 40)]  # fmt: skip
    two, five = pooled(ends, ROUNDS)
    assert (two["settings"], two["trials"], two["successes"]) == (2, 400, 390)
    assert (five["settings"], five["trials"], five["successes"]) == (2, 400, 392)
    assert (two["evals / target"], five["evals / target"]) == (32.5, 35.0)
    lo, hi = (float(v) for v in five["95% CI"].split("-"))
    assert two["success %"] == 97.5 and lo < five["success %"] == 98.0 < hi
    # split by operator: the only compressed-sensing setting lacks p = 5, so none pools there
    assert pooled(ends, ROUNDS, "A = I")[0]["settings"] == 2
    assert pooled(ends, ROUNDS, "m < n")[0]["trials"] == 0


def test_strongest_miss_rtol_is_the_test_every_method_uses(
    store: ModelStore, tmp_path: Path
) -> None:
    """--miss-rtol sets the miss test of lm-restarts and the portfolio (the method names say
    so): at 1 every target counts as fitted, so no restart round and no surf runs; at 0 none
    does (a float residual is never exactly 0), so every round runs. The names of the methods
    that restart also say the stall stop, which is on by default (rows from before: off)."""
    st = " stall=0.01"
    plain = run_cli("strongest", store, tmp_path, "--models", "tiny-k2", "--m", "0",
                    "--trials", "2", "--rounds", "1", "--strides", "1", "--portfolio-rounds",
                    "1", *TINY)  # the default threshold, 1e-5: rows from before had 1e-4
    assert {r["method"] for r in plain["rows"]} == {  # type: ignore[index]
        f"lm-restarts miss=1e-05{st}", "lm-stride s=1 miss=1e-05", f"portfolio p=1 miss=1e-05{st}"
    }
    common = ["--models", "tiny-k2", "--m", "0", "--trials", "4", "--rounds", "2",
              "--strides", "1", "--rescue-rounds", "1", "--portfolio-rounds", "1", *TINY]
    for rtol, lm_after, portfolio_last in (("1", ["final"], "final"),
                                           ("0", ["final", "restart 1", "restart 2"], None)):
        out = run_cli("strongest", store, tmp_path, *common, "--miss-rtol", rtol)
        rows = out["rows"]  # type: ignore[index]
        assert {r["method"] for r in rows} == {
            f"lm-restarts miss={rtol}{st}", f"lm-stride s=1 miss={rtol}",
            f"portfolio p=1 miss={rtol}{st}",
        }
        lm = [r["after"] for r in rows if r["method"] == f"lm-restarts miss={rtol}{st}"]
        assert lm == lm_after
        portfolio = [r["after"] for r in rows if r["method"] == f"portfolio p=1 miss={rtol}{st}"]
        if portfolio_last is not None:
            assert portfolio == [portfolio_last]
        else:  # its round, then the surf and the rescue of every target
            assert portfolio[:2] == ["final", "restart 1"] and len(portfolio) >= 3
