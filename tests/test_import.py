"""`surfing models import`: someone else's per-step checkpoints become a stored trajectory.

The checkpoints here are tiny InfoGAN-style generators (~16 k parameters) with different
random weights per step, saved the ways other training loops save them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from models_store import ModelExists, ModelStore
from surfing.architectures import build_generator
from surfing.cli import main
from surfing.importer import ImportFailed, import_checkpoints
from surfing.trajectory import final_generator

ARCH = {"kind": "infogan", "latent_dim": 2, "width": 0.05}


def state(seed: int, arch: dict = ARCH) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_generator(arch).state_dict()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_stored(store: ModelStore, model_id: str, expected: list[dict[str, torch.Tensor]]):
    """The store holds exactly these tensors, checkpoint by checkpoint."""
    m = store.manifest(model_id)
    assert m.complete and len(m.checkpoints) == len(expected)
    for i, want in enumerate(expected):
        got = store.load(model_id, i)
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            assert torch.equal(got[name], t), (i, name)


def test_steps_come_from_the_names_and_set_the_order(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "models"
    src.mkdir()
    # Name order is G_step_0, G_step_000400, G_step_40: training order must not follow it.
    sds = {step: state(step) for step in (0, 40, 400)}
    torch.save(sds[0], src / "G_step_0.pt")
    torch.save(sds[400], src / "G_step_000400.pt")
    safetensors.torch.save_file(sds[40], src / "G_step_40.safetensors")
    (src / "notes.txt").write_text("not a checkpoint")
    store = ModelStore(root)
    m = import_checkpoints(store, src, "imp", ARCH)
    assert [c.step for c in m.checkpoints] == [0, 40, 400]
    assert_stored(store, "imp", [sds[0], sds[40], sds[400]])
    # Defaults from one run of the architecture: k, output shape, range of its final Sigmoid.
    assert (m.latent_dim, m.output_shape, m.value_range) == (2, [1, 28, 28], [0.0, 1.0])
    assert m.arch == ARCH and m.latent_prior == "uniform"
    # G_T of the store is the source's last network, output for output.
    ref = build_generator(ARCH)
    ref.load_state_dict(sds[400])
    x = torch.tensor([[0.3, -0.7], [-0.1, 0.9]])
    with torch.no_grad():
        assert torch.equal(final_generator(store, "imp")(x), ref.eval()(x))
    assert leftovers(root) == ["imp"]


def test_explicit_steps_follow_name_order(tmp_path: Path) -> None:
    src, store = tmp_path / "src", ModelStore(tmp_path / "models")
    src.mkdir()
    sds = [state(i) for i in range(3)]
    for name, sd in zip("abc", sds, strict=True):
        safetensors.torch.save_file(sd, src / f"{name}.safetensors")
    with pytest.raises(ImportFailed, match=r"a\.safetensors: no step number"):
        import_checkpoints(store, src, "imp", ARCH)
    with pytest.raises(ImportFailed, match="2 steps given for 3 checkpoint files"):
        import_checkpoints(store, src, "imp", ARCH, steps=[0, 5])
    with pytest.raises(ImportFailed, match=r"steps must increase: c\.safetensors is step 3"):
        import_checkpoints(store, src, "imp", ARCH, steps=[0, 5, 3])
    with pytest.raises(ImportFailed, match=r"b\.safetensors and c\.safetensors both are step 5"):
        import_checkpoints(store, src, "imp", ARCH, steps=[0, 5, 5])
    m = import_checkpoints(store, src, "imp", ARCH, steps=[0, 5, 90], latent_prior="normal")
    assert [c.step for c in m.checkpoints] == [0, 5, 90] and m.latent_prior == "normal"
    assert_stored(store, "imp", sds)


def test_duplicate_steps_are_refused_naming_both_files(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "models"
    src.mkdir()
    torch.save(state(0), src / "ckpt-40.pt")
    safetensors.torch.save_file(state(1), src / "G_40.safetensors")
    with pytest.raises(ImportFailed) as err:
        import_checkpoints(ModelStore(root), src, "imp", ARCH)
    assert "G_40.safetensors" in str(err.value) and "ckpt-40.pt" in str(err.value)
    assert "step 40" in str(err.value)
    assert leftovers(root) == []


def test_key_remapping(tmp_path: Path) -> None:
    """module. (DataParallel), a generator. sub-dict, and a nested {"generator": ...} entry."""
    store = ModelStore(tmp_path / "models")
    sds = [state(10), state(11)]
    critic = {"net.0.weight": torch.randn(3, 1, 4, 4)}
    layouts = {
        "dp": ([{f"module.{k}": v for k, v in sd.items()} for sd in sds], "module.", None),
        "flat": (
            [{**{f"generator.{k}": v for k, v in sd.items()},
              **{f"discriminator.{k}": v for k, v in critic.items()}} for sd in sds],
            None, "generator.",
        ),
        "nested": (
            [{"generator": sd, "discriminator": critic, "step": 7, "opt": {"lr": 1e-3}}
             for sd in sds],
            None, "generator",
        ),
        "nested-dp": (
            [{"generator": {f"module.{k}": v for k, v in sd.items()}} for sd in sds],
            "module.", "generator.",
        ),
    }
    for name, (files, strip, select) in layouts.items():
        src = tmp_path / name
        src.mkdir()
        for step, obj in zip((0, 10), files, strict=True):
            if name in ("dp", "flat"):
                safetensors.torch.save_file(obj, src / f"step{step}.safetensors")
            else:
                torch.save(obj, src / f"step{step}.pth")
        import_checkpoints(store, src, name, ARCH, strip_prefix=strip, select=select)
        assert_stored(store, name, sds)
    # Without the selection, the error names the key the net lacks and suggests the fix.
    with pytest.raises(ImportFailed, match=r"step0\.pth: .*lacks 'fc\.0\.weight'.*--select"):
        import_checkpoints(store, tmp_path / "nested", "nope", ARCH)


def test_a_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "models"
    src.mkdir()
    torch.save(state(0), src / "ckpt-0.pt")
    wide = state(1, {**ARCH, "width": 0.1})  # every layer twice as wide as ARCH's
    torch.save(wide, src / "ckpt-40.pt")
    with pytest.raises(ImportFailed) as err:
        import_checkpoints(ModelStore(root), src, "imp", ARCH)
    ours = state(0)
    key = next(k for k in ours if ours[k].shape != wide[k].shape)  # first in the net's order
    msg = str(err.value)
    assert msg.startswith("ckpt-40.pt: ") and repr(key) in msg
    assert str(list(wide[key].shape)) in msg and str(list(ours[key].shape)) in msg
    assert leftovers(root) == []


def test_a_pt_file_with_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling this would run the shell command
            return (os.system, (f"touch {marker}",))

    src, root = tmp_path / "src", tmp_path / "models"
    src.mkdir()
    torch.save(state(0), src / "ckpt-0.pt")
    torch.save({**state(1), "extra": Payload()}, src / "ckpt-40.pt")
    with pytest.raises(ImportFailed) as err:
        import_checkpoints(ModelStore(root), src, "imp", ARCH)
    assert "ckpt-40.pt: refused" in str(err.value) and "system" in str(err.value)
    assert "weights_only` set to `False" not in str(err.value)  # never advise turning it off
    assert not marker.exists()
    assert leftovers(root) == []


def test_a_failure_while_writing_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """Every file passed the check, then the third write fails: no model, no staging."""
    from models_store import TrajectoryWriter

    src, root = tmp_path / "src", tmp_path / "models"
    src.mkdir()
    for step in (0, 10, 20, 30):
        torch.save(state(step), src / f"ckpt-{step}.pt")
    store = ModelStore(root)
    store.root.mkdir()
    real_add = TrajectoryWriter.add
    seen: list[str] = []

    def failing_add(self, step, tensors, exact=False):
        seen.extend(p.name for p in root.iterdir())  # what a reader would see meanwhile
        if step == 20:
            raise OSError("disk full")
        return real_add(self, step, tensors, exact)

    monkeypatch.setattr(TrajectoryWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        import_checkpoints(store, src, "imp", ARCH)
    assert seen and all(name.startswith(".import-imp-") for name in seen)  # never "imp"
    assert leftovers(root) == [] and store.list_models() == []


def test_an_existing_id_is_refused_before_reading(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state(0), src / "ckpt-0.pt")
    store = ModelStore(tmp_path / "models")
    import_checkpoints(store, src, "imp", ARCH)
    with pytest.raises(ModelExists):
        import_checkpoints(store, src, "imp", ARCH)
    assert leftovers(store.root) == ["imp"]


def test_shapes_and_range_without_a_final_squashing_layer(tmp_path: Path) -> None:
    relu = {"kind": "relu", "latent_dim": 3, "hidden": [8], "out_dim": 12}
    src, store = tmp_path / "src", ModelStore(tmp_path / "models")
    src.mkdir()
    torch.save(state(0, relu), src / "ckpt-0.pt")
    with pytest.raises(ImportFailed, match="--value-range"):
        import_checkpoints(store, src, "r", relu)
    with pytest.raises(ImportFailed, match=r"\[1, 5, 5\] does not fit .* produces \[12\]"):
        import_checkpoints(store, src, "r", relu, output_shape=[1, 5, 5], value_range=[-3, 3])
    m = import_checkpoints(store, src, "r", relu, output_shape=[1, 3, 4], value_range=[-3, 3])
    assert (m.latent_dim, m.output_shape, m.value_range) == (3, [1, 3, 4], [-3.0, 3.0])
    m = import_checkpoints(store, src, "r2", relu, value_range=[-3, 3])
    assert m.output_shape == [12]


def test_cli_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, root = tmp_path / "src", tmp_path / "models"
    src.mkdir()
    sds = [state(0), state(1)]
    for step, sd in zip((0, 80), sds, strict=True):
        torch.save({f"module.{k}": v for k, v in sd.items()}, src / f"G-{step:05d}.pt")
    base = ["--models-dir", str(root), "models", "import", str(src), "--arch", "infogan"]
    config = ["--config", '{"latent_dim": 2, "width": 0.05}']
    main([*base, *config, "--id", "cli", "--strip-prefix", "module.", "--latent-prior",
          "normal", "--value-range", "0,1"])
    out = capsys.readouterr().out
    assert "cli: imported 2 checkpoints (steps 0..80)" in out
    store = ModelStore(root)
    assert store.manifest("cli").latent_prior == "normal"
    assert_stored(store, "cli", sds)
    # A mismatch (no prefix stripping) is a clean exit 2 naming the file; nothing is added.
    with pytest.raises(SystemExit) as exit_:
        main([*base, *config, "--id", "cli2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "G-00000.pt" in err and "lacks 'fc.0.weight'" in err and "--strip-prefix module." in err
    with pytest.raises(SystemExit):
        main([*base, "--config", '{"kind": "relu"}', "--id", "cli3"])
    assert "--arch names it" in capsys.readouterr().err
    assert leftovers(root) == ["cli"]
