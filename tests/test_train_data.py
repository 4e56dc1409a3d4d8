"""The conv generator for any C x S x S, loading the user's own images, training on them (all
four methods, library and CLI), and the colour patch data set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models_store import ModelStore
from surfing.architectures import available, build_generator, check_state
from surfing.cli import main
from surfing.data import dataset_name, load_images
from surfing.images import save_grid
from surfing.nets import CONV_SIZES, ConvGenerator, ConvTrunk
from surfing.train import METHODS, TrainConfig, train
from surfing.trajectory import final_generator

ROOT = Path(__file__).resolve().parents[1]


def conv_arch(channels: int, size: int, k: int = 3, width: float = 0.05) -> dict:
    return {"kind": "conv", "latent_dim": k, "channels": channels, "size": size, "width": width}


# --- networks -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", CONV_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_conv_generator_makes_every_allowed_shape(channels: int, size: int) -> None:
    torch.manual_seed(0)
    G = build_generator(conv_arch(channels, size)).eval()
    assert isinstance(G, ConvGenerator)
    with torch.no_grad():
        x = G(torch.rand(4, 3) * 2 - 1)
    assert x.shape == (4, channels, size, size)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert x.std() > 0  # not a constant image
    check_state(conv_arch(channels, size), G.state_dict())  # strict load of its own state
    D = ConvTrunk(5, 0.05, channels=channels, size=size)
    assert D(torch.rand(2, channels, size, size)).shape == (2, 5)


def test_conv_is_a_builtin_and_refuses_other_shapes() -> None:
    assert "conv" in available()
    with pytest.raises(ValueError, match=r"image size 12 .*8, 16, 28, 32, 64"):
        build_generator(conv_arch(1, 12))
    with pytest.raises(ValueError, match="channels must be one of"):
        build_generator(conv_arch(2, 16))


def test_default_trunk_keeps_the_paper_layout() -> None:
    """The infogan path's discriminator/encoder: same layers, names and shapes as before."""
    D = ConvTrunk(6, 0.1)  # c1 = 6, c2 = 13, h = 102 at this width
    shapes = {k: tuple(v.shape) for k, v in D.state_dict().items() if "num_batches" not in k}
    assert shapes == {
        "net.0.weight": (6, 1, 4, 4), "net.0.bias": (6,),
        "net.2.weight": (13, 6, 4, 4), "net.2.bias": (13,),
        "net.3.weight": (13,), "net.3.bias": (13,),
        "net.3.running_mean": (13,), "net.3.running_var": (13,),
        "net.6.weight": (102, 13 * 7 * 7), "net.6.bias": (102,),
        "net.7.weight": (102,), "net.7.bias": (102,),
        "net.7.running_mean": (102,), "net.7.running_var": (102,),
        "net.9.weight": (6, 102), "net.9.bias": (6,),
    }  # fmt: skip


# --- loading images -------------------------------------------------------------------------


def write_image(path: Path, rgb_or_gray, size=(8, 8), fmt=None) -> None:
    mode = "L" if isinstance(rgb_or_gray, int) else "RGB"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb_or_gray).save(path, format=fmt)


def test_folder_loader_reads_png_and_jpeg_recursively(tmp_path) -> None:
    write_image(tmp_path / "a.png", (255, 0, 102))
    write_image(tmp_path / "sub" / "b.JPG", (0, 255, 0), size=(30, 30))
    write_image(tmp_path / "c.png", 51)
    wide = Image.new("RGB", (20, 10), (255, 255, 255))  # a red strip the centre crop cuts off
    wide.paste((255, 0, 0), (0, 0, 5, 10))
    wide.save(tmp_path / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")

    x = load_images(tmp_path, 4)
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.float32  # a colour image: RGB
    a, c, d, b = x  # sorted by path: a.png, c.png, d.png, sub/b.JPG
    assert torch.allclose(a, torch.tensor([1.0, 0.0, 0.4]).view(3, 1, 1).expand(3, 4, 4))
    assert torch.allclose(c, torch.full((3, 4, 4), 0.2))  # gray repeated over RGB
    assert torch.equal(d, torch.ones(3, 4, 4))  # centre crop: white only
    assert b[1].mean() > 0.95 and b[0].mean() < 0.05  # JPEG green, resized 30 -> 4

    gray = load_images(tmp_path, 6, channels=1)
    assert gray.shape == (4, 1, 6, 6)
    luminance = (0.299 * 255 + 0.114 * 102) / 255
    assert torch.allclose(gray[0], torch.full((1, 6, 6), luminance), atol=0.01)


def test_folder_loader_defaults_to_gray_and_refuses_bad_folders(tmp_path) -> None:
    gray = tmp_path / "gray"
    for i in range(3):
        write_image(gray / f"{i}.png", 40 * i)
    x = load_images(gray, 8)
    assert x.shape == (3, 1, 8, 8)
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([0.0, 40 / 255, 80 / 255]))
    with pytest.raises(ValueError, match="cap of 2"):
        load_images(gray, 8, max_images=2)
    with pytest.raises(ValueError, match="image size"):
        load_images(gray)

    empty = tmp_path / "empty"
    (empty / "deep").mkdir(parents=True)
    (empty / "deep" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        load_images(empty, 8)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "fake.png").write_bytes(b"this is text")
    with pytest.raises(ValueError, match="fake.png: cannot read it as an image"):
        load_images(broken, 8)
    with pytest.raises(ValueError, match="expected a folder"):
        load_images(tmp_path / "missing.png", 8)


def test_npy_loader_layouts_scaling_and_pickle(tmp_path) -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", u8)
    np.save(tmp_path / "nchw.npy", u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    np.save(tmp_path / "nhw.npy", u8[..., 0])
    expected = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)

    assert torch.allclose(load_images(tmp_path / "nhwc.npy"), expected)  # uint8 / 255
    assert torch.allclose(load_images(tmp_path / "nchw.npy"), expected)
    nhw = load_images(tmp_path / "nhw.npy")
    assert nhw.shape == (5, 1, 8, 8) and torch.allclose(nhw[:, 0], expected[:, 0])

    small = load_images(tmp_path / "nhwc.npy", size=4, channels=1)
    assert small.shape == (5, 1, 4, 4)
    lum = (expected * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(small[:, 0].mean((1, 2)), lum.mean((1, 2)), atol=0.01)  # area-average
    rgb = load_images(tmp_path / "nhw.npy", channels=3)
    assert rgb.shape == (5, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert dataset_name(tmp_path / "nhw.npy") == f"npy:{tmp_path.name}/nhw"

    np.save(tmp_path / "range.npy", np.full((2, 8, 8), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_images(tmp_path / "range.npy")
    np.save(tmp_path / "shape.npy", np.zeros((2, 5, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="expected"):
        load_images(tmp_path / "shape.npy")
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric array"):
        load_images(tmp_path / "obj.npy")


def test_rgb_grid_png_keeps_colours(tmp_path) -> None:
    batch = torch.zeros(3, 3, 4, 4)
    batch[0, 0] = 1.0  # red, green, blue tiles
    batch[1, 1] = 1.0
    batch[2, 2] = 1.0
    save_grid(batch, tmp_path / "g.png", ncol=3, pad=2)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "RGB" and im.size == (2 * (3 * 6 + 2), 2 * (6 + 2))
        arr = np.asarray(im)
    centres = [arr[2 * 4, 2 * (2 + 6 * i + 2)] for i in range(3)]  # scale 2, pad 2
    assert [tuple(c) for c in centres] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


# --- training on them -------------------------------------------------------------------------


def tiny_folder(path: Path, n: int = 12, size: int = 10) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return path


@pytest.mark.parametrize("method", METHODS)
def test_train_conv_on_a_folder_records_its_shape_and_prior(tmp_path, method: str) -> None:
    images = load_images(tiny_folder(tmp_path), 8, 3)
    store = ModelStore(tmp_path / "store")
    cfg = TrainConfig(
        method=method, latent_dim=2, width=0.05, every=2, max_steps=3, epochs=50,
        batch_size=4, n_critic=2, seed=3, arch="conv",
    )  # fmt: skip
    train(cfg, store, "m", images=images, progress=False, dataset="folder:tiny")
    m = store.manifest("m")
    assert m.complete and [c.step for c in m.checkpoints] == [0, 2, 3]
    assert m.arch == conv_arch(3, 8, k=2)
    assert m.output_shape == [3, 8, 8] and m.value_range == [0.0, 1.0]
    assert m.latent_prior == ("normal" if method == "vae" else "uniform")
    assert m.dataset == "folder:tiny"

    torch.manual_seed(3)  # theta_0 is the seeded fresh network
    theta_0 = build_generator(m.arch).state_dict()
    first = store.load("m", 0)
    assert all(torch.equal(first[k], theta_0[k]) for k in theta_0)
    G = final_generator(store, "m")
    assert not torch.equal(store.load("m", -1)["fc.0.weight"], first["fc.0.weight"])
    with torch.no_grad():
        out = G(torch.rand(5, 2))
    assert out.shape == (5, 3, 8, 8) and torch.isfinite(out).all()


def test_train_refuses_mismatched_images(tmp_path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ValueError, match="infogan generator makes 1 x 28 x 28"):
        train(TrainConfig(method="dcgan", latent_dim=2), store, "a", images=torch.rand(70, 3, 8, 8))
    with pytest.raises(ValueError, match="fewer than one batch"):
        cfg = TrainConfig(method="dcgan", latent_dim=2, arch="conv")
        train(cfg, store, "b", images=torch.rand(10, 3, 8, 8))
    assert store.list_models() == []


def run_cli(args: list[str], capsys) -> dict:
    main(args)
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def test_cli_trains_on_a_folder_and_an_npy(tmp_path, capsys) -> None:
    (tmp_path / "pics").mkdir()
    folder = tiny_folder(tmp_path / "pics")
    common = ["--latent-dim", "2", "--width", "0.05", "--max-steps", "2", "--every", "1",
              "--epochs", "50", "--batch-size", "4", "--threads", "1",
              "--device", "cpu"]  # fmt: skip
    store = tmp_path / "store"
    summary = run_cli(
        ["--models-dir", str(store), "train", "--method", "wgan-gp", "--data", str(folder),
         "--image-size", "16", "--channels", "1", "--id", "gray", *common],
        capsys,
    )  # fmt: skip
    m = ModelStore(store).manifest("gray")
    assert m.arch["kind"] == "conv" and m.output_shape == [1, 16, 16]  # conv is the default
    assert m.dataset == "folder:pics" and summary["checkpoints"] == 3
    with Image.open(summary["samples"]) as im:
        assert im.mode == "L" and im.size == (2 * (8 * 18 + 2), 2 * (8 * 18 + 2))

    arr = np.random.default_rng(2).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "set.npy", arr)
    summary = run_cli(
        ["--models-dir", str(store), "train", "--method", "vae", "--data",
         str(tmp_path / "set.npy"), "--id", "rgb", *common],
        capsys,
    )  # fmt: skip
    m = ModelStore(store).manifest("rgb")
    assert m.output_shape == [3, 8, 8] and m.latent_prior == "normal"
    assert summary["output_shape"] == [3, 8, 8] and m.dataset == f"npy:{tmp_path.name}/set"
    with Image.open(summary["samples"]) as im:
        assert im.mode == "RGB"
        assert np.asarray(im).std(axis=2).max() > 0  # channels differ somewhere: real colour

    with pytest.raises(SystemExit) as exc:
        main(["--models-dir", str(store), "train", "--method", "dcgan", "--data",
              str(tmp_path / "set.npy"), "--arch", "infogan", "--id", "bad", *common])  # fmt: skip
    assert exc.value.code == 2 and "--arch conv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--models-dir", str(store), "train", "--method", "dcgan", "--image-size", "8",
              "--id", "bad2", *common])  # fmt: skip
    assert "apply to --data" in capsys.readouterr().err


# --- the colour patch data set ----------------------------------------------------------------


def patch_script():
    path = ROOT / "scripts" / "sample_patches.py"
    spec = importlib.util.spec_from_file_location("sample_patches", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patch_script_writes_disjoint_train_and_test(tmp_path, capsys) -> None:
    script = patch_script()
    script.main([str(tmp_path / "p"), "--train", "60", "--test", "20", "--seed", "4"])
    train_set = np.load(tmp_path / "p" / "train.npy", allow_pickle=False)
    test_set = np.load(tmp_path / "p" / "test.npy", allow_pickle=False)
    assert train_set.shape == (60, 32, 32, 3) and test_set.shape == (20, 32, 32, 3)
    assert train_set.dtype == np.uint8 and test_set.dtype == np.uint8

    meta = json.loads((tmp_path / "p" / "patches.json").read_text())
    photos = script.photographs(meta["downscale"])
    assert sorted(photos) == ["china", "flower"]
    crops = {"train": [], "test": []}
    for crop in meta["crops"]:
        crops[crop["split"]].append(crop)
    for split, patches in (("train", train_set), ("test", test_set)):
        assert {c["image"] for c in crops[split]} == {"china", "flower"}
        for crop, patch in zip(crops[split], patches, strict=True):
            r, c, cut = crop["row"], crop["col"], crop["split_col"]
            assert (c + 32 <= cut) if split == "train" else (c >= cut)  # never straddles
            assert np.array_equal(patch, photos[crop["image"]][r : r + 32, c : c + 32])
    flat_train = {p.tobytes() for p in train_set}
    assert not any(p.tobytes() in flat_train for p in test_set)

    again, _, _ = script.sample_patches(photos, 60, 20, seed=4)
    assert np.array_equal(again, train_set)  # seeded: the same data set every time
    x = load_images(tmp_path / "p" / "train.npy", 32, 3)
    assert x.shape == (60, 3, 32, 32) and float(x.max()) <= 1.0
