"""The `surfing` command line end to end on a tiny stored trajectory (no server)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from surfing.cli import main
from surfing.images import load_png, to_png
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
