"""Datasets: Fashion-MNIST, class-per-folder image trees, and a synthetic set for tests.

Every dataset comes back as a :class:`DataBundle` of three :class:`Split` objects:

* ``train`` — the *sub-train* part of the training data, used to train the PruningNet and the
  final network;
* ``val`` — a held-out part of the training data, used to score candidates during the
  evolutionary search (MetaPruning, Liu et al. 2019, §4: the search never sees the test set);
* ``test`` — the separate test split, used only for the final report.

A split yields ``(images, labels)`` batches: images ``float32`` NCHW normalised per channel,
``x̂ = (x / 255 − mean_c) / std_c``, labels ``int64``. Small datasets live on the device as a
``uint8`` tensor (:class:`TensorSplit`) and are cropped, flipped and normalised there, one
batched gather per batch and no per-image Python (DESIGN §6). Large image folders stream
through a ``DataLoader`` with worker processes (:class:`StreamSplit`) and get the same
augmentation on the device after the transfer.

Randomness is explicit: an epoch's permutation and its augmentation parameters are drawn on the
CPU from one ``torch.Generator`` seeded with ``seed``, so a seed gives the same batches on CPU
and CUDA, and a ``TensorSplit`` and a ``StreamSplit`` over the same images give the same
batches.

Security (DESIGN §5): an image tree may not reach outside its root through symlinks; files
that fail to decode are reported by name instead of crashing in PIL; nothing is unpickled.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import gzip
import hashlib
import json
import math
import numbers
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pruning.archs import INPUT_SIZE_RANGE
from pruning.spec import DATASET_SHAPES, DATASETS, list_datasets

__all__ = [
    "DataBundle", "DatasetError", "DatasetMeta", "Split", "StreamSplit", "TensorSplit",
    "list_datasets", "load_dataset",
]

FASHION_MNIST_ENV = "METAPRUNE_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# Over all 60 000 training images (pixels / 255); the usual published constants.
FASHION_MNIST_MEAN = (0.2860406,)
FASHION_MNIST_STD = (0.3530242,)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
IMAGEFOLDER_TEST_FRACTION = 0.2
"""Share of each class held out as the test split when an image tree has no test/ or val/."""
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_HEADER_SCAN_LIMIT = 20_000     # files whose headers are read to find size and channels
_STATS_SAMPLE = 2_048           # images decoded to estimate mean/std of a streamed dataset
_MAX_IMAGE_SIZE = 4_096
_TEST_SUBSET_SEED = 0           # test_limit subsets do not move with the search seed


class DatasetError(ValueError):
    """A data problem the user can fix: missing files, bad formats, bad split settings."""


# --------------------------------------------------------------------------------------------
# metadata


@dataclass(frozen=True)
class DatasetMeta:
    """What a model needs to know about its data; serialisable with :meth:`to_dict`.

    ``hflip``: horizontal flips preserve labels (true for photos and clothes, false for digits or
    the synthetic templates), so ``augment=True`` uses them. ``crop_padding``: augmentation takes
    a random ``input_size`` crop of the image zero-padded by this many pixels on each side.
    """

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    hflip: bool = True
    crop_padding: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if self.num_classes < 1 or len(self.classes) != self.num_classes:
            raise DatasetError(f"{self.name}: {len(self.classes)} class names for "
                               f"{self.num_classes} classes")
        if self.in_channels < 1 or not (len(self.mean) == len(self.std) == self.in_channels):
            raise DatasetError(f"{self.name}: mean/std need one value per channel "
                               f"({self.in_channels})")
        if not all(s > 0 and math.isfinite(s) for s in self.std):
            raise DatasetError(f"{self.name}: std must be positive, got {self.std}")
        if self.input_size < 1 or self.crop_padding < 0:
            raise DatasetError(f"{self.name}: bad input_size/crop_padding")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"mean": list(self.mean), "std": list(self.std),
                                           "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetMeta:
        return cls(**d)


# --------------------------------------------------------------------------------------------
# splits


@dataclass
class _EpochPlan:
    order: torch.Tensor | None      # CPU int64 permutation of positions, None = natural order
    offsets: torch.Tensor | None    # (n, 2) int64 crop offsets in [0, 2·pad], on the target
    flips: torch.Tensor | None      # (n,) bool, on the target


def _epoch_plan(n: int, meta: DatasetMeta, shuffle: bool, augment: bool, seed: int | None,
                target: torch.device) -> _EpochPlan:
    """Draw the whole epoch's randomness at once: permutation, then crop offsets, then flips."""
    if not (shuffle or augment):
        return _EpochPlan(None, None, None)
    if seed is None:  # follows torch.manual_seed, like any torch RNG use
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g) if shuffle else None
    offsets = flips = None
    if augment:
        pad = meta.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g).to(target)
        if meta.hflip:
            flips = (torch.rand(n, generator=g) < 0.5).to(target)
    return _EpochPlan(order, offsets, flips)


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None,
              pad: int) -> torch.Tensor:
    """Batched random crop (of the image zero-padded by ``pad``) and horizontal flip.

    ``x`` is (B, C, H, W); image b becomes ``padded[b, :, oy:oy+H, ox:ox+W]`` with
    ``(oy, ox) = offsets[b]``, mirrored left-right where ``flips[b]``. One gather for the whole
    batch, on ``x``'s device; works on any dtype (uint8 here, before normalisation, so padding
    is black like torchvision's ``RandomCrop(padding=…)``).
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    hp, wp = h + 2 * pad, w + 2 * pad
    dev = x.device
    rows = offsets[:, :1] + torch.arange(h, device=dev)         # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=dev)         # (B, W)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, idx).reshape(b, c, h, w)


class _Normalise:
    """uint8 → float32 ``(x/255 − mean)/std`` as one multiply-add per pixel."""

    def __init__(self, meta: DatasetMeta, device: torch.device):
        std = torch.tensor(meta.std, dtype=torch.float64)
        mean = torch.tensor(meta.mean, dtype=torch.float64)
        shape = (1, meta.in_channels, 1, 1)
        self.scale = (1.0 / (255.0 * std)).float().view(shape).to(device)
        self.shift = (-mean / std).float().view(shape).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mul_(self.scale).add_(self.shift)


class Split(abc.ABC):
    """One part of a dataset (train, val or test).

    ``labels`` (int64, CPU or the split's device) and ``indices`` (int64, CPU: each sample's
    position in its source — the idx file, the sorted file list) are public, so callers can
    count classes and check that splits are disjoint.
    """

    meta: DatasetMeta
    labels: torch.Tensor
    indices: torch.Tensor

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where batches go by default: where the data lives (or is streamed to)."""

    @abc.abstractmethod
    def _raw_batches(self, order: torch.Tensor | None, bounds: list[tuple[int, int]],
                     target: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B, C, H, W) images and int64 labels on ``target``, one per ``bounds`` range of
        epoch positions (position p is sample ``order[p]``, or p without an order)."""

    def fingerprint(self) -> str:
        """sha256 of the split's sample positions and labels (device-independent)."""
        h = hashlib.sha256(self.indices.cpu().numpy().tobytes())
        h.update(self.labels.cpu().numpy().tobytes())
        return h.hexdigest()

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                seed: int | None = None, drop_last: bool = False,
                device: torch.device | str | None = None,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(images, labels)`` batches on ``device`` (default: :attr:`device`).

        ``shuffle`` permutes with a ``torch.Generator`` seeded by ``seed`` (``None``: a seed
        drawn from torch's global RNG). ``augment`` crops randomly with ``meta.crop_padding``
        pixels of padding and flips horizontally when ``meta.hflip``, on the device.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        target = self.device if device is None else torch.device(device)
        n = len(self)
        stop = (n // batch_size) * batch_size if drop_last else n
        bounds = [(a, min(a + batch_size, n)) for a in range(0, stop, batch_size)]
        plan = _epoch_plan(n, self.meta, shuffle, augment, seed, target)
        return self._epoch(plan, bounds, target)

    def _epoch(self, plan: _EpochPlan, bounds: list[tuple[int, int]], target: torch.device,
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not bounds:
            return
        norm = _Normalise(self.meta, target)
        pad = self.meta.crop_padding
        for (a, b), (x, y) in zip(bounds, self._raw_batches(plan.order, bounds, target)):
            if plan.offsets is not None:
                flips = plan.flips[a:b] if plan.flips is not None else None
                x = crop_flip(x, plan.offsets[a:b], flips, pad)
            yield norm(x), y


def _to_device(t: torch.Tensor, target: torch.device) -> torch.Tensor:
    if t.device == target:
        return t
    return t.to(target, non_blocking=target.type == "cuda")


class TensorSplit(Split):
    """Images held as one uint8 (N, C, H, W) tensor with int64 labels, on CPU or CUDA."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, meta: DatasetMeta, *,
                 indices: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(f"{meta.name}: images must be uint8 (N, C, H, W), got "
                               f"{images.dtype} {tuple(images.shape)}")
        n, c, h, w = images.shape
        if c != meta.in_channels or h != meta.input_size or w != meta.input_size:
            raise DatasetError(f"{meta.name}: images {tuple(images.shape)} do not match "
                               f"{meta.in_channels}×{meta.input_size}×{meta.input_size}")
        labels = torch.as_tensor(labels).to(device=images.device, dtype=torch.int64)
        if labels.shape != (n,):
            raise DatasetError(f"{meta.name}: {labels.numel()} labels for {n} images")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= meta.num_classes):
            raise DatasetError(f"{meta.name}: labels outside [0, {meta.num_classes})")
        self.images = images.contiguous()
        self.labels = labels
        self.meta = meta
        self.indices = (torch.arange(n) if indices is None
                        else torch.as_tensor(indices, dtype=torch.int64).cpu())
        if self.indices.shape != (n,):
            raise DatasetError(f"{meta.name}: {self.indices.numel()} indices for {n} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """:meth:`Split.fingerprint` with the pixels (decoded and resized on the CPU, so the same
        on every device)."""
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(memoryview(self.images.cpu().contiguous().numpy()).cast("B"))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"TensorSplit({self.meta.name}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, device={self.device})")

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> TensorSplit:
        """A copy on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return TensorSplit(self.images.to(device), self.labels.to(device), self.meta,
                           indices=self.indices)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TensorSplit:
        """The samples at these positions of this split (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"subset index out of range for a split of {len(self)}")
        idx = idx % max(len(self), 1)
        dev_idx = idx.to(self.device)
        return TensorSplit(self.images.index_select(0, dev_idx),
                           self.labels.index_select(0, dev_idx), self.meta,
                           indices=self.indices[idx])

    def _raw_batches(self, order, bounds, target):
        images, labels = self.images, self.labels
        if order is not None:
            order = order.to(images.device)
        for a, b in bounds:
            if order is None:
                x, y = images[a:b], labels[a:b]
            else:
                idx = order[a:b]
                x, y = images.index_select(0, idx), labels.index_select(0, idx)
            yield _to_device(x, target), _to_device(y, target)


# ---- streamed image files


def _decode_image(path: str, size: int, mode: str) -> torch.Tensor:
    """Decode one file to a uint8 (C, size, size) tensor: convert, then resize the shorter side
    and centre-crop to a square (aspect kept), only when the image is not already that size."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if im.mode == "I" or im.mode.startswith("I;16"):
            # 16-bit grey: PIL's convert clips it to 255; scale 0…65535 to 0…255 instead. Mode
            # I (32-bit) is 16-bit in a PGM, and taken as 8-bit where its pixels are
            grey = np.asarray(im, dtype=np.float64)
            if grey.size and (grey.min() < 0 or grey.max() > 65535):
                raise ValueError("32-bit integer pixels beyond 0–65535 have no known range; "
                                 "save the images with 8- or 16-bit pixels")
            sixteen_bit = im.mode != "I" or im.format == "PPM" or grey.max(initial=0) > 255
            im = Image.fromarray(np.round(grey / (257.0 if sixteen_bit else 1.0))
                                 .astype(np.uint8))
        if im.mode == "F":
            raise ValueError("32-bit floating-point pixels (mode F) have no known range; "
                             "save the images with 8- or 16-bit pixels")
        im = im.convert(mode)
        if im.size != (size, size):
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
        a = np.array(im, dtype=np.uint8)  # a writable copy, owned by the tensor
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


class _ImageFiles(torch.utils.data.Dataset):
    """Files → (uint8 CHW, label, ok). A file that fails to decode comes back as zeros with
    ``ok=False``: the main process then names it in a DatasetError (an exception raised in a
    worker would come back wrapped in the worker's traceback)."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], size: int, mode: str):
        self.files, self.labels = list(files), [int(v) for v in labels]
        self.size, self.mode = size, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return _decode_image(self.files[i], self.size, self.mode), self.labels[i], True
        except Exception:  # noqa: BLE001  (PIL raises many types; the main process explains)
            return (torch.zeros(len(self.mode), self.size, self.size, dtype=torch.uint8),
                    self.labels[i], False)


def _bad_files_error(bad: list[str], advice: str = "Replace them with intact copies, or remove "
                     "them (a run begun on them then refuses the changed data).",
                     ) -> DatasetError:
    """Name (up to five of) the files that fail to decode, each with the reason (decoded again
    here: a worker process's exception does not come back)."""
    shown = []
    for p in bad[:5]:
        try:
            _decode_image(p, 1, "L")
            why = "decode failed"
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
        shown.append(f"{p} ({why})")
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return DatasetError(f"{len(bad)} image file(s) cannot be decoded: {'; '.join(shown)}"
                        f"{more}. {advice}")


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # gone since the scan: loading it will say so
        return -1


class StreamSplit(Split):
    """Image files decoded on the fly by a ``DataLoader`` with ``num_workers`` processes
    (PIL), then moved to ``device`` where augmentation and normalisation run."""

    def __init__(self, files: Sequence[str | os.PathLike], labels: Sequence[int] | torch.Tensor,
                 meta: DatasetMeta, *, device: torch.device | str = "cpu", num_workers: int = 2,
                 indices: torch.Tensor | None = None):
        self.files = tuple(os.fspath(f) for f in files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if self.labels.shape != (len(self.files),):
            raise DatasetError(f"{meta.name}: {self.labels.numel()} labels for "
                               f"{len(self.files)} files")
        self.meta = meta
        self.mode = "L" if meta.in_channels == 1 else "RGB"
        if meta.in_channels not in (1, 3):
            raise DatasetError(f"{meta.name}: streamed images have 1 or 3 channels")
        self._device = torch.device(device)
        self.num_workers = int(num_workers)
        self.indices = (torch.arange(len(self.files)) if indices is None
                        else torch.as_tensor(indices, dtype=torch.int64).cpu())

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """:meth:`Split.fingerprint` with each file's path (below the files' common folder, so
        the tree may move) and size: a split too large to hold in memory is not read whole to
        be hashed, yet an image replaced or edited in place almost always changes size."""
        h = hashlib.sha256(super().fingerprint().encode())
        top = os.path.commonpath(self.files) if len(self.files) > 1 else ""
        names = (os.path.relpath(f, top) if top else os.path.basename(f) for f in self.files)
        h.update("\0".join(names).encode("utf-8", "surrogateescape"))
        h.update(np.array([_file_size(f) for f in self.files], dtype=np.int64).tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"StreamSplit({self.meta.name}, n={len(self)}, size={self.meta.input_size}, "
                f"device={self.device}, num_workers={self.num_workers})")

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> StreamSplit:
        return StreamSplit(self.files, self.labels, self.meta, device=device,
                           num_workers=self.num_workers, indices=self.indices)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> StreamSplit:
        idx = torch.as_tensor(indices, dtype=torch.int64) % max(len(self), 1)
        return StreamSplit([self.files[i] for i in idx.tolist()], self.labels[idx], self.meta,
                           device=self._device, num_workers=self.num_workers,
                           indices=self.indices[idx])

    def _raw_batches(self, order, bounds, target):
        ds = _ImageFiles(self.files, self.labels.tolist(), self.meta.input_size, self.mode)
        pos = order.tolist() if order is not None else None
        sampler = [pos[a:b] if pos is not None else list(range(a, b)) for a, b in bounds]
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, num_workers=self.num_workers,
            pin_memory=target.type == "cuda")
        it, bad = iter(loader), []
        for chunk, (x, y, ok) in zip(sampler, it):
            if not bool(ok.all()):
                bad = [self.files[chunk[i]] for i in torch.nonzero(~ok).flatten().tolist()]
                break
            yield _to_device(x, target), _to_device(y, target)
        del it, loader  # stop the workers before raising
        if bad:  # found mid-run: a run records its data (data.json), and continues only on it
            raise _bad_files_error(bad, "Restore intact copies of them to continue the run; "
                                        "with them removed or replaced, the data differs, and "
                                        "the run must start again in a new folder.")


@dataclass
class DataBundle:
    meta: DatasetMeta
    train: Split
    val: Split
    test: Split

    def fingerprint(self) -> dict:
        """What identifies the data a run trains on, is scored on and tested on, whatever the
        device: the classes, the image shape and each split's samples (positions in their
        source, labels, and the pixels of data held in memory or the file names of streamed
        data). ``{"sha256", "train_val_sha256", "images": {"train", "val", "test"}, "shape",
        "num_classes", "version"}``: ``train_val_sha256`` leaves the test split out (what a
        PruningNet and a search depend on); the version names what the hashes cover, and
        changes with it: 1 for data held in memory, 2 for streamed data (1 hashed its absolute
        file names, 2 their names below the split's folder and their sizes); ``shape``
        (channels, height, width) and ``num_classes`` compare across versions."""
        meta = {k: v for k, v in self.meta.to_dict().items() if k not in ("mean", "std")}
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        splits = {"train": self.train, "val": self.val, "test": self.test}
        for name, split in splits.items():
            h.update(split.fingerprint().encode())
            if name == "val":
                train_val = h.hexdigest()
        streamed = any(isinstance(s, StreamSplit) for s in splits.values())
        return {"sha256": h.hexdigest(), "train_val_sha256": train_val,
                "images": {k: len(v) for k, v in splits.items()},
                "shape": [self.meta.in_channels, self.meta.input_size, self.meta.input_size],
                "num_classes": self.meta.num_classes,
                "version": 2 if streamed else 1}


# --------------------------------------------------------------------------------------------
# shared helpers: limits, splits, statistics


def _stratified_order(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(len(labels))`` whose every prefix holds each class in
    proportion to its size (element of rank r in a class of n sorts at (r + ½)/n; ties are
    broken by a random permutation)."""
    n = labels.numel()
    perm = torch.randperm(n, generator=g)
    lab = labels[perm]
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    sorted_lab, pos = torch.sort(lab, stable=True)
    rank = torch.empty(n, dtype=torch.int64)
    rank[pos] = torch.arange(n) - starts[sorted_lab]
    key = (rank.double() + 0.5) / counts[lab].double()
    return perm[torch.sort(key, stable=True).indices]


def _check_limit(limit: int | None, what: str) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise DatasetError(f"{what} must be a positive integer or None, got {limit!r}")


def _limit(labels: torch.Tensor, limit: int | None, g: torch.Generator) -> torch.Tensor:
    """Sorted positions of a stratified subset of ``limit`` samples (all when no limit)."""
    n = labels.numel()
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.sort(_stratified_order(labels, g)[:limit]).values


def _val_count(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise DatasetError(f"val_size must be a count or a fraction, got {val_size!r}")
    if isinstance(val_size, numbers.Integral):
        k = int(val_size)
        if k < 0:
            raise DatasetError(f"val_size must be >= 0, got {k}")
    else:
        f = float(val_size)
        if not 0.0 <= f < 1.0:
            raise DatasetError(f"a fractional val_size must be in [0, 1), got {f}")
        k = max(1, round(f * n)) if f > 0 else 0
    if k >= n:
        raise DatasetError(f"val_size={val_size!r} leaves no training data "
                           f"({n} training samples): hold out fewer, e.g. the fraction "
                           f"val_size=0.2 (--set '{{\"val_size\": 0.2}}')")
    return k


def _split_train_val(labels: torch.Tensor, val_size: int | float, g: torch.Generator,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified random split of positions into (sub-train, val), each sorted."""
    k = _val_count(val_size, labels.numel())
    order = _stratified_order(labels, g)
    return torch.sort(order[k:]).values, torch.sort(order[:k]).values


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, in [0, 1] units.

    Sums are exact integers, so the result does not depend on the order of the images.
    """
    n, c, h, w = images.shape
    if n * h * w == 0:
        raise DatasetError("cannot compute mean/std of an empty training split")
    s = torch.zeros(c, dtype=torch.int64, device=images.device)
    ss = torch.zeros(c, dtype=torch.int64, device=images.device)
    for part in images.split(max(1, 4_000_000 // (c * h * w))):
        x = part.to(torch.int32)
        s += x.sum((0, 2, 3), dtype=torch.int64)
        ss += (x * x).sum((0, 2, 3), dtype=torch.int64)
    count = n * h * w
    mean = s.cpu().double() / count
    var = (ss.cpu().double() / count - mean.square()).clamp_min(0)
    std = var.sqrt().clamp_min(0.25)  # (0–255 units) a constant image still normalises finitely
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8,
                      device=images.device)
    for a in range(0, images.shape[0], 4096):
        x = F.interpolate(images[a:a + 4096].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)
        out[a:a + 4096] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _check_image_size(image_size: int | None) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) \
            or not 1 <= image_size <= _MAX_IMAGE_SIZE:
        raise DatasetError(f"image_size must be an integer in [1, {_MAX_IMAGE_SIZE}], "
                           f"got {image_size!r}")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def _fmnist_install_hint(where: str, missing: list[str]) -> str:
    files = ", ".join(f + ".gz" for f in FASHION_MNIST_FILES)
    return (f"Fashion-MNIST not found in {where} (missing: {', '.join(missing)}). Install it "
            f"with `apt-get install dataset-fashion-mnist` (it goes to "
            f"{FASHION_MNIST_DEFAULT_DIR}), or pass --data-root / set {FASHION_MNIST_ENV} to a "
            f"folder containing the four files {files}.")


def _fmnist_repair_hint(path: str) -> str:
    """How to get an intact copy of a corrupt Fashion-MNIST file."""
    if Path(path).resolve().is_relative_to(Path(FASHION_MNIST_DEFAULT_DIR).resolve()):
        return "reinstall Fashion-MNIST (`apt-get install --reinstall dataset-fashion-mnist`)"
    return "replace it with an intact copy"


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    return None


def _fmnist_files(root: str | os.PathLike | None) -> dict[str, Path]:
    if root is not None:
        base, named_by = Path(root), ""
    elif os.environ.get(FASHION_MNIST_ENV):
        base, named_by = Path(os.environ[FASHION_MNIST_ENV]), f" (${FASHION_MNIST_ENV})"
    else:
        base, named_by = Path(FASHION_MNIST_DEFAULT_DIR), ""
    closest: tuple[Path, list[str]] | None = None
    for folder in (base, base / "fashion-mnist"):
        found = {stem: _find_idx(folder, stem) for stem in FASHION_MNIST_FILES}
        missing = [s + ".gz" for s, p in found.items() if p is None]
        if not missing:
            return found  # type: ignore[return-value]
        if closest is None or len(missing) < len(closest[1]):
            closest = (folder, missing)  # the folder that holds some of them, if one does
    raise DatasetError(_fmnist_install_hint(f"{closest[0]}{named_by}", closest[1]))


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: str, mtime_ns: int, size: int, ndim: int) -> torch.Tensor:
    del mtime_ns, size  # cache keys: a replaced file is read again
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read this idx file ({type(e).__name__}: {e}); the "
                           f"file is corrupt — {_fmnist_repair_hint(path)}") from None
    expected_magic = 0x0800 | ndim
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: too short for an idx header ({len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise DatasetError(f"{path}: bad idx magic number 0x{magic:08x}, expected "
                           f"0x{expected_magic:08x} (uint8, {ndim}-d)")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    if len(data) - header != math.prod(dims):
        raise DatasetError(f"{path}: idx header says {dims} = {math.prod(dims)} bytes, file "
                           f"holds {len(data) - header}: truncated or corrupt")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(arr.copy())


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An idx file (optionally gzipped) as a uint8 tensor; cached, never handed out as is."""
    st = path.stat()
    return _read_idx_cached(str(path), st.st_mtime_ns, st.st_size, ndim)


def _load_fmnist_part(files: dict[str, Path], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = _read_idx(files[f"{prefix}-images-idx3-ubyte"], 3)
    labels = _read_idx(files[f"{prefix}-labels-idx1-ubyte"], 1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"Fashion-MNIST {prefix}: {images.shape[0]} images but "
                           f"{labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"Fashion-MNIST {prefix}: images are {tuple(images.shape[1:])}, "
                           f"expected 28×28")
    if labels.numel() and int(labels.max()) >= 10:
        raise DatasetError(f"Fashion-MNIST {prefix}: label {int(labels.max())} outside 0..9")
    return images, labels.to(torch.int64)


def _load_fashion_mnist(root, device, val_size, train_limit, test_limit, seed, image_size):
    files = _fmnist_files(root)
    tr_images, tr_labels = _load_fmnist_part(files, "train")
    te_images, te_labels = _load_fmnist_part(files, "t10k")
    g = torch.Generator().manual_seed(seed)
    pool = _limit(tr_labels, train_limit, g)
    sub, val = _split_train_val(tr_labels[pool], val_size, g)
    train_idx, val_idx = pool[sub], pool[val]
    test_idx = _limit(te_labels, test_limit, torch.Generator().manual_seed(_TEST_SUBSET_SEED))

    size = image_size or DATASET_SHAPES["fashion-mnist"][2]
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    parts = {}
    for name, (imgs, labs, idx) in {"train": (tr_images, tr_labels, train_idx),
                                    "val": (tr_images, tr_labels, val_idx),
                                    "test": (te_images, te_labels, test_idx)}.items():
        x = imgs.index_select(0, idx).unsqueeze(1).to(device)
        parts[name] = (_resize_u8(x, size), labs[idx].to(device), idx)
    if size != 28:  # resampling moves the statistics a little; measure them again
        mean, std = _channel_stats(parts["train"][0])
    meta = DatasetMeta("fashion-mnist", 10, 1, size, mean, std, FASHION_MNIST_CLASSES,
                       hflip=True, crop_padding=max(2, round(size / 14)))
    splits = {k: TensorSplit(x, y, meta, indices=i) for k, (x, y, i) in parts.items()}
    return DataBundle(meta, splits["train"], splits["val"], splits["test"])


# --------------------------------------------------------------------------------------------
# synthetic


def _load_synthetic(device, val_size, train_limit, test_limit, seed, image_size, num_classes,
                    noise: float = 0.35):
    """Class-conditional oriented gratings in noise.

    Class c is a sinusoidal grating with its own orientation and spatial frequency
    (``ceil(K/2)`` orientations × 2 frequencies, ± a small seeded jitter); every image shows it
    with a random phase, a random contrast and Gaussian pixel noise. The class is a local
    texture, not a position, so the small global-pooling CNNs of the registry learn it well
    above chance within a few hundred steps — but not instantly, so narrow and wide candidates
    still score differently.
    """
    size = image_size or DATASET_SHAPES["synthetic"][2]
    k = 10 if num_classes is None else num_classes
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 2 <= k <= 1000:
        raise DatasetError(f"num_classes must be an integer in [2, 1000], got {k!r}")
    g = torch.Generator().manual_seed(seed)
    n_orient = -(-k // 2)
    c = torch.arange(k)
    theta = math.pi * (c % n_orient).double() / n_orient
    theta = theta + (torch.rand(k, generator=g, dtype=torch.float64) - 0.5) * 0.2 / n_orient
    freq = torch.where(c < n_orient, 0.125, 0.25).double()     # cycles per pixel
    freq = freq * (1 + 0.1 * (torch.rand(k, generator=g, dtype=torch.float64) - 0.5))
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                            torch.arange(size, dtype=torch.float64), indexing="ij")

    def sample(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
        contrast = 0.15 + 0.25 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
        th, f = theta[labels].view(n, 1, 1), freq[labels].view(n, 1, 1)
        proj = xx * torch.cos(th) + yy * torch.sin(th)
        x = 0.5 + contrast * torch.sin(2 * math.pi * f * proj + phase)
        x = x + noise * torch.randn(n, size, size, generator=g, dtype=torch.float64)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)
        return x, labels

    n_train = 512 if train_limit is None else train_limit
    n_test = 256 if test_limit is None else test_limit
    tr_x, tr_y = sample(n_train, torch.Generator().manual_seed(seed * 2 + 1))
    te_x, te_y = sample(n_test, torch.Generator().manual_seed(seed * 2 + 2))
    sub, val = _split_train_val(tr_y, val_size, g)
    mean, std = _channel_stats(tr_x[sub])
    # A left-right flip turns orientation θ into π − θ, another class: not label-preserving.
    meta = DatasetMeta("synthetic", k, 1, size, mean, std, tuple(f"class{i}" for i in range(k)),
                       hflip=False, crop_padding=2)
    return DataBundle(meta,
                      TensorSplit(tr_x[sub], tr_y[sub], meta, indices=sub).to(device),
                      TensorSplit(tr_x[val], tr_y[val], meta, indices=val).to(device),
                      TensorSplit(te_x, te_y, meta).to(device))


# --------------------------------------------------------------------------------------------
# image folders


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


class _Scan:
    """Walks a class-per-folder tree without leaving ``root`` (symlinks resolved and checked)."""

    def __init__(self, root: str):
        self.root = root
        self.escapes: list[str] = []
        self.broken: list[str] = []

    def resolve(self, path: str) -> str | None:
        """Real path of an entry, or None (recorded) when it leaves the root or dangles."""
        real = os.path.realpath(path)
        if not _inside(real, self.root):
            self.escapes.append(path)
            return None
        if not os.path.exists(real):
            self.broken.append(path)
            return None
        return real

    def subdirs(self, folder: str) -> list[tuple[str, str]]:
        """(name, real path) of the visible sub-folders, sorted by name (``__MACOSX``, the
        resource forks of a zip made on a Mac, is not one)."""
        out = []
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if e.name.startswith(".") or e.name == "__MACOSX":
                continue
            if e.is_symlink():
                real = self.resolve(e.path)
                if real is not None and os.path.isdir(real):
                    out.append((e.name, real))
            elif e.is_dir():
                out.append((e.name, e.path))
        return out

    def images(self, folder: str, seen: set[str] | None = None) -> list[str]:
        """Image files under ``folder`` (recursively, sorted), as real paths."""
        seen = set() if seen is None else seen
        if folder in seen:  # a symlink cycle inside the root
            return []
        seen.add(folder)
        out: list[str] = []
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if e.name.startswith("."):
                continue
            path = e.path
            if e.is_symlink():
                path = self.resolve(e.path)
                if path is None:
                    continue
            if os.path.isdir(path):
                out += self.images(path, seen)
            elif os.path.isfile(path) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                out.append(path)
        return out

    def check(self) -> None:
        if self.escapes:
            raise DatasetError(
                f"{len(self.escapes)} symlink(s) in the image tree point outside its root "
                f"{self.root}; refusing them: " + ", ".join(self.escapes[:5]))
        if self.broken:
            raise DatasetError(f"{len(self.broken)} broken symlink(s) in the image tree: "
                               + ", ".join(self.broken[:5]))


def _disjoint(a: list[str], b: list[str], what_a: str, what_b: str) -> None:
    """Split folders that share an image (through symlinks) would score on trained images."""
    shared = set(a) & set(b)
    if shared:
        raise DatasetError(f"{len(shared)} image(s) are in both the {what_a} and the {what_b} "
                           f"folders (through symlinks), e.g. {min(shared)}")


_SPLIT_NAMES = {"train": ("train", "training"), "test": ("test", "testing"),
                "val": ("val", "valid", "validation")}


def _split_folder(top: list[tuple[str, str]], split: str) -> str | None:
    """The real path of the top-level folder holding ``split`` (``Train/``, ``validation/`` …:
    any case, a few usual names), or None."""
    found = [(name, real) for name, real in top if name.lower() in _SPLIT_NAMES[split]]
    if len(found) > 1:
        raise DatasetError(f"several {split} folders: {', '.join(n for n, _ in found)}; "
                           f"keep one")
    return found[0][1] if found else None


def _layout(scan: _Scan, root: str, top: list[tuple[str, str]],
            ) -> tuple[str | None, str | None, str | None]:
    """The split folders (train, test, val) of a tree; ``(None, None, None)`` for a tree of
    class folders alone. Without a ``train/`` of class folders, a folder named like a split is
    a class (CIFAR-100 has a class "train"), unless it holds the class folders beside it (a
    split without its ``train/``: refused); an unknown folder beside split folders is refused
    rather than skipped unsaid."""
    splits = {split: _split_folder(top, split) for split in _SPLIT_NAMES}
    named = [name for name, _ in top
             if any(name.lower() in names for names in _SPLIT_NAMES.values())]
    others = [name for name, _ in top if name not in named]
    if splits["train"] is None or not scan.subdirs(splits["train"]):
        # class folders only (some perhaps named like a split), unless a test/ or val/ holds
        # the very classes beside it: a split whose train/ is missing
        misplaced = [name for name, real in top if name in named and (
            inner := {n for n, _ in scan.subdirs(real)}) and inner <= set(others)]
        if misplaced:
            raise DatasetError(f"{root}: {', '.join(f'{n}/' for n in misplaced)} holds the "
                               f"class folders that lie beside it, but there is no train/ "
                               f"folder; put the training classes in train/")
        return None, None, None
    if others:
        raise DatasetError(f"{root}: beside the split folders there are other folders "
                           f"({', '.join(others[:5])}); the splits are train/, test/ and val/ "
                           f"(also training/, testing/, valid/, validation/, in any case): "
                           f"rename or move the others (a name starting with a dot is skipped)")
    return splits["train"], splits["test"], splits["val"]


def _scan_classes(scan: _Scan, folder: str) -> tuple[list[str], list[list[str]]]:
    """Class names and each class's image files. An image that symlinks make reachable from
    two classes is an error (it would carry both labels); reached twice in one class, it counts
    once."""
    classes, files, owner = [], [], {}  # owner: image (real path) → its class
    for name, real in scan.subdirs(folder):
        mine: list[str] = []
        for key in scan.images(real):  # real paths: one key per file, however reached
            first = owner.get(key)
            if first is None:
                owner[key] = name
                mine.append(key)
            elif first != name:
                raise DatasetError(f"{folder}: image {key} is reached from class {first} and "
                                   f"from class {name} (through a symlink); an image needs one "
                                   f"class")
        classes.append(name)
        files.append(mine)
    return classes, files


def _read_headers(files: list[str]) -> list[tuple[tuple[int, int], str]]:
    """(size, mode) of each file from its header; undecodable files raise DatasetError."""
    from PIL import Image

    out, bad = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append((im.size, _palette_as_grey(im)))
        except Exception:  # noqa: BLE001
            bad.append(p)
    if bad:
        raise _bad_files_error(bad)
    return out


def _palette_as_grey(im) -> str:
    """``im``'s mode, but ``L`` (``LA``) for a palette image whose colours are all grey: a grey
    GIF or palette PNG does not make a grey dataset a colour one."""
    if im.mode in ("P", "PA"):
        palette = im.getpalette() or []
        if all(palette[i] == palette[i + 1] == palette[i + 2]
               for i in range(0, len(palette) - 2, 3)):
            return "L" if im.mode == "P" else "LA"
    return im.mode


def _path_rank(path: str, root: str) -> bytes:
    """A stable pseudo-random rank of ``path``: the sha1 of its name below ``root`` (so the same
    tree ranks alike wherever it lies; a name that is not UTF-8 as the bytes it has)."""
    return hashlib.sha1(os.fsencode(os.path.relpath(path, root))).digest()


def _stable_sample(files: list[str], k: int, root: str) -> list[str]:
    if len(files) <= k:
        return files
    return sorted(files, key=lambda p: _path_rank(p, root))[:k]


def _shown(name: str) -> str:
    """A file name as text: a byte that is not UTF-8 (kept by the OS's surrogate escapes,
    which JSON cannot carry) as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_all(files: list[str], size: int, mode: str, num_workers: int) -> torch.Tensor:
    """All files as one uint8 (N, C, size, size) tensor, decoded by ``num_workers`` processes;
    every undecodable file is counted in one DatasetError."""
    ds = _ImageFiles(files, [0] * len(files), size, mode)
    out = torch.empty(len(files), len(mode), size, size, dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=num_workers)
    bad, a = [], 0
    for x, _, ok in loader:
        out[a:a + x.shape[0]] = x
        bad += [files[a + i] for i in torch.nonzero(~ok).flatten().tolist()]
        a += x.shape[0]
    if bad:
        raise _bad_files_error(bad)
    return out


def _load_imagefolder(root, device, val_size, train_limit, test_limit, seed, image_size,
                      in_memory_limit_mb, num_workers):
    if root is None:
        raise DatasetError("imagefolder needs a root (--data-root): a folder with one "
                           "sub-folder per class (optionally inside train/ and test/ or val/)")
    root_real = os.path.realpath(os.fspath(root))
    if not os.path.isdir(root_real):
        raise DatasetError(f"image folder {os.fspath(root)} does not exist or is not a folder")
    scan = _Scan(root_real)
    top = scan.subdirs(root_real)
    scan.check()
    train_dir, test_dir, val_dir = _layout(scan, root_real, top)
    if train_dir is not None:
        if test_dir is None:
            test_dir, val_dir = val_dir, None
        # with both, the explicit validation folder replaces val_size
    else:
        train_dir = root_real

    classes, per_class = _scan_classes(scan, train_dir)
    scan.check()
    if len(classes) < 2:
        raise DatasetError(f"{train_dir}: found {len(classes)} class folder(s); an image tree "
                           f"needs one sub-folder per class and at least two classes")
    empty = [c for c, fs in zip(classes, per_class) if not fs]
    if empty:
        raise DatasetError(f"{train_dir}: class folder(s) without images: {', '.join(empty)} "
                           f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")

    def labelled(folder: str, what: str) -> tuple[list[str], list[int]]:
        names, lists = _scan_classes(scan, folder)
        scan.check()
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DatasetError(f"{what} folder has classes missing from train/: "
                               f"{', '.join(unknown[:5])}")
        fs = [p for fl in lists for p in fl]
        ls = [classes.index(n) for n, fl in zip(names, lists) for _ in fl]
        if not fs:
            raise DatasetError(f"{what} folder {folder} holds no images")
        return fs, ls

    train_files = [p for fl in per_class for p in fl]
    train_labels = [c for c, fl in enumerate(per_class) for _ in fl]
    if test_dir is not None:
        test_files, test_labels = labelled(test_dir, "test")
        _disjoint(train_files, test_files, "train", "test")
    else:  # hold out a stable share per class: by hash of the path, independent of `seed`
        test_files, test_labels, keep_f, keep_l = [], [], [], []
        for c, fl in enumerate(per_class):
            ranked = sorted(fl, key=lambda p: _path_rank(p, root_real))
            k = max(1, round(IMAGEFOLDER_TEST_FRACTION * len(fl))) if len(fl) > 1 else 0
            held = set(ranked[:k])
            for p in fl:
                (test_files if p in held else keep_f).append(p)
                (test_labels if p in held else keep_l).append(c)
        train_files, train_labels = keep_f, keep_l

    g = torch.Generator().manual_seed(seed)
    tr_lab = torch.tensor(train_labels, dtype=torch.int64)
    pool = _limit(tr_lab, train_limit, g)
    if val_dir is not None:
        val_files, val_labels = labelled(val_dir, "val")
        _disjoint(train_files + test_files, val_files, "train or test", "val")
        sub_files = [train_files[i] for i in pool.tolist()]
        sub_labels = tr_lab[pool]
        sub_idx, val_idx = pool, torch.arange(len(val_files))
    else:
        sub, val = _split_train_val(tr_lab[pool], val_size, g)
        sub_idx, val_idx = pool[sub], pool[val]
        sub_files = [train_files[i] for i in sub_idx.tolist()]
        sub_labels = tr_lab[sub_idx]
        val_files = [train_files[i] for i in val_idx.tolist()]
        val_labels = tr_lab[val_idx].tolist()
    per_class_train = torch.bincount(torch.as_tensor(sub_labels), minlength=len(classes))
    untrained = [c for c, n in zip(classes, per_class_train.tolist()) if n == 0]
    if untrained:
        raise DatasetError(
            f"class(es) {', '.join(untrained[:5])} keep no image for training once the test and "
            f"held-out images are taken: add images to them, or lower val_size or raise "
            f"train_limit")
    te_lab = torch.tensor(test_labels, dtype=torch.int64)
    test_idx = _limit(te_lab, test_limit, torch.Generator().manual_seed(_TEST_SUBSET_SEED))
    test_files = [test_files[i] for i in test_idx.tolist()]

    # Size and channels from the headers (a stable sample of them for huge trees).
    all_files = sub_files + val_files + test_files
    headers = _read_headers(_stable_sample(all_files, _HEADER_SCAN_LIMIT, root_real))
    if image_size is not None:
        size = int(image_size)
    else:
        (w, h), _ = collections.Counter(s for s, _ in headers).most_common(1)[0]
        size = min(w, h)
        lo, hi = INPUT_SIZE_RANGE
        if not lo <= size <= hi:  # said before decoding a tree of photos
            raise DatasetError(
                f"the images are mostly {w}×{h} px: a network takes {lo} to {hi} px; give "
                f"image_size (--image-size), e.g. {min(max(size, lo), 224)}, to resize them")
    gray = all(m in _GRAY_MODES for _, m in headers)
    mode, channels = ("L", 1) if gray else ("RGB", 3)

    name = "imagefolder"
    placeholder = DatasetMeta(name, len(classes), channels, size, (0.5,) * channels,
                              (0.5,) * channels, tuple(map(_shown, classes)))
    nbytes = len(all_files) * channels * size * size
    if nbytes <= in_memory_limit_mb * 2**20:
        x = _decode_all(all_files, size, mode, num_workers)
        ns, nv = len(sub_files), len(val_files)
        xs, xv, xt = x[:ns], x[ns:ns + nv], x[ns + nv:]
        mean, std = _channel_stats(xs)
        meta = dataclasses.replace(placeholder, mean=mean, std=std,
                                   crop_padding=4 if size >= 32 else 2)
        return DataBundle(
            meta,
            TensorSplit(xs, sub_labels, meta, indices=sub_idx).to(device),
            TensorSplit(xv, torch.as_tensor(val_labels), meta, indices=val_idx).to(device),
            TensorSplit(xt, te_lab[test_idx], meta, indices=test_idx).to(device))

    sample = _stable_sample(sub_files, _STATS_SAMPLE, root_real)
    mean, std = _channel_stats(_decode_all(sample, size, mode, num_workers))
    meta = dataclasses.replace(placeholder, mean=mean, std=std,
                               crop_padding=4 if size >= 32 else 2)
    kw = dict(device=device, num_workers=num_workers)
    return DataBundle(meta,
                      StreamSplit(sub_files, sub_labels, meta, indices=sub_idx, **kw),
                      StreamSplit(val_files, val_labels, meta, indices=val_idx, **kw),
                      StreamSplit(test_files, te_lab[test_idx], meta, indices=test_idx, **kw))


# --------------------------------------------------------------------------------------------
# entry points


def load_dataset(name: str, *, root: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu", val_size: int | float = 0.1,
                 train_limit: int | None = None, test_limit: int | None = None, seed: int = 0,
                 image_size: int | None = None, in_memory_limit_mb: int = 2048,
                 num_workers: int = 2, num_classes: int | None = None) -> DataBundle:
    """Load a dataset as sub-train / held-out val / test splits.

    * ``root`` — where the data lives (Fashion-MNIST: the folder with the four idx files, or
      its parent; default ``$METAPRUNE_FASHION_MNIST_DIR`` or
      ``/usr/share/datasets/fashion-mnist``. imagefolder: the class-per-folder tree).
    * ``val_size`` — held-out share of the training data: a count or a fraction in [0, 1);
      stratified by class and fixed by ``seed``.
    * ``train_limit`` / ``test_limit`` — use a stratified subset of this many samples (for fast
      CPU runs). ``train_limit`` is applied before the val split and follows ``seed``;
      ``test_limit`` does not depend on ``seed``, so reports over seeds share one test set.
      For ``synthetic`` they are the numbers of samples generated (default 512 / 256).
    * ``image_size`` — resize to this square size (Fashion-MNIST: 28; synthetic: 16;
      imagefolder: the most common size). ``num_classes`` — synthetic only (default 10).
    * ``in_memory_limit_mb`` / ``num_workers`` — imagefolder: keep the decoded images as a
      :class:`TensorSplit` when they fit, else stream them with a :class:`StreamSplit`.
    """
    key = str(name).strip().lower()
    if key not in DATASETS:  # the names live with the spec (pruning.spec: no PyTorch)
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    _check_limit(train_limit, "train_limit")
    _check_limit(test_limit, "test_limit")
    _check_image_size(image_size)
    if num_classes is not None and key != "synthetic":
        raise DatasetError(f"num_classes is fixed by the data for {key!r}; it is an option of "
                           f"'synthetic' only")
    if key == "fashion-mnist":
        return _load_fashion_mnist(root, device, val_size, train_limit, test_limit, seed,
                                   image_size)
    if key == "synthetic":
        if root is not None:
            raise DatasetError(f"the synthetic dataset is generated and reads no folder; drop "
                               f"the data root ({root})")
        return _load_synthetic(device, val_size, train_limit, test_limit, seed, image_size,
                               num_classes)
    if not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise DatasetError(f"num_workers must be >= 0, got {num_workers!r}")
    if not isinstance(in_memory_limit_mb, numbers.Real) or in_memory_limit_mb < 0:
        raise DatasetError(f"in_memory_limit_mb must be >= 0, got {in_memory_limit_mb!r}")
    return _load_imagefolder(root, device, val_size, train_limit, test_limit, seed, image_size,
                             in_memory_limit_mb, int(num_workers))
