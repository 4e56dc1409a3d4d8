"""models_store: atomic writes, strict manifests, streaming reads with prefetch."""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from datetime import datetime
from pathlib import Path

import pytest
import torch

from models_store import (
    CorruptCheckpoint,
    InvalidModelId,
    MalformedManifest,
    Manifest,
    MissingCheckpoint,
    ModelExists,
    ModelNotFound,
    ModelStore,
    StoreError,
    default_store_root,
    select_indices,
    validate_model_id,
)

META = dict(
    arch={"kind": "relu", "latent_dim": 2, "hidden": [4], "out_dim": 6},
    latent_dim=2,
    output_shape=[1, 2, 3],
    value_range=[0.0, 1.0],
    training={"method": "vae", "lr": 1e-3, "batch_size": 8, "every": 40},
    dataset="fashion-mnist",
)


def weights(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(3, 2, generator=g).t(),  # non-contiguous on purpose
        "b": torch.randn(3, generator=g, dtype=torch.float64),
        "n": torch.tensor(step),
    }


def write(store: ModelStore, model_id: str = "m", steps=(0, 40, 80, 120)) -> None:
    with store.create(model_id, **META) as w:
        for s in steps:
            w.add(s, weights(s))


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("models_store-prefetch")]


@pytest.mark.parametrize("prefetch", [True, False])
def test_round_trip(tmp_path: Path, prefetch: bool) -> None:
    store = ModelStore(tmp_path)
    write(store)
    got = list(store.checkpoints("m", prefetch=prefetch))
    assert [(c.index, c.step) for c in got] == [(0, 0), (1, 40), (2, 80), (3, 120)]
    for c in got:
        want = weights(c.step)
        assert c.tensors["w"].is_contiguous()
        assert torch.equal(c.tensors["w"], want["w"])
        assert c.tensors["b"].dtype == torch.float32  # fp32 encoding
        assert torch.allclose(c.tensors["b"], want["b"].float())
        assert c.tensors["n"].item() == c.step and c.tensors["n"].dtype == torch.int64
    assert torch.equal(store.load("m", -1)["w"], weights(120)["w"])
    assert torch.equal(store.load("m", 1)["w"], weights(40)["w"])
    with pytest.raises(IndexError):
        store.load("m", 4)


def test_manifest_fields(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    d = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert d["format_version"] == 1 and d["encoding"] == "fp32" and d["complete"] is True
    assert d["arch"] == META["arch"] and d["training"] == META["training"]
    assert d["dataset"] == "fashion-mnist" and d["latent_dim"] == 2
    assert datetime.fromisoformat(d["created_at"]).tzinfo is not None
    for i, c in enumerate(d["checkpoints"]):
        data = (tmp_path / "m" / c["file"]).read_bytes()
        assert c["file"] == f"ckpt-{i:06d}.safetensors"
        assert c["bytes"] == len(data) and c["sha256"] == hashlib.sha256(data).hexdigest()
    m = store.manifest("m")
    assert m.n_pixels == 6 and [c.step for c in m.checkpoints] == [0, 40, 80, 120]
    assert Manifest.from_dict(m.to_dict()) == m and m.to_dict() == d
    assert [x.model_id for x in store.list_models()] == ["m"]


def test_stride_keeps_first_and_last(tmp_path: Path) -> None:
    assert select_indices(10, 3) == [0, 3, 6, 9]
    assert select_indices(11, 3) == [0, 3, 6, 9, 10]
    assert select_indices(1, 5) == [0] and select_indices(0, 2) == []
    with pytest.raises(ValueError):
        select_indices(4, 0)
    store = ModelStore(tmp_path)
    write(store, steps=(0, 1, 2, 3, 4))
    assert [c.index for c in store.checkpoints("m", stride=3)] == [0, 3, 4]
    assert [c.step for c in store.checkpoints("m", stride=10, prefetch=False)] == [0, 4]


def test_flipped_byte_is_corrupt(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    path = tmp_path / "m" / "ckpt-000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    it = store.checkpoints("m")
    assert next(it).index == 0 and next(it).index == 1
    with pytest.raises(CorruptCheckpoint, match=r"'m'.*checkpoint 2.*ckpt-000002"):
        next(it)
    with pytest.raises(CorruptCheckpoint):
        store.load("m", 2)
    store.load("m", 2, verify=False)  # still parses; only the hash catches it
    assert not prefetch_threads()


def test_a_verified_file_is_hashed_once_per_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second pass over the same files skips the sha256 (what a rescue pass used to pay
    again), but a file changed in place or replaced is hashed again and caught."""
    import os

    from models_store import reading

    hashed: list[str] = []
    real = reading._sha256
    monkeypatch.setattr(reading, "_sha256", lambda fh: hashed.append(fh.name) or real(fh))
    store = ModelStore(tmp_path, seals=False)
    write(store)
    first = [c.tensors for c in store.checkpoints("m")]
    assert len(hashed) == 4
    again = [c.tensors for c in store.checkpoints("m")]
    assert len(hashed) == 4  # same versions: not hashed again
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    ModelStore(tmp_path, seals=False).load("m", 1)  # what a store remembers is its own
    assert len(hashed) == 5

    path = tmp_path / "m" / "ckpt-000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    before = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))  # in place, as a later edit would: same inode, new mtime
    os.utime(path, ns=(before + 10**9, before + 10**9))  # file clocks tick coarsely (~4 ms)
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        store.load("m", 2)
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert torch.equal(store.load("m", 2)["w"], first[2]["w"])
    swapped = path.with_suffix(".tmp")
    swapped.write_bytes((tmp_path / "m" / "ckpt-000003.safetensors").read_bytes())
    os.replace(swapped, path)  # a new inode with another checkpoint's bytes
    with pytest.raises(CorruptCheckpoint):
        store.load("m", 2)


def _counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from models_store import reading

    hashed: list[str] = []
    real = reading._sha256
    monkeypatch.setattr(reading, "_sha256", lambda fh: hashed.append(fh.name) or real(fh))
    return hashed


def test_a_sealed_file_is_not_hashed_by_the_next_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh store (another process) trusts the seal of a file version verified before, but
    hashes and catches a file edited after it was sealed, and ignores a seal that does not
    match the manifest or does not parse."""
    import os
    import time

    from models_store import reading

    monkeypatch.setattr(reading, "SEAL_AFTER_S", 0.05)
    hashed = _counting_hashes(monkeypatch)
    write(ModelStore(tmp_path))
    time.sleep(0.1)  # older than SEAL_AFTER_S
    first = [c.tensors for c in ModelStore(tmp_path).checkpoints("m")]
    assert len(hashed) == 4
    folder = tmp_path / "m"
    assert sorted(p.name for p in folder.glob(".*.verified")) == [
        f".ckpt-{i:06d}.safetensors.verified" for i in range(4)
    ]
    again = [c.tensors for c in ModelStore(tmp_path).checkpoints("m")]
    assert len(hashed) == 4  # every file's seal matched: nothing hashed
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    ModelStore(tmp_path, seals=False).load("m", 1)  # seals off: hashed as before
    assert len(hashed) == 5

    path = folder / "ckpt-000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))  # in place: same inode and size, a new ctime
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        ModelStore(tmp_path).load("m", 2)
    assert len(hashed) == 6
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    seal = folder / ".ckpt-000002.safetensors.verified"
    stale = seal.read_text()
    time.sleep(0.1)
    ModelStore(tmp_path).load("m", 2)  # hashed again (the seal is stale), sealed anew
    assert len(hashed) == 7 and seal.read_text() != stale
    forged = json.loads(seal.read_text())
    forged["sha256"] = "0" * 64  # a seal for other bytes than the manifest lists
    seal.write_text(json.dumps(forged))
    ModelStore(tmp_path).load("m", 2)
    assert len(hashed) == 8
    seal.write_text('{"sha256": ')  # torn
    ModelStore(tmp_path).load("m", 2)
    assert len(hashed) == 9 and json.loads(seal.read_text())["sha256"] != "0" * 64
    os.chmod(folder, 0o500)  # a read-only store still reads (root may write anyway)
    try:
        ModelStore(tmp_path).load("m", 3)
    finally:
        os.chmod(folder, 0o700)


def test_a_sealed_file_is_asked_of_the_kernel_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipping the hash skips its sequential read too, so the whole file is asked for ahead of
    the map, in pieces (the kernel reads at most its readahead window per request)."""
    import os
    import time

    from models_store import reading

    monkeypatch.setattr(reading, "SEAL_AFTER_S", 0.05)
    write(ModelStore(tmp_path))
    time.sleep(0.1)
    ModelStore(tmp_path).load("m", 1)  # hashed and sealed
    monkeypatch.setattr(reading, "ADVISE_CHUNK", 64)
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: asked.append((off, n)))
    ModelStore(tmp_path).load("m", 1)
    size = (tmp_path / "m" / "ckpt-000001.safetensors").stat().st_size
    assert size > 2 * 64 and asked == [(off, 64) for off in range(0, size, 64)]


def test_a_file_changed_just_now_gets_no_seal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit in the clock tick the file was hashed in keeps its ctime: such a file must not
    be sealed, or the edit would go unseen by every later process."""
    hashed = _counting_hashes(monkeypatch)
    write(ModelStore(tmp_path))
    ModelStore(tmp_path).load("m", 0)  # written microseconds ago, far under SEAL_AFTER_S
    assert not list((tmp_path / "m").glob(".*.verified"))
    ModelStore(tmp_path).load("m", 0)
    assert len(hashed) == 2


@pytest.mark.parametrize("verify", [True, False])
def test_tensors_come_back_where_torch_would_put_them(tmp_path: Path, verify: bool) -> None:
    """64-byte aligned, as torch allocates: MKL's rounding depends on alignment, so a tensor
    left where the file puts it would compute other numbers than the same weights in memory."""
    store = ModelStore(tmp_path)
    write(store)
    for i in range(4):
        tensors = store.load("m", i, verify=verify)
        assert all(t.data_ptr() % 64 == 0 for t in tensors.values())
        for name, value in weights(40 * i).items():
            assert torch.equal(tensors[name], value.to(tensors[name].dtype))


def test_reading_when_due_asks_the_kernel_for_the_next_files_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models_store import store as store_module

    asked: list[str] = []
    monkeypatch.setattr(store_module, "will_need", lambda path: asked.append(path.name))
    store = ModelStore(tmp_path)
    write(store, steps=tuple(range(0, 240, 40)))  # 6 checkpoints
    ahead = store_module.WILL_NEED_AHEAD
    for j, ckpt in enumerate(store.checkpoints("m", prefetch=False)):
        assert ckpt.index == j
        # every file up to WILL_NEED_AHEAD past this one was asked for, each once
        assert asked == [f"ckpt-{i:06d}.safetensors" for i in range(min(6, j + ahead + 1))]
    assert not prefetch_threads()


def test_no_tensor_stays_backed_by_its_file(tmp_path: Path) -> None:
    """safetensors maps the file; the store copies, so a file overwritten in place (or
    truncated) later changes nothing, and cannot fault, in a network already loaded."""
    store = ModelStore(tmp_path)
    write(store)
    tensors = store.load("m", 1)
    before = {k: v.clone() for k, v in tensors.items()}
    path = tmp_path / "m" / "ckpt-000001.safetensors"
    path.write_bytes(bytes(path.stat().st_size))  # zeros, in place: same inode
    assert all(torch.equal(tensors[k], before[k]) for k in before)


def test_a_file_replaced_while_it_is_read_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import safetensors.torch

    from models_store import reading

    store = ModelStore(tmp_path)
    write(store)
    path = tmp_path / "m" / "ckpt-000001.safetensors"
    load = safetensors.torch.load_file

    def load_then_replace(p: Path) -> dict[str, torch.Tensor]:
        out = load(p)
        copy = path.with_suffix(".tmp")
        copy.write_bytes(path.read_bytes())
        os.replace(copy, path)  # same bytes, another file
        return out

    monkeypatch.setattr(reading.safetensors.torch, "load_file", load_then_replace)
    with pytest.raises(CorruptCheckpoint, match="changed while it was read"):
        store.load("m", 1)
    monkeypatch.setattr(reading.safetensors.torch, "load_file", load)
    assert torch.equal(store.load("m", 1)["w"], weights(40)["w"])


def test_crash_mid_write_leaves_readable_prefix(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.create("m", **META) as w:
            w.add(0, weights(0))
            w.add(40, weights(40))
            # a half-written third checkpoint: the temp file of an interrupted atomic write
            (tmp_path / "m" / ".ckpt-000002.safetensors.deadbeef.tmp").write_bytes(b"\0" * 7)
            raise RuntimeError("boom")
    m = store.manifest("m")
    assert m.complete is False and len(m.checkpoints) == 2
    assert [c.step for c in store.checkpoints("m")] == [0, 40]
    assert [x.model_id for x in store.list_models()] == ["m"]
    with pytest.raises(StoreError):
        w.add(80, weights(80))  # writer is closed after the exception


def test_corrupt_file_fails_at_its_own_position_with_parallel_readers(tmp_path: Path) -> None:
    """Readers run ahead, but an error is raised when the caller reaches that checkpoint."""
    store = ModelStore(tmp_path)
    write(store, steps=tuple(range(6)))
    path = tmp_path / "m" / "ckpt-000003.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    it = store.checkpoints("m", readers=4)
    assert [next(it).index for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CorruptCheckpoint, match="checkpoint 3"):
        next(it)
    assert not prefetch_threads()


def test_transform_runs_in_the_pipeline(tmp_path: Path) -> None:
    """`transform` (e.g. the copy to a GPU) is applied to every checkpoint, off the caller's
    thread, with and without prefetch."""
    store = ModelStore(tmp_path)
    write(store)
    threads: set[str] = set()

    def double(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        threads.add(threading.current_thread().name)
        return {k: 2 * v for k, v in tensors.items()}

    for prefetch in (True, False):
        threads.clear()
        got = list(store.checkpoints("m", prefetch=prefetch, transform=double))
        for c in got:
            want = store.load("m", c.index)
            assert all(torch.equal(c.tensors[k], 2 * want[k]) for k in want)
        caller = threading.current_thread().name
        assert (caller not in threads) if prefetch else (threads == {caller})


def test_missing_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    (tmp_path / "m" / "ckpt-000001.safetensors").unlink()
    with pytest.raises(MissingCheckpoint, match=r"checkpoint 1.*ckpt-000001"):
        list(store.checkpoints("m"))
    with pytest.raises(MissingCheckpoint):
        store.load("m", 1, verify=False)
    assert not prefetch_threads()


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "..", "", "Dcgan", "a" * 65, "a..b", ".a", "-a", "a\n", "a b", None]
)
def test_invalid_ids(tmp_path: Path, bad: object) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(InvalidModelId):
        validate_model_id(bad)
    with pytest.raises(InvalidModelId):
        store.manifest(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidModelId):
        store.create(bad, **META)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_valid_ids() -> None:
    for ok in ["dcgan-k10", "a", "a" * 64, "wgan_gp.v2", "0"]:
        assert validate_model_id(ok) == ok


def test_unknown_id(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for call in (store.manifest, store.checkpoints, store.delete, lambda i: store.load(i, 0)):
        with pytest.raises(ModelNotFound, match="nope"):
            call("nope")
    assert ModelStore(tmp_path / "absent").list_models() == []


def test_create_existing_and_overwrite(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    with pytest.raises(ModelExists, match="overwrite=True"):
        store.create("m", **META)
    with store.create("m", **META, overwrite=True) as w:
        w.add(7, weights(7))
    assert [c.step for c in store.manifest("m").checkpoints] == [7]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "ckpt-000000.safetensors",
        "manifest.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging/trash left behind


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ValueError):
        store.create("x", **{**META, "latent_dim": 0})
    with pytest.raises(ValueError):
        store.create("x", **{**META, "training": {"f": object()}})
    with pytest.raises(ValueError):
        store.create("x", **META, encoding="zip")
    assert list(tmp_path.iterdir()) == []
    with store.create("x", **META) as w:
        w.add(5, weights(5))
        with pytest.raises(ValueError, match="increase"):
            w.add(5, weights(5))


def test_malformed_manifest_is_listed_around(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(tmp_path)
    write(store, "good", steps=(0,))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    (tmp_path / "noman").mkdir()
    write(store, "wrong", steps=(0,))
    d = json.loads((tmp_path / "wrong" / "manifest.json").read_text())
    d["checkpoints"][0]["file"] = "../good/ckpt-000000.safetensors"
    (tmp_path / "wrong" / "manifest.json").write_text(json.dumps(d))
    assert [m.model_id for m in store.list_models()] == ["good"]
    assert all(f"'{i}'" in caplog.text for i in ("bad", "noman", "wrong"))  # not silent
    for model_id in ("bad", "noman", "wrong"):
        with pytest.raises(MalformedManifest, match=model_id):
            store.manifest(model_id)


def test_delete(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store, "a", steps=(0,))
    write(store, "b", steps=(0,))
    store.delete("a")
    assert [m.model_id for m in store.list_models()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_prefetch_closed_early_leaves_no_threads(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store, steps=tuple(range(6)))
    before = threading.active_count()
    it = store.checkpoints("m", readers=2)
    assert next(it).index == 0
    assert prefetch_threads()  # readers and the decoder are working ahead
    it.close()
    assert not prefetch_threads() and threading.active_count() == before

    for c in store.checkpoints("m"):  # break out of a for loop, drop the generator
        if c.index == 2:
            break
    del c
    gc.collect()
    assert not prefetch_threads()


def test_default_store_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SURFING_MODELS_DIR", str(tmp_path))
    assert default_store_root() == tmp_path
    monkeypatch.delenv("SURFING_MODELS_DIR")
    assert default_store_root() == Path("data/models")


def test_checkpoint_tensors_come_back_in_a_fixed_order(tmp_path: Path) -> None:
    """safetensors returns names in no fixed order; the store sorts them, so code that
    iterates a checkpoint (drawing noise per tensor, say) is reproducible."""
    store = ModelStore(tmp_path)
    names = [f"layer{i}.weight" for i in (3, 1, 4, 0, 2)]
    with store.create("order", **META) as w:
        w.add(0, {n: torch.zeros(2) for n in names})
    assert list(store.load("order", 0)) == sorted(names)
    assert list(next(iter(store.checkpoints("order"))).tensors) == sorted(names)
