"""Data sets for ``colora-finetune``: MedMNIST ``.npz`` files, image folders, and the bundled digits.

Every loader returns a :class:`Splits` of three data sets yielding ``(uint8 image [C, H, W], int64 label)``.
Scaling, channel replication, resizing and normalisation happen on the device, per batch
(:func:`prepare_batch`), so a data set stays uint8 in memory and a batch crosses to the GPU as bytes.

Problems with the input raise :class:`DataError` with a one-line message, before any training starts.
"""
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

__all__ = [
    "DataError",
    "Splits",
    "ArrayDataset",
    "load_npz",
    "load_image_folder",
    "load_digits_task",
    "load_data",
    "stratified_split",
    "truncate_per_class",
    "subset",
    "EpochSampler",
    "make_loader",
    "training_set",
    "prepare_batch",
]

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data file or folder that cannot be used; the message is one line naming the problem."""


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list = field(default_factory=list)
    in_channels: int = 1
    description: str = ""

    def __post_init__(self):
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]


class ArrayDataset(Dataset):
    """Images held as one uint8 tensor, ``[N, C, H, W]`` or (``layout="NHWC"``, as MedMNIST stores them, no copy)
    ``[N, H, W, C]``, with int64 labels ``[N]``; items are always ``[C, H, W]``.

    Indexing with a list or tensor of indices returns a whole batch in one gather, which is what
    :func:`make_loader` does: no per-sample collation.
    """

    def __init__(self, images, labels, layout="NCHW"):
        self.images = torch.as_tensor(images, dtype=torch.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.layout = layout
        self._labels_t = torch.from_numpy(self.labels)
        if self.images.ndim != 4 or self.images.shape[0] != self.labels.shape[0] or layout not in ("NCHW", "NHWC"):
            raise DataError(f"images {tuple(self.images.shape)} ({layout}) and labels {self.labels.shape} do not match")

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, int):
            index = torch.as_tensor(index, dtype=torch.long)
        x = self.images[index]
        return (x.movedim(-1, -3) if self.layout == "NHWC" else x), self._labels_t[index]


class _FolderSubset(Dataset):
    def __init__(self, base, indices):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(base.targets, dtype=np.int64)[self.indices]

    def __len__(self):
        return self.indices.shape[0]

    def __getitem__(self, i):
        return self.base[int(self.indices[i])]


def subset(dataset, indices):
    """The samples ``indices`` of a data set from this module, keeping its ``labels`` attribute."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.images[torch.from_numpy(indices)], dataset.labels[indices], dataset.layout)
    if isinstance(dataset, _FolderSubset):
        return _FolderSubset(dataset.base, dataset.indices[indices])
    return _FolderSubset(dataset, indices)


def stratified_split(labels, fractions, seed):
    """Split sample indices class by class into ``len(fractions)`` parts, deterministically for ``seed``.

    Each class is shuffled with its own seeded generator and cut at the cumulative fractions (the last
    part takes the remainder), so every part sees every class in proportion. Returns sorted index arrays.
    """
    labels = np.asarray(labels)
    parts = [[] for _ in fractions]
    bounds = np.cumsum(fractions)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(idx.size)]
        cuts = [int(round(b * idx.size)) for b in bounds[:-1]]
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def truncate_per_class(labels, per_class=None):
    """Indices of the first ``per_class`` samples of every class (default: the smallest class's size).

    The paper's balancing (§4.3: "the first 7754 data points from each class").
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    n = int(counts.min()) if per_class is None else int(per_class)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in classes]))


def _npz_images(name, a):
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise DataError(f"{name} must be [N, H, W] or [N, H, W, C] with C in (1, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0 or a.max() > 255)):
            raise DataError(f"{name} must hold uint8 pixels (0..255), got dtype {a.dtype}")
        a = a.astype(np.uint8)
    return a


def _npz_labels(name, a):
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataError(f"{name} must be [N] or [N, 1] class indices (multi-label is not supported), got shape "
                        f"{a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.mod(a, 1) == 0):
            raise DataError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    return a.astype(np.int64)


def load_npz(path, class_names=None):
    """A MedMNIST-layout ``.npz``: ``{train,val,test}_images`` (uint8 ``[N,H,W]`` or ``[N,H,W,C]``) and
    ``{train,val,test}_labels`` (``[N, 1]`` or ``[N]``). The classes are ``0 .. max(train label)``."""
    try:
        archive = np.load(path, allow_pickle=False)
        files = set(archive.files)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npz archive: {e}") from None
    with archive:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)} (expected MedMNIST keys "
                            f"{{train,val,test}}_{{images,labels}}; found {', '.join(sorted(files)) or 'nothing'})")
        try:
            arrays = {s: (_npz_images(f"{s}_images", archive[f"{s}_images"]),
                          _npz_labels(f"{s}_labels", archive[f"{s}_labels"])) for s in SPLITS}
        except ValueError as e:
            if isinstance(e, DataError):
                raise DataError(f"{path}: {e}") from None
            raise DataError(f"cannot read {path}: {e}") from None
    shape = arrays["train"][0].shape[1:]  # H, W, C
    for s, (x, y) in arrays.items():
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: {s}_images has {x.shape[0]} samples but {s}_labels has {y.shape[0]}")
        if x.shape[0] == 0:
            raise DataError(f"{path}: the {s} split is empty")
        if x.shape[1:] != shape:
            raise DataError(f"{path}: {s}_images are {x.shape[1:]} (H, W, C) but train_images are {shape}")
    num_classes = int(arrays["train"][1].max()) + 1
    for s, (_, y) in arrays.items():
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{path}: {s}_labels range over [{y.min()}, {y.max()}], outside the {num_classes} "
                            f"classes 0..{num_classes - 1} of train_labels")
    absent = sorted(set(range(num_classes)) - set(np.unique(arrays["train"][1]).tolist()))
    if absent:
        raise DataError(f"{path}: classes {absent} have no training samples")
    names = _class_names(class_names, num_classes, path)
    return Splits(
        *(ArrayDataset(*arrays[s], layout="NHWC") for s in SPLITS),
        num_classes=num_classes,
        class_names=names,
        in_channels=shape[2],
        description=(f"{os.path.basename(path)}: " + ", ".join(f"{s} {arrays[s][0].shape[0]}" for s in SPLITS)
                     + f"; {num_classes} classes; {shape[0]}x{shape[1]}x{shape[2]} (HxWxC)"),
    )


def _class_names(names, num_classes, source):
    if names is None:
        return [str(i) for i in range(num_classes)]
    names = list(names)
    if len(names) != num_classes:
        raise DataError(f"{len(names)} class names given but {source} has {num_classes} classes")
    return names


def _image_folder(root, image_size):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    try:
        return datasets.ImageFolder(root, transform=tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot use {root} as an image folder: {str(e).splitlines()[0]}") from None


def load_image_folder(root, image_size, val_fraction=0.1, test_fraction=0.1, seed=0, class_names=None):
    """An image directory in ``torchvision.datasets.ImageFolder`` layout, images resized to ``image_size``².

    Either ``root/{train,val,test}/<class>/*`` (``valid`` or ``validation`` also name the validation split;
    the three must list the same classes), or ``root/<class>/*`` split per class by :func:`stratified_split`
    with ``seed`` into ``1 - val - test``, ``val``, ``test`` fractions. Images are read as RGB.
    """
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory")
    entries = {e.lower(): e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))}
    if "train" in entries:
        val = next((entries[n] for n in ("val", "valid", "validation") if n in entries), None)
        if val is None or "test" not in entries:
            raise DataError(f"{root} has a train/ folder but no {'val/' if val is None else 'test/'} folder beside it")
        parts = [_image_folder(os.path.join(root, d), image_size) for d in (entries["train"], val, entries["test"])]
        for name, ds in zip(("validation", "test"), parts[1:]):
            if ds.classes != parts[0].classes:
                raise DataError(f"{root}: the {name} classes {ds.classes} differ from the train classes "
                                f"{parts[0].classes}")
        splits = [subset(ds, np.arange(len(ds))) for ds in parts]
    else:
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise DataError(f"split fractions val={val_fraction} test={test_fraction} must be in (0, 1) with a sum "
                            "below 1")
        full = _image_folder(root, image_size)
        parts = [full]
        fr = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        splits = [subset(full, idx) for idx in stratified_split(full.targets, fr, seed)]
        for s, ds in zip(SPLITS, splits):
            if len(ds) == 0:
                raise DataError(f"{root}: too few images for a {s} split of {fr[SPLITS.index(s)]:.2f}")
    classes = parts[0].classes
    return Splits(
        *splits,
        num_classes=len(classes),
        class_names=_class_names(class_names, len(classes), root) if class_names is not None else list(classes),
        in_channels=3,
        description=(f"{root}: " + ", ".join(f"{s} {len(d)}" for s, d in zip(SPLITS, splits))
                     + f"; {len(classes)} classes; resized to {image_size}x{image_size}"),
    )


def load_digits_task(digits, fractions=(0.6, 0.2, 0.2), seed=0):
    """scikit-learn's bundled 8×8 digits restricted to ``digits`` (relabelled ``0..len-1``), split per class.

    Pixels 0..16 are scaled to uint8 0..255. No download: the data ship with scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits demo needs scikit-learn: pip install 'colora_fused[finetune]'") from None

    d = load_digits()
    digits = list(digits)
    keep = np.isin(d.target, digits)
    images = np.round(d.images[keep] * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = np.searchsorted(np.array(sorted(digits)), d.target[keep])
    parts = stratified_split(labels, fractions, seed)
    return Splits(
        *(ArrayDataset(images[i], labels[i]) for i in parts),
        num_classes=len(digits),
        class_names=[str(c) for c in sorted(digits)],
        in_channels=1,
        description=(f"scikit-learn digits {sorted(digits)}: "
                     + ", ".join(f"{s} {len(i)}" for s, i in zip(SPLITS, parts)) + "; 8x8"),
    )


def load_data(path, image_size=224, val_fraction=0.1, test_fraction=0.1, seed=0, class_names=None):
    """Dispatch on ``path``: a directory → :func:`load_image_folder`, a file → :func:`load_npz`."""
    if os.path.isdir(path):
        return load_image_folder(path, image_size, val_fraction, test_fraction, seed, class_names)
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    return load_npz(path, class_names)


class EpochSampler(Sampler):
    """Per-epoch sample order, sharded over ``num_replicas`` ranks, reproducible from ``(seed, epoch)``.

    ``balance=True`` draws ``len(labels)`` samples with replacement, each with probability ∝ 1/(size of
    its class) — the WeightedRandomSampler scheme — so every class is seen equally often in expectation.
    Otherwise a permutation (``shuffle``) or the identity. The order is padded by wrapping around to a
    multiple of ``num_replicas`` so that every rank runs the same number of steps (as DistributedSampler).
    """

    def __init__(self, labels, shuffle=True, balance=False, num_replicas=1, rank=0, seed=0):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.shuffle, self.balance = shuffle, balance
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0
        self.num_samples = math.ceil(self.labels.size / num_replicas)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        n = self.labels.size
        total = self.num_samples * self.num_replicas
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.balance:
            counts = np.bincount(self.labels)
            weights = torch.from_numpy(1.0 / counts[self.labels])
            order = torch.multinomial(weights, total, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            order = order.repeat(math.ceil(total / n))[:total]
        return iter(order[self.rank :: self.num_replicas].tolist())


def make_loader(dataset, sampler, batch_size, workers=0, pin_memory=False):
    """A DataLoader over ``sampler``'s order; an :class:`ArrayDataset` is gathered a whole batch at a time."""
    if isinstance(dataset, ArrayDataset):
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                          num_workers=0, pin_memory=pin_memory)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)


def training_set(train, balance):
    """The training split as trained on: ``--balance truncate`` keeps the first n of every class (the paper)."""
    return subset(train, truncate_per_class(train.labels)) if balance == "truncate" else train


def prepare_batch(images, spec, image_size, device, channels_last):
    """uint8 ``[B, C, H, W]`` → normalised float on ``device``: channels matched, resized to ``image_size``²."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    if x.shape[1] != spec.in_channels:
        x = x.expand(-1, spec.in_channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > image_size)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
