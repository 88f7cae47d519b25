"""Datasets: Fashion-MNIST from the real idx files, image folders written here, synthetic."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pruning import data as D
from pruning.data import (DataBundle, DatasetError, DatasetMeta, StreamSplit, TensorSplit,
                          list_datasets, load_dataset)

FMNIST_DIR = Path(os.environ.get(D.FASHION_MNIST_ENV) or D.FASHION_MNIST_DEFAULT_DIR)
needs_fmnist = pytest.mark.skipif(
    not all((FMNIST_DIR / f"{s}.gz").is_file() for s in D.FASHION_MNIST_FILES),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def read_idx(path: Path) -> np.ndarray:
    """An independent reader of the idx format, to check the loader against the file."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of a few hundred small images are too small for intra-op threads: on a shared
    2-core box their spin-waits cost 10-30× (measured), so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fm_train_labels() -> np.ndarray:
    return read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def fm_train_images() -> np.ndarray:
    return read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def fm() -> DataBundle:
    return load_dataset("fashion-mnist", train_limit=3000, test_limit=1000, seed=0)


def unnormalise(x: torch.Tensor, meta: DatasetMeta) -> torch.Tensor:
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    return (x.cpu() * std + mean).mul(255).round().to(torch.int64)


def all_batches(split, bs, **kw):
    xs, ys = zip(*split.batches(bs, **kw))
    return torch.cat(xs), torch.cat(ys)


# ---- registry


def test_list_and_unknown_dataset():
    assert list_datasets() == ["fashion-mnist", "imagefolder", "synthetic"]
    with pytest.raises(DatasetError, match="available: fashion-mnist, imagefolder, synthetic"):
        load_dataset("cifar-1000")
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match="synthetic dataset is generated and reads no folder"):
        load_dataset("synthetic", root="/data/typo")  # not silently ignored


# ---- Fashion-MNIST


@needs_fmnist
def test_fmnist_shapes_dtypes_labels(fm):
    m = fm.meta
    assert (m.name, m.num_classes, m.in_channels, m.input_size) == ("fashion-mnist", 10, 1, 28)
    assert m.classes[0] == "T-shirt/top" and m.classes[9] == "Ankle boot"
    assert (len(fm.train), len(fm.val), len(fm.test)) == (2700, 300, 1000)
    for split in (fm.train, fm.val, fm.test):
        assert isinstance(split, TensorSplit)
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) <= 9
        x, y = next(split.batches(64))
        assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # limits are stratified: the real file is balanced, so are the subsets
    assert torch.bincount(fm.test.labels, minlength=10).tolist() == [100] * 10
    assert torch.bincount(fm.val.labels, minlength=10).tolist() == [30] * 10


@needs_fmnist
def test_fmnist_matches_the_idx_file(fm, fm_train_labels, fm_train_images):
    full = load_dataset("fashion-mnist", val_size=0)
    assert len(full.train) == 60000 and len(full.val) == 0 and len(full.test) == 10000
    assert int(full.train.labels[0]) == int(fm_train_labels[0]) == 9  # known first label
    assert torch.equal(full.train.images[0, 0], torch.from_numpy(fm_train_images[0].copy()))
    test_labels = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert torch.equal(full.test.labels, torch.from_numpy(test_labels.astype(np.int64)))
    # every sample of a subset is the file's sample at its recorded index
    for split in (fm.train, fm.val):
        idx = split.indices.numpy()
        assert torch.equal(split.labels, torch.from_numpy(fm_train_labels[idx].astype(np.int64)))
        assert torch.equal(split.images[:, 0], torch.from_numpy(fm_train_images[idx]))


@needs_fmnist
def test_fmnist_split_deterministic_disjoint_and_sized(fm):
    again = load_dataset("fashion-mnist", train_limit=3000, test_limit=1000, seed=0)
    assert torch.equal(again.train.indices, fm.train.indices)
    assert torch.equal(again.val.indices, fm.val.indices)
    tr, va = set(fm.train.indices.tolist()), set(fm.val.indices.tolist())
    assert not tr & va and len(tr) == 2700 and len(va) == 300
    other = load_dataset("fashion-mnist", train_limit=3000, test_limit=1000, seed=1)
    assert not torch.equal(other.val.indices, fm.val.indices)
    assert not set(other.train.indices.tolist()) & set(other.val.indices.tolist())
    by_count = load_dataset("fashion-mnist", train_limit=1000, val_size=137)
    assert (len(by_count.train), len(by_count.val)) == (863, 137)
    # the test split is untouched by the seed and by the validation split
    assert torch.equal(other.test.indices, fm.test.indices)
    assert torch.equal(by_count.test.images, load_dataset(
        "fashion-mnist", train_limit=500, val_size=0.5, seed=7).test.images)


def test_bad_split_settings_are_dataset_errors():
    for kw in ({"val_size": 1.0}, {"val_size": 512}, {"val_size": -1}, {"val_size": "10%"},
               {"train_limit": 0}, {"image_size": 0}, {"seed": -1}):
        with pytest.raises(DatasetError):
            load_dataset("synthetic", **kw)
    with pytest.raises(DatasetError, match=r"leaves no training data \(\d+ training samples\): "
                                           r"hold out fewer, e.g. the fraction val_size=0.2"):
        load_dataset("synthetic", val_size=512)


@needs_fmnist
def test_normalisation_zero_mean_unit_std(fm):
    x, _ = all_batches(fm.train, 1000)
    assert abs(x.mean().item()) < 0.03
    assert abs(x.std().item() - 1) < 0.03


@needs_fmnist
def test_batches_deterministic_per_seed(fm):
    a = all_batches(fm.train, 256, shuffle=True, augment=True, seed=3)
    b = all_batches(fm.train, 256, shuffle=True, augment=True, seed=3)
    c = all_batches(fm.train, 256, shuffle=True, augment=True, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])
    # shuffled labels are a permutation of the split's labels
    assert torch.equal(a[1].sort().values, fm.train.labels.sort().values)
    # without shuffle: split order, and the last batch is short unless dropped
    x, y = all_batches(fm.train, 256)
    assert torch.equal(y, fm.train.labels)
    assert fm.train.num_batches(256) == 11 == len(list(fm.train.batches(256)))
    sizes = [len(y) for _, y in fm.train.batches(256, drop_last=True)]
    assert sizes == [256] * 10 == [256] * fm.train.num_batches(256, drop_last=True)


@needs_fmnist
def test_augment_keeps_shape_and_changes_pixels(fm):
    plain, y0 = next(fm.train.batches(128, seed=0))
    aug, y1 = next(fm.train.batches(128, augment=True, seed=0))
    assert aug.shape == plain.shape and aug.dtype == plain.dtype
    assert torch.equal(y0, y1)
    changed = (aug != plain).flatten(1).any(1).float().mean().item()
    assert changed > 0.8
    # a crop of a padded image: every augmented pixel is a source pixel value or padding
    lo = float(torch.tensor(-fm.meta.mean[0] / fm.meta.std[0]))
    assert torch.isclose(aug.min(), torch.tensor(lo), atol=1e-5)


def test_crop_flip_matches_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 3, 9, 6), generator=g, dtype=torch.uint8)
    pad = 2
    off = torch.randint(0, 2 * pad + 1, (7, 2), generator=g)
    flips = torch.rand(7, generator=g) < 0.5
    out = D.crop_flip(x, off, flips, pad)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(7):
        oy, ox = off[i].tolist()
        ref = padded[i, :, oy:oy + 9, ox:ox + 6]
        ref = ref.flip(-1) if flips[i] else ref
        assert torch.equal(out[i], ref)
    centre = torch.full((7, 2), pad)
    assert torch.equal(D.crop_flip(x, centre, None, pad), x)


def test_fmnist_missing_folder_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg and D.FASHION_MNIST_ENV in msg
    assert "train-images-idx3-ubyte.gz" in msg
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist")
    assert f"not found in {tmp_path / 'nowhere'} (${D.FASHION_MNIST_ENV})" in str(e.value)
    # a copy in the usual sub-folder that lacks one file: that folder and that file are named
    (tmp_path / "mine" / "fashion-mnist").mkdir(parents=True)
    for stem in D.FASHION_MNIST_FILES[1:]:
        (tmp_path / "mine" / "fashion-mnist" / f"{stem}.gz").write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", root=tmp_path / "mine")
    assert (f"not found in {tmp_path / 'mine' / 'fashion-mnist'} (missing: "
            f"{D.FASHION_MNIST_FILES[0]}.gz)") in str(e.value)


def _fmnist_copy(folder: Path) -> Path:
    """A folder of symlinks to the real files (cheap), to damage one file in."""
    folder.mkdir()
    for s in D.FASHION_MNIST_FILES:
        (folder / f"{s}.gz").symlink_to(FMNIST_DIR / f"{s}.gz")
    return folder


@needs_fmnist
def test_fmnist_env_var_and_parent_root(tmp_path, monkeypatch):
    folder = _fmnist_copy(tmp_path / "fashion-mnist")
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(folder))
    assert len(load_dataset("fashion-mnist", train_limit=100, test_limit=10).test) == 10
    monkeypatch.delenv(D.FASHION_MNIST_ENV)
    assert len(load_dataset("fashion-mnist", root=tmp_path, train_limit=100).train) == 90


@needs_fmnist
@pytest.mark.parametrize("damage, match", [
    (b"this is not gzip at all", "corrupt"),
    (gzip.compress(struct.pack(">II", 0x00000803, 60000)), "magic"),
    (gzip.compress(struct.pack(">II", 0x00000801, 60000) + bytes(100)), "truncated"),
    (gzip.compress(struct.pack(">II", 0x00000801, 60000) + bytes(60000))[:-20], "corrupt"),
], ids=["not-gzip", "wrong-magic", "short-payload", "cut-gzip-stream"])
def test_fmnist_corrupt_file(tmp_path, damage, match):
    folder = _fmnist_copy(tmp_path / "fm")
    bad = folder / "train-labels-idx1-ubyte.gz"
    bad.unlink()
    bad.write_bytes(damage)
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset("fashion-mnist", root=folder, train_limit=100)
    assert "train-labels-idx1-ubyte.gz" in str(e.value)
    assert "apt-get" not in str(e.value)  # the user's own copy: the package would not mend it


# ---- image folders


CLASS_VALUE = {"cat": 30, "dog": 90, "owl": 150, "only": 200}


def write_tree(root: Path, classes=("cat", "dog", "owl"), n=8, mode="L", sizes=((12, 12),)):
    """Constant images whose value tells the class (cat 30, dog 90, owl 150), in several
    sizes; the loader sorts class folders by name, so label c has value 30 + 60·c."""
    for name in classes:
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            v = CLASS_VALUE[name]
            colour = v if mode == "L" else (v, 255 - v, v // 2)
            Image.new(mode, sizes[i % len(sizes)], colour).save(d / f"{i:03d}.png")


def test_imagefolder_16_bit_grey_is_scaled_not_clipped(tmp_path):
    """16-bit grey PNGs (mode I;16) once became 3-channel images of 255 everywhere (PIL's
    convert clips); they are 1-channel, 0…65535 scaled to 0…255. Float pixels are refused."""
    for c, value in (("a", 771), ("b", 51400)):  # 771 / 257 = 3, 51400 / 257 = 200
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8), value + i, np.uint16)).save(tmp_path / c / f"{i}.png")
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I")
    b = load_dataset("imagefolder", root=tmp_path, val_size=0, num_workers=0)
    assert b.meta.in_channels == 1
    raw = torch.cat([b.train.images, b.test.images]).flatten()
    assert set(raw.tolist()) == {3, 200}
    # 16-bit PGM, which PIL opens as mode I (32-bit): scaled too, not clipped to white
    for c in ("a", "b"):
        for i in range(4):
            value = 771 if c == "a" else 51400
            (tmp_path / c / f"{i}.png").unlink()
            (tmp_path / c / f"{i}.pgm").write_bytes(
                b"P5 8 8 65535\n" + np.full((8, 8), value + i, ">u2").tobytes())
    assert Image.open(tmp_path / "a" / "0.pgm").mode == "I"
    b = load_dataset("imagefolder", root=tmp_path, val_size=0, num_workers=0)
    assert set(torch.cat([b.train.images, b.test.images]).flatten().tolist()) == {3, 200}
    # a 32-bit TIFF of 8-bit values stays as it is (a PGM's mode I is 16-bit whatever it holds)
    Image.fromarray(np.full((8, 8), 200, np.int32)).save(tmp_path / "a" / "eight.tif")
    assert Image.open(tmp_path / "a" / "eight.tif").mode == "I"
    assert int(D._decode_image(str(tmp_path / "a" / "eight.tif"), 8, "L").max()) == 200
    (tmp_path / "a" / "eight.tif").unlink()
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "a" / "big.tif")
    with pytest.raises(DatasetError, match="big.tif") as e:
        load_dataset("imagefolder", root=tmp_path, val_size=0, num_workers=0)
    assert "beyond 0–65535" in str(e.value)
    (tmp_path / "a" / "big.tif").unlink()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "a" / "f.tif")
    with pytest.raises(DatasetError, match="cannot be decoded") as e:
        load_dataset("imagefolder", root=tmp_path, val_size=0, num_workers=0)
    assert "f.tif" in str(e.value) and "8- or 16-bit" in str(e.value)


def write_noise_tree(root: Path, n=10, size=10):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")


def test_imagefolder_grayscale_mixed_sizes(tmp_path):
    write_tree(tmp_path, sizes=((12, 12), (20, 16), (12, 12)))
    b = load_dataset("imagefolder", root=tmp_path, image_size=10, val_size=0.25,
                     num_workers=0)
    m = b.meta
    assert (m.in_channels, m.input_size, m.classes) == (1, 10, ("cat", "dog", "owl"))
    # 8 per class, 2 held out per class as test (no test/ folder), 25% of the rest as val
    assert (len(b.train) + len(b.val), len(b.test)) == (18, 6)
    assert len(b.val) == round(0.25 * 18)
    for split in (b.train, b.val, b.test):
        assert isinstance(split, TensorSplit)
        x, y = all_batches(split, 4, shuffle=True, seed=1)
        assert x.shape[1:] == (1, 10, 10)
        pix = unnormalise(x, m)
        assert torch.equal(pix, (30 + 60 * y).view(-1, 1, 1, 1).expand_as(pix))
    again = load_dataset("imagefolder", root=tmp_path, image_size=10, val_size=0.25, seed=5,
                         num_workers=0)
    assert torch.equal(again.test.indices, b.test.indices)  # hold-out independent of seed


def test_imagefolder_rgb_with_train_test_folders(tmp_path):
    write_tree(tmp_path / "train", mode="RGB", sizes=((16, 16), (16, 16), (24, 24)))
    write_tree(tmp_path / "test", classes=("cat", "owl"), n=3, mode="RGB")
    b = load_dataset("imagefolder", root=tmp_path, val_size=3, num_workers=0)
    assert (b.meta.in_channels, b.meta.input_size) == (3, 16)   # the most common size
    assert (len(b.train), len(b.val), len(b.test)) == (21, 3, 6)
    x, y = all_batches(b.test, 6)
    assert sorted(y.tolist()) == [0, 0, 0, 2, 2, 2]
    pix = unnormalise(x, b.meta)
    v = 30 + 60 * y
    assert torch.equal(pix[:, 0, 0, 0], v) and torch.equal(pix[:, 1, 0, 0], 255 - v)
    x, _ = all_batches(b.train, 64)
    assert abs(x.mean().item()) < 1e-4 and torch.allclose(x.std((0, 2, 3)), torch.ones(3),
                                                          atol=0.05)


@pytest.mark.parametrize("train, test, val", [("Train", "Test", None), ("training", None, "Valid"),
                                              ("TRAIN", "testing", "validation")])
def test_imagefolder_split_folders_in_any_case(tmp_path, train, test, val):
    """Split folders are found whatever their case and under the usual names (Train/ and
    Test/ were once two classes); with no test folder, val/ is the test split."""
    write_tree(tmp_path / train, n=6)
    for name in (test, val):
        if name:
            write_tree(tmp_path / name, classes=("cat", "dog"), n=2)
    b = load_dataset("imagefolder", root=tmp_path, val_size=0.2, num_workers=0)
    assert b.meta.classes == ("cat", "dog", "owl") and len(b.test) == 4
    assert len(b.val) == (4 if test and val else round(0.2 * 18))


def test_imagefolder_refuses_what_would_train_badly(tmp_path):
    """Two val folders; the same image in train/ and test/ (through a symlink); a class
    left without training images by tiny classes."""
    write_tree(tmp_path / "a" / "train", n=4)
    for name in ("val", "Valid"):
        write_tree(tmp_path / "a" / name, classes=("cat",), n=1)
    with pytest.raises(DatasetError, match="several val folders: Valid, val; keep one"):
        load_dataset("imagefolder", root=tmp_path / "a", num_workers=0)
    write_tree(tmp_path / "b" / "train", n=4)
    (tmp_path / "b" / "test" / "cat").mkdir(parents=True)
    (tmp_path / "b" / "test" / "cat" / "x.png").symlink_to(tmp_path / "b" / "train" / "cat"
                                                           / "000.png")
    with pytest.raises(DatasetError, match="1 image.s. are in both the train and the test"):
        load_dataset("imagefolder", root=tmp_path / "b", num_workers=0)
    write_tree(tmp_path / "c", n=2)  # one test image a class, the other held out or trained
    with pytest.raises(DatasetError, match=r"keep no image for training .*: add images"):
        load_dataset("imagefolder", root=tmp_path / "c", val_size=0.5, num_workers=0)


def test_imagefolder_symlinks(tmp_path):
    root = tmp_path / "root"
    write_tree(root, n=4)
    outside = tmp_path / "outside.png"
    Image.new("L", (12, 12), 7).save(outside)
    (root / "cat" / "inside-link.png").symlink_to(root / "cat" / "000.png")
    b = load_dataset("imagefolder", root=root, val_size=0, num_workers=0)
    assert len(b.train) + len(b.test) == 12   # a link inside the root is fine (counted once)
    # a link that puts an image in a second class would give it two labels
    (root / "cat" / "dog-link.png").symlink_to(root / "dog" / "001.png")
    with pytest.raises(DatasetError, match="is reached from class cat and from class dog"):
        load_dataset("imagefolder", root=root, num_workers=0)
    os.unlink(root / "cat" / "dog-link.png")
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)  # cat/loop/dog/… too
    with pytest.raises(DatasetError, match="from class cat and from class dog"):
        load_dataset("imagefolder", root=root, num_workers=0)
    os.unlink(root / "cat" / "loop")
    (root / "dog" / "sneaky.png").symlink_to(outside)
    with pytest.raises(DatasetError, match="outside its root") as e:
        load_dataset("imagefolder", root=root, num_workers=0)
    assert "sneaky.png" in str(e.value)
    os.unlink(root / "dog" / "sneaky.png")
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DatasetError, match="outside its root"):
        load_dataset("imagefolder", root=root, num_workers=0)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_imagefolder_undecodable_file(tmp_path, kind):
    write_tree(tmp_path, n=4)
    bad = tmp_path / "dog" / "broken.png"
    if kind == "garbage":
        bad.write_bytes(b"definitely not a PNG")
    else:  # a valid header, so only a full decode finds it
        good = (tmp_path / "dog" / "000.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
        assert good.exists()
    with pytest.raises(DatasetError, match="cannot be decoded") as e:
        load_dataset("imagefolder", root=tmp_path, val_size=0, num_workers=0)
    assert "broken.png" in str(e.value)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(DatasetError, match="needs a root"):
        load_dataset("imagefolder")
    write_tree(tmp_path / "one", classes=("only",), n=3)
    with pytest.raises(DatasetError, match="at least two classes"):
        load_dataset("imagefolder", root=tmp_path / "one", num_workers=0)
    # split folders beside class folders, or unknown folders beside split folders: refused,
    # where a class named "test" once took every test image, or tests/ was skipped unsaid
    write_tree(tmp_path / "no-train", n=3)
    write_tree(tmp_path / "no-train" / "test", n=1)
    with pytest.raises(DatasetError, match="test/ holds the class folders that lie beside it, "
                                           "but there is no train/"):
        load_dataset("imagefolder", root=tmp_path / "no-train", num_workers=0)
    write_tree(tmp_path / "extra" / "train", n=3)
    write_tree(tmp_path / "extra" / "test", n=1)
    (tmp_path / "extra" / "__MACOSX" / "train").mkdir(parents=True)  # a Mac's zip: skipped
    write_tree(tmp_path / "extra" / "tests", n=1)
    with pytest.raises(DatasetError, match=r"other folders \(tests\); the splits are train/"):
        load_dataset("imagefolder", root=tmp_path / "extra", num_workers=0)
    shutil.rmtree(tmp_path / "extra" / "tests")
    assert len(load_dataset("imagefolder", root=tmp_path / "extra", num_workers=0).test) == 3
    # class folders named like a split (CIFAR-100 has "train"), images in sub-folders or not
    write_tree(tmp_path / "cifar", classes=("cat", "dog", "owl"), n=3)
    (tmp_path / "cifar" / "owl").rename(tmp_path / "cifar" / "train")
    (tmp_path / "cifar" / "dog").rename(tmp_path / "val")
    (tmp_path / "cifar" / "val").mkdir()
    (tmp_path / "val").rename(tmp_path / "cifar" / "val" / "sub")
    b = load_dataset("imagefolder", root=tmp_path / "cifar", val_size=0, num_workers=0)
    assert b.meta.classes == ("cat", "train", "val")


def test_stream_split_equals_tensor_split(tmp_path):
    write_noise_tree(tmp_path, n=10, size=10)
    mem = load_dataset("imagefolder", root=tmp_path, val_size=2, image_size=8, num_workers=0)
    stream = load_dataset("imagefolder", root=tmp_path, val_size=2, image_size=8,
                          in_memory_limit_mb=0, num_workers=2)
    assert isinstance(mem.train, TensorSplit) and isinstance(stream.train, StreamSplit)
    assert stream.meta == mem.meta and stream.train.num_workers == 2
    for name in ("train", "val", "test"):
        a, b = getattr(mem, name), getattr(stream, name)
        assert torch.equal(a.indices, b.indices)
        for kw in ({}, {"shuffle": True, "augment": True, "seed": 11}):
            xa, ya = all_batches(a, 3, **kw)
            xb, yb = all_batches(b, 3, **kw)
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # a file that breaks after loading is reported by name while streaming
    victim = stream.test.files[0]
    Path(victim).write_bytes(b"gone bad")
    with pytest.raises(DatasetError, match="cannot be decoded") as e:
        list(stream.test.batches(4))
    assert victim in str(e.value) and "Traceback" not in str(e.value)
    assert "Restore intact copies of them to continue the run" in str(e.value)


def test_stream_fingerprint_sees_edits_not_moves(tmp_path, monkeypatch):
    """A streamed tree is hashed by file paths and sizes, not pixels: an image rewritten in
    place changes the fingerprint, the same tree in another folder does not; nor do the mean
    and std, taken from a sample of its files (it was chosen by their absolute paths)."""
    import pruning.data

    monkeypatch.setattr(pruning.data, "_STATS_SAMPLE", 3)
    write_noise_tree(tmp_path / "a", n=6, size=10)

    def load(root):
        return load_dataset("imagefolder", root=root, val_size=2, image_size=8,
                            in_memory_limit_mb=0, num_workers=0)

    def fingerprint(root):
        return load(root).fingerprint()

    before = fingerprint(tmp_path / "a")
    assert before["images"] == {"train": 8, "val": 2, "test": 2}
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert fingerprint(tmp_path / "b") == before
    for name in ("b", "c", "d"):
        shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / name)
    assert len({load(tmp_path / "elsewhere" / name).meta for name in ("b", "c", "d")}
               | {load(tmp_path / "a").meta}) == 1
    edited = tmp_path / "b" / "a" / "3.png"
    Image.open(edited).convert("L").save(edited)  # same name, other pixels, other size
    after = fingerprint(tmp_path / "b")
    assert after["images"] == before["images"] and after["sha256"] != before["sha256"]


def test_imagefolder_grey_palette_images_keep_a_grey_dataset_grey(tmp_path):
    write_tree(tmp_path, classes=("cat", "dog"), n=4)
    Image.open(tmp_path / "cat" / "000.png").convert("P").save(tmp_path / "cat" / "p.gif")
    b = load_dataset("imagefolder", root=tmp_path, val_size=0, num_workers=0)
    assert b.meta.in_channels == 1
    x = torch.cat([b.train.images, b.test.images])
    assert set(x.flatten().tolist()) == {30, 90}  # the palette's grey, decoded as it is
    Image.new("RGB", (12, 12), (200, 10, 10)).convert("P").save(tmp_path / "dog" / "red.gif")
    assert load_dataset("imagefolder", root=tmp_path, val_size=0,
                        num_workers=0).meta.in_channels == 3  # a colour palette is colour


def test_imagefolder_names_that_are_not_utf8(tmp_path):
    """A file or class folder whose name is not UTF-8 (Latin-1 from an old archive): the test
    split's hash once failed on it; its class is named with U+FFFD, so config.json stays
    strict JSON."""
    write_tree(tmp_path, classes=("cat", "dog"), n=6)
    cat = os.fsencode(tmp_path / "cat")
    os.rename(cat + b"/000.png", cat + b"/caf\xe9.png")
    os.rename(os.fsencode(tmp_path / "dog"), os.fsencode(tmp_path) + b"/d\xf6g")
    b = load_dataset("imagefolder", root=tmp_path, val_size=0, num_workers=0)
    assert b.meta.classes == ("cat", "d\ufffdg")
    assert len(b.train) + len(b.test) == 12
    json.dumps(b.meta.to_dict(), ensure_ascii=False).encode("utf-8")  # no lone surrogate


# ---- synthetic, TensorSplit helpers


def test_synthetic_deterministic_and_sized():
    a, b = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3)
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).images, getattr(b, s).images)
        assert torch.equal(getattr(a, s).labels, getattr(b, s).labels)
    assert (len(a.train) + len(a.val), len(a.test)) == (512, 256)
    assert (a.meta.input_size, a.meta.in_channels, a.meta.num_classes) == (16, 1, 10)
    c = load_dataset("synthetic", seed=4, image_size=12, train_limit=100, test_limit=40,
                     num_classes=4)
    assert c.train.images.shape[1:] == (1, 12, 12) and len(c.test) == 40
    assert c.meta.num_classes == 4 and int(c.train.labels.max()) == 3
    assert not torch.equal(load_dataset("synthetic", seed=4).test.images, a.test.images)
    with pytest.raises(DatasetError, match="synthetic"):
        load_dataset("imagefolder", num_classes=3)


def test_synthetic_is_learnable():
    torch.manual_seed(0)
    b = load_dataset("synthetic", seed=0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for epoch in range(15):  # 105 steps
        for x, y in b.train.batches(64, shuffle=True, augment=True, seed=epoch, drop_last=True):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        x, y = all_batches(b.test, 256)
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.5  # chance is 0.1


def test_tensor_split_subset_to_and_meta_roundtrip():
    b = load_dataset("synthetic", train_limit=50, test_limit=20)
    sub = b.test.subset([3, 1, 4])
    assert torch.equal(sub.images, b.test.images[[3, 1, 4]])
    assert sub.indices.tolist() == [3, 1, 4]
    assert b.test.to("cpu") is b.test
    assert DatasetMeta.from_dict(b.meta.to_dict()) == b.meta
    with pytest.raises(DatasetError):
        TensorSplit(b.test.images.float(), b.test.labels, b.meta)
    with pytest.raises(ValueError, match="batch_size"):
        b.test.batches(0)
    assert list(b.val.subset([]).batches(8)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    b = load_dataset("synthetic", seed=1)
    gpu = load_dataset("synthetic", seed=1, device="cuda")
    assert gpu.train.device.type == "cuda"
    xc, yc = all_batches(b.train, 64, shuffle=True, augment=True, seed=2)
    xg, yg = all_batches(gpu.train, 64, shuffle=True, augment=True, seed=2)
    assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
    assert torch.allclose(xc, xg.cpu(), atol=1e-6)
    xm, _ = all_batches(b.train, 64, shuffle=True, augment=True, seed=2, device="cuda")
    assert torch.allclose(xm.cpu(), xc, atol=1e-6)
