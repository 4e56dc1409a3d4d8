"""TrajectoryRecorder: which steps it records, what it stores, and resuming after a crash."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from models_store import (
    MissingCheckpoint,
    ModelExists,
    ModelStore,
    StoreError,
    TrajectoryWriter,
    convert,
)
from surfing.architectures import StateMismatch, UnknownArchitecture, build_generator
from surfing.record import TrajectoryRecorder
from surfing.solvers import surf
from surfing.trajectory import final_generator, generators

REPO = Path(__file__).resolve().parents[1]
# Batch norm included, so buffers (running statistics) are part of what must be recorded.
BN_ARCH = {"kind": "infogan", "latent_dim": 2, "width": 0.05}
RELU_ARCH = {"kind": "relu", "latent_dim": 2, "hidden": [8, 16], "out_dim": 12}


def snapshot(G: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in G.state_dict().items()}


class Loop:
    """A small real training loop: Adam on G(z) towards fixed targets, in train mode."""

    def __init__(self, arch: dict, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.G = build_generator(arch)
        self.opt = torch.optim.Adam(self.G.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(seed + 1)
        self.z = torch.rand(8, arch["latent_dim"], generator=g) * 2 - 1
        with torch.no_grad():  # eval: leave the batch-norm statistics of theta_0 untouched
            self.y = torch.rand(self.G.eval()(self.z).shape, generator=g)
        self.G.train()

    def update(self) -> None:
        loss = (self.G(self.z) - self.y).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def steps_of(store: ModelStore, model_id: str) -> list[int]:
    return [c.step for c in store.manifest(model_id).checkpoints]


def assert_stored(store: ModelStore, model_id: str, states: dict[int, dict]) -> None:
    """Every checkpoint holds exactly the generator's state at its step."""
    for ckpt in store.checkpoints(model_id):
        want = states[ckpt.step]
        assert ckpt.tensors.keys() == want.keys()
        for name, t in want.items():
            assert torch.equal(ckpt.tensors[name], t), (ckpt.step, name)


def test_every_n_step_zero_and_last_step_hold_the_generators_weights(tmp_path) -> None:
    loop = Loop(BN_ARCH)
    theta0 = snapshot(loop.G)
    states = {0: theta0}
    with TrajectoryRecorder(tmp_path, "bn", loop.G, every=3, arch=BN_ARCH) as rec:
        assert not rec.resumed and rec.last_step == 0  # theta_0 before any optimizer step
        saved = []
        for step in range(1, 11):
            loop.update()
            states[step] = snapshot(loop.G)
            saved.append(rec.step(step))
        assert saved == [s % 3 == 0 for s in range(1, 11)]
        assert not rec.manifest.complete
    store = ModelStore(tmp_path)
    manifest = store.manifest("bn")
    assert manifest.complete and steps_of(store, "bn") == [0, 3, 6, 9, 10]  # 10: on close
    assert manifest.output_shape == [1, 28, 28]  # inferred from one eval-mode sample
    assert manifest.arch == BN_ARCH and manifest.latent_dim == 2
    assert manifest.training["every"] == 3
    assert_stored(store, "bn", states)
    # training really changed the weights and the running statistics after theta_0
    first, last = store.load("bn", 0), store.load("bn", -1)
    assert not torch.equal(first["fc.0.weight"], last["fc.0.weight"])
    bn_mean = next(k for k in first if k.endswith("running_mean"))
    assert torch.equal(first[bn_mean], torch.zeros_like(first[bn_mean]))
    assert not torch.equal(last[bn_mean], first[bn_mean])


def test_last_step_is_not_recorded_twice_and_eval_mode_changes_nothing(tmp_path) -> None:
    loop = Loop(RELU_ARCH)
    states = {0: snapshot(loop.G)}
    with TrajectoryRecorder(tmp_path, "relu", loop.G, every=4, arch=RELU_ARCH) as rec:
        for step in range(1, 9):
            loop.update()
            states[step] = snapshot(loop.G)
            loop.G.eval()  # a loop that evaluates between steps: the state is the same
            rec.step(step)
            loop.G.train()
        assert not rec.step(8) and not rec.step(3)  # repeated or older steps: no-ops
    store = ModelStore(tmp_path)
    assert steps_of(store, "relu") == [0, 4, 8]
    assert store.manifest("relu").output_shape == [12]
    assert_stored(store, "relu", states)


def test_exception_leaves_a_readable_incomplete_trajectory(tmp_path) -> None:
    loop = Loop(RELU_ARCH)
    states = {0: snapshot(loop.G)}
    with pytest.raises(RuntimeError, match="diverged"):
        with TrajectoryRecorder(tmp_path, "crash", loop.G, every=2, arch=RELU_ARCH) as rec:
            for step in range(1, 6):
                loop.update()
                states[step] = snapshot(loop.G)
                rec.step(step)
            raise RuntimeError("diverged")
    store = ModelStore(tmp_path)
    manifest = store.manifest("crash")
    assert not manifest.complete
    assert steps_of(store, "crash") == [0, 2, 4]  # step 5 was seen but not saved on a crash
    assert_stored(store, "crash", states)


def test_resume_appends_after_the_last_checkpoint(tmp_path) -> None:
    loop = Loop(BN_ARCH)
    states = {0: snapshot(loop.G)}
    with pytest.raises(KeyboardInterrupt):
        with TrajectoryRecorder(tmp_path, "resume", loop.G, every=4, arch=BN_ARCH) as rec:
            for step in range(1, 100):
                loop.update()
                states[step] = snapshot(loop.G)
                rec.step(step)
                if step == 10:
                    raise KeyboardInterrupt
    store = ModelStore(tmp_path)
    assert steps_of(store, "resume") == [0, 4, 8]

    # The user's loop restarts from its own checkpoint at step 6 (earlier than the last
    # recorded step): steps up to 8 must be ignored, not duplicated or reordered.
    loop.G.load_state_dict(states[6])
    with TrajectoryRecorder(tmp_path, "resume", loop.G, every=4, arch=BN_ARCH) as rec:
        assert rec.resumed and rec.last_step == 8
        assert steps_of(store, "resume") == [0, 4, 8]  # step 0 not recorded again
        saved = {}
        for step in range(7, 15):
            loop.update()
            if step > 8:
                states[step] = snapshot(loop.G)
            saved[step] = rec.step(step)
        assert [s for s, ok in saved.items() if ok] == [12]
    steps = steps_of(store, "resume")
    assert steps == [0, 4, 8, 12, 14]
    assert store.manifest("resume").complete
    assert_stored(store, "resume", states)


def test_resume_after_a_killed_process(tmp_path) -> None:
    """SIGKILL mid-run: no __exit__, no close; a new recorder carries on."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from surfing.architectures import build_generator
        from surfing.record import TrajectoryRecorder
        torch.manual_seed(0)
        G = build_generator({RELU_ARCH!r})
        opt = torch.optim.SGD(G.parameters(), lr=0.1)
        rec = TrajectoryRecorder({str(tmp_path)!r}, "killed", G, every=2, arch={RELU_ARCH!r})
        for step in range(1, 6):
            G(torch.ones(4, 2)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step(step)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120)
    assert proc.returncode == -9
    store = ModelStore(tmp_path)
    assert steps_of(store, "killed") == [0, 2, 4] and not store.manifest("killed").complete
    G = final_generator(store, "killed").train()  # the run's own resume point: step 4
    for p in G.parameters():
        p.requires_grad_(True)
    with TrajectoryRecorder(tmp_path, "killed", G, every=2, arch=RELU_ARCH) as rec:
        assert rec.resumed and rec.last_step == 4
        for step in range(5, 8):
            with torch.no_grad():
                for p in G.parameters():
                    p.add_(0.01)
            rec.step(step)
        final = snapshot(G)
    assert steps_of(store, "killed") == [0, 2, 4, 6, 7]
    last = store.load("killed", -1)
    assert all(torch.equal(last[k], v) for k, v in final.items())


def test_orphan_checkpoint_from_a_crash_between_file_and_manifest(tmp_path, monkeypatch) -> None:
    loop = Loop(RELU_ARCH)
    states = {0: snapshot(loop.G)}
    folder = tmp_path / "orphan"
    real_write_manifest = TrajectoryWriter._write_manifest

    def crash_on_step_6(self, manifest):  # the file for step 6 is on disk, its manifest not
        if manifest.checkpoints and manifest.checkpoints[-1].step == 6:
            raise OSError("power cut")
        real_write_manifest(self, manifest)

    monkeypatch.setattr(TrajectoryWriter, "_write_manifest", crash_on_step_6)
    with pytest.raises(OSError, match="power cut"):
        with TrajectoryRecorder(tmp_path, "orphan", loop.G, every=3, arch=RELU_ARCH) as rec:
            for step in range(1, 10):
                loop.update()
                states[step] = snapshot(loop.G)
                rec.step(step)
    monkeypatch.setattr(TrajectoryWriter, "_write_manifest", real_write_manifest)
    orphan = folder / "ckpt-000002.safetensors"
    assert orphan.is_file() and steps_of(ModelStore(tmp_path), "orphan") == [0, 3]
    temp = folder / ".ckpt-000003.safetensors.0123456789ab.tmp"  # a write killed midway
    temp.write_bytes(b"partial")
    seals = [folder / f".ckpt-00000{i}.safetensors.verified" for i in (1, 2)]
    for seal in seals:  # a listed file's seal and the orphan's (reading.seal_path)
        seal.write_text("{}")
    seal_temp = folder / ".ckpt-000002.safetensors.verified.0123456789ab.tmp"
    seal_temp.write_text("{")
    (folder / "notes.txt").write_text("the user's own file")

    loop.G.load_state_dict(states[3])
    with TrajectoryRecorder(tmp_path, "orphan", loop.G, every=3, arch=RELU_ARCH) as rec:
        assert rec.resumed
        assert not orphan.exists() and not temp.exists()  # removed before appending
        assert seals[0].exists() and not seals[1].exists() and not seal_temp.exists()
        assert (folder / "notes.txt").read_text() == "the user's own file"
        for step in range(4, 8):
            loop.update()
            states[step] = snapshot(loop.G)  # the resumed run's own step-6 weights
            rec.step(step)
    store = ModelStore(tmp_path)
    assert steps_of(store, "orphan") == [0, 3, 6, 7]
    assert_stored(store, "orphan", states)  # hash-checked reads of every file


def test_resume_refuses_a_different_model(tmp_path) -> None:
    G = build_generator(RELU_ARCH)
    with pytest.raises(RuntimeError):
        with TrajectoryRecorder(tmp_path, "m", G, every=2, arch=RELU_ARCH):
            raise RuntimeError
    other = {**RELU_ARCH, "hidden": [8, 17]}
    with pytest.raises(ValueError, match="arch"):
        TrajectoryRecorder(tmp_path, "m", build_generator(other), arch=other)
    with pytest.raises(ValueError, match="output_shape"):
        TrajectoryRecorder(tmp_path, "m", G, arch=RELU_ARCH, output_shape=[3, 2, 2])
    with pytest.raises(ValueError, match="latent_prior"):
        TrajectoryRecorder(tmp_path, "m", G, arch=RELU_ARCH, latent="normal")
    assert steps_of(ModelStore(tmp_path), "m") == [0]  # nothing was appended


def test_complete_trajectory_is_refused_unless_overwrite(tmp_path) -> None:
    G = build_generator(RELU_ARCH)
    with TrajectoryRecorder(tmp_path, "done", G, every=2, arch=RELU_ARCH) as rec:
        rec.step(2)
        rec.step(3)
    store = ModelStore(tmp_path)
    assert steps_of(store, "done") == [0, 2, 3]
    with pytest.raises(ModelExists, match="complete"):
        TrajectoryRecorder(tmp_path, "done", G, arch=RELU_ARCH)
    with pytest.raises(StoreError, match="complete"):
        store.reopen("done")
    rec = TrajectoryRecorder(store, "done", G, every=5, arch=RELU_ARCH, overwrite=True)
    assert not rec.resumed and steps_of(store, "done") == [0]
    assert not store.manifest("done").complete


def test_reopen_refuses_lossy_and_missing_files(tmp_path) -> None:
    store = ModelStore(tmp_path)
    G = build_generator(RELU_ARCH)
    with TrajectoryRecorder(store, "src", G, every=1, arch=RELU_ARCH) as rec:
        for step in range(1, 3):
            with torch.no_grad():
                next(G.parameters()).add_(1.0)
            rec.step(step)
    convert(store, "src", "lossy")
    manifest = store.manifest("lossy")
    path = tmp_path / "lossy" / "manifest.json"
    path.write_text(path.read_text().replace('"complete": true', '"complete": false'))
    assert manifest.encoding == "qdelta"
    with pytest.raises(StoreError, match="fp32"):
        store.reopen("lossy")
    with pytest.raises(RuntimeError):
        with TrajectoryRecorder(store, "gap", G, every=1, arch=RELU_ARCH) as rec:
            rec.step(1)
            raise RuntimeError
    (tmp_path / "gap" / "ckpt-000000.safetensors").unlink()
    with pytest.raises(MissingCheckpoint):
        TrajectoryRecorder(store, "gap", G, every=1, arch=RELU_ARCH)


def test_bad_arch_fails_at_construction_and_creates_nothing(tmp_path) -> None:
    G = build_generator(RELU_ARCH)
    with pytest.raises(UnknownArchitecture, match="no-such-net"):
        TrajectoryRecorder(tmp_path, "a", G, arch={"kind": "no-such-net", "latent_dim": 2})
    with pytest.raises(StateMismatch, match="layers.1.weight"):
        TrajectoryRecorder(tmp_path, "a", G, arch={**RELU_ARCH, "hidden": [8, 15]})
    with pytest.raises(ValueError, match="latent_dim"):
        TrajectoryRecorder(tmp_path, "a", G, arch={"kind": "relu", "hidden": [8, 16]})
    assert not (tmp_path / "a").exists()


def test_a_recorded_trajectory_surfs(tmp_path) -> None:
    """The recorder's output is what the solver streams: one stage per checkpoint."""
    loop = Loop(RELU_ARCH, seed=3)
    with TrajectoryRecorder(tmp_path, "surfable", loop.G, every=25, arch=RELU_ARCH) as rec:
        for step in range(1, 101):
            loop.update()
            rec.step(step)
    store = ModelStore(tmp_path)
    G_T = final_generator(store, "surfable")
    x_star = torch.tensor([[0.3, -0.5]])
    x0 = torch.tensor([[-0.2, 0.1]])
    with torch.no_grad():
        b = G_T(x_star).flatten(1)
        start = 0.5 * (G_T(x0).flatten(1) - b).pow(2).sum()
    res = surf(
        generators(store, "surfable"), b, x0, steps=20, lr=0.05, final_steps=300, schedule="paper"
    )
    assert [t.step for t in res.trace] == [0, 25, 50, 75, 100]
    assert float(res.objective[0]) < 1e-3 * float(start)
    with torch.no_grad():
        fit = G_T(res.x).flatten(1)
    assert torch.allclose(fit, b, atol=5e-3)
