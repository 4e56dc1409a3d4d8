"""The `surfing` command line end to end on a tiny stored trajectory (no server)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from surfing.cli import main
from surfing.cli_invert import load_target
from surfing.images import load_png, to_png
from surfing.latents import sample_latents
from surfing.lm import levenberg_marquardt
from surfing.portfolio import PORTFOLIO_ROUNDS
from surfing.solvers import MISS_RTOL, StageRule, fit_line
from surfing.trajectory import final_generator
from tests.helpers import interpolated_trajectory

TINY = {"kind": "infogan", "latent_dim": 2, "width": 0.05}


@pytest.fixture()
def tiny_store(tmp_path):
    return interpolated_trajectory(tmp_path / "models", "tiny", arch=TINY, n_ckpt=4)


def test_models_list_and_show(tiny_store, capsys) -> None:
    main(["--models-dir", str(tiny_store.root), "models", "list"])
    assert "tiny" in capsys.readouterr().out
    main(["--models-dir", str(tiny_store.root), "models", "show", "tiny"])
    assert json.loads(capsys.readouterr().out)["latent_dim"] == 2


def test_invert_writes_reconstruction_and_reports_error(tiny_store, tmp_path, capsys) -> None:
    G = final_generator(tiny_store, "tiny")
    with torch.no_grad():
        target = G(torch.tensor([[0.3, -0.4]]))[0]
    to_png(target, tmp_path / "target.png")
    main(
        [
            "--models-dir",
            str(tiny_store.root),
            "invert",
            str(tmp_path / "target.png"),
            "--model",
            "tiny",
            "--method",
            "both",
            "--steps",
            "5",
            "--final-steps",
            "300",
            "--direct-steps",
            "300",
            "--lr",
            "0.05",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["method"] for r in lines] == ["surf", "adam"]
    for r in lines:
        assert len(r["latent"]) == 2 and r["pixel_error"] < 1e-3  # 8-bit PNG rounding aside
        assert load_png(r["reconstruction"]).shape == (1, 28, 28)


def test_invert_compressed_sensing(tiny_store, tmp_path, capsys) -> None:
    to_png(torch.rand(1, 28, 28), tmp_path / "t.png")
    main(
        [
            "--models-dir",
            str(tiny_store.root),
            "invert",
            str(tmp_path / "t.png"),
            "--model",
            "tiny",
            "--measurements",
            "20",
            "--steps",
            "2",
            "--final-steps",
            "20",
        ]
    )
    assert json.loads(capsys.readouterr().out)["method"] == "surf"


def test_unknown_model_is_a_clean_error(tiny_store, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--models-dir", str(tiny_store.root), "invert", "x.png", "--model", "../etc"])
    assert exc.value.code == 2 and "surfing: error" in capsys.readouterr().err


def test_table1_pipeline(tiny_store, tmp_path) -> None:
    out, md = tmp_path / "results", tmp_path / "results.md"
    main(
        [
            "--models-dir",
            str(tiny_store.root),
            "experiment",
            "table1",
            "--models",
            "tiny",
            "--trials",
            "6",
            "--steps",
            "3",
            "--final-steps",
            "30",
            "--direct-steps",
            "30",
            "--out",
            str(out),
            "--results-md",
            str(md),
        ]
    )
    rows = list(csv.DictReader((out / "table1.csv").open()))
    assert rows[0]["model"] == "tiny" and 0.0 <= float(rows[0]["surf %"]) <= 100.0
    assert len(list(csv.DictReader((out / "table1_trials.csv").open()))) == 6
    assert (out / "table1_distances.png").stat().st_size > 1000
    assert "<!-- BEGIN table1 -->" in md.read_text()


# ---- first use: progress, side-by-side, helpful errors, the demo ---------------------------


def _invert(store_root, image, *extra: str) -> None:
    main(["--models-dir", str(store_root), "invert", str(image), "--model", "tiny", *extra])


def test_invert_shows_progress_per_pass_on_stderr(tiny_store, tmp_path, capsys) -> None:
    to_png(torch.rand(1, 28, 28), tmp_path / "t.png")
    _invert(
        tiny_store.root,
        tmp_path / "t.png",
        "--schedule",
        "paper",
        "--steps",
        "2",
        "--final-steps",
        "3",
        "--method",
        "both",
        "--direct-steps",
        "7",
    )
    out, err = capsys.readouterr()
    surf, adam = (json.loads(line) for line in out.splitlines())  # stdout stays pure JSON
    assert "surfing 4 checkpoints of tiny (schedule paper)" in err
    assert "surf: 100%" in err and "4/4" in err  # one bar over the trajectory's 4 stages
    assert "adam: 100%" in err and "7/7" in err  # Adam steps counted by the forward hook
    assert len(surf["stages"]) == 4 and adam["generator_evals"] == 7
    _invert(
        tiny_store.root, tmp_path / "t.png", "--steps", "2", "--final-steps", "3", "--no-progress"
    )
    assert capsys.readouterr().err == ""


def test_invert_default_shows_the_passes_on_g_t_then_the_surf(tiny_store, tmp_path, capsys):
    to_png(torch.rand(1, 28, 28), tmp_path / "t.png")  # off the range: every pass runs
    _invert(tiny_store.root, tmp_path / "t.png", "--steps", "2", "--final-steps", "3")
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert "Levenberg-Marquardt on the final network of tiny" in err and "portfolio" in err
    passes = [s["pass"] for s in report["stages"]]
    on_g_t = ["final"] + [f"restart {r}" for r in range(1, PORTFOLIO_ROUNDS + 1)]
    assert passes == on_g_t + ["surf"] * 4 + ["rescue 1"] * 4
    for name, total in [(p, 1) for p in on_g_t] + [("surf", 4), ("rescue 1", 4)]:
        assert f"{name}: 100%" in err and f"{total}/{total}" in err
    steps = [s["step"] for s in report["stages"]]
    assert steps[: len(on_g_t)] == [steps[-1]] * len(on_g_t)  # the passes on G_T name its step


def test_invert_restarts_sets_the_rounds_on_g_t(tiny_store, tmp_path, capsys) -> None:
    to_png(torch.rand(1, 28, 28), tmp_path / "t.png")  # off the range: every round runs
    common = ("--steps", "2", "--final-steps", "3", "--no-progress")
    _invert(tiny_store.root, tmp_path / "t.png", "--restarts", "1", *common)
    passes = [s["pass"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert passes == ["final", "restart 1"] + ["surf"] * 4 + ["rescue 1"] * 4
    _invert(tiny_store.root, tmp_path / "t.png", "--method", "lm-restarts", "--restarts", "0",
            *common)  # fmt: skip
    solo = json.loads(capsys.readouterr().out)
    G = final_generator(tiny_store, "tiny")
    y = load_target(str(tmp_path / "t.png"), [1, 28, 28], [0.0, 1.0])
    x0 = sample_latents(1, G.latent_dim, 0, "uniform")
    rule, b = StageRule(), y.flatten(1)
    lm = levenberg_marquardt(G, x0, b, None, max_iters=rule.lm_iters, xtol=rule.lm_xtol,
                             radius=rule.radius(G.latent_dim), stall=rule.lm_stall,
                             stall_above=fit_line(b, MISS_RTOL))  # fmt: skip
    assert solo["latent"] == [round(v, 6) for v in lm.x[0].tolist()]  # no restart: LM alone
    assert solo["generator_evals"] == round(float(lm.evals[0]))  # ... and no restart's cost
    for bad in (["--method", "adam", "--restarts", "1"], ["--restarts", "-1"],
                ["--schedule", "paper", "--restarts", "1"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            _invert(tiny_store.root, tmp_path / "t.png", *bad, *common)
        assert exc.value.code == 2 and "--restarts" in capsys.readouterr().err


def test_invert_scale_writes_target_reconstruction_difference(tiny_store, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    to_png(torch.rand(1, 28, 28), tmp_path / "t.png")
    _invert(
        tiny_store.root,
        tmp_path / "t.png",
        "--steps",
        "2",
        "--final-steps",
        "5",
        "--scale",
        "3",
        "--out",
        str(tmp_path / "r.png"),
        "--no-progress",
    )
    report = json.loads(capsys.readouterr().out)
    assert report["side_by_side"] == str(tmp_path / "r.side.png")
    side = np.asarray(Image.open(tmp_path / "r.side.png"), dtype=np.int16)
    assert side.shape == (28 * 3, (3 * 28 + 2) * 3)  # three 28x28 panels, 1-pixel gaps, 3x
    assert (side[::3, ::3] == side[1::3, 1::3]).all()  # nearest-neighbour blocks
    small = side[::3, ::3]
    target = np.asarray(Image.open(tmp_path / "t.png"), dtype=np.int16)
    recon = np.asarray(Image.open(tmp_path / "r.png"), dtype=np.int16)
    assert (small[:, 28] == 255).all() and (small[:, 57] == 255).all()
    assert (small[:, :28] == target).all() and (small[:, 29:57] == recon).all()
    assert np.abs(small[:, 58:] - np.abs(recon - target)).max() <= 1  # 8-bit rounding
    assert small[:, 58:].max() > 0


def test_model_not_found_names_the_models_there(tiny_store, tmp_path, capsys) -> None:
    interpolated_trajectory(tiny_store.root, "other", arch=TINY, n_ckpt=2)
    for argv in (["invert", "x.png", "--model", "shrit"], ["models", "show", "shrit"]):
        with pytest.raises(SystemExit) as exc:
            main(["--models-dir", str(tiny_store.root), *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "'shrit' not found" in err
        assert "models there: other, tiny" in err


def test_empty_store_says_where_it_looked(tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty"
    monkeypatch.delenv("SURFING_MODELS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--models-dir", str(empty)], {}, f"no models in {empty} (from --models-dir)"),
        ([], {"SURFING_MODELS_DIR": str(empty)}, f"{empty} (from $SURFING_MODELS_DIR)"),
        ([], {}, f"{tmp_path / 'data' / 'models'} (the default ./data/models;"),
    ]
    for flags, env, where in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for argv in (["invert", "x.png", "--model", "m"], ["models", "show", "m"]):
            with pytest.raises(SystemExit):
                main([*flags, *argv])
            err = capsys.readouterr().err
            assert where in err and "`surfing demo`" in err
        for name in env:
            monkeypatch.delenv(name)
    main(["--models-dir", str(empty), "models", "list"])
    assert f"no models in {empty}" in capsys.readouterr().err


def test_demo_trains_once_and_replaces_an_interrupted_one(tmp_path, monkeypatch, capsys):
    import surfing.train
    from models_store import ModelStore

    fake = torch.rand(256, 1, 28, 28)
    monkeypatch.setattr(surfing.train, "load_fashion_mnist", lambda split: (fake, None))
    store = ModelStore(tmp_path / "models")
    with (
        pytest.raises(RuntimeError),
        store.create(
            "demo-dcgan-k10",
            arch=TINY,
            latent_dim=2,
            output_shape=[1, 28, 28],
            value_range=[0.0, 1.0],
            training={},
            dataset="x",
        ) as w,
    ):
        w.add(0, {"w": torch.zeros(1)})
        raise RuntimeError("interrupted")  # leaves complete=False
    demo = ["--models-dir", str(store.root), "demo", "--steps", "3", "--threads", "1"]
    main(demo)
    assert "replacing the unfinished demo-dcgan-k10" in capsys.readouterr().out
    m = store.manifest("demo-dcgan-k10")
    assert m.complete and [c.step for c in m.checkpoints] == [0, 3]
    assert m.arch == {"kind": "infogan", "latent_dim": 10, "width": 0.5}
    main(demo)
    assert "nothing to do" in capsys.readouterr().out
    assert store.manifest("demo-dcgan-k10").created_at == m.created_at


def test_invert_schedule_reaches_the_solver(tiny_store, tmp_path, capsys) -> None:
    to_png(torch.rand(1, 28, 28), tmp_path / "t.png")
    evals = {}
    for schedule in ("paper", "lm-stride"):
        _invert(
            tiny_store.root,
            tmp_path / "t.png",
            "--schedule",
            schedule,
            "--steps",
            "3",
            "--final-steps",
            "11",
            "--no-progress",
        )
        report = json.loads(capsys.readouterr().out)
        evals[schedule] = report["generator_evals"]
        if schedule == "paper":  # 3 Adam steps on each of 3 stages, 11 on the last
            assert [s["steps_used"] for s in report["stages"]] == [3, 3, 3, 11]
    assert evals["paper"] == 3 * 3 + 11 and evals["lm-stride"] != evals["paper"]
