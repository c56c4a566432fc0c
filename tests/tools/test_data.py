"""colora_fused.finetune.data: MedMNIST .npz and ImageFolder loading on generated files, splits, samplers."""
import numpy as np
import pytest
import torch

from colora_fused.finetune import data


def write_npz(path, n=(12, 6, 6), hw=(10, 10), channels=None, classes=4, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(data.SPLITS, n):
        shape = (count, *hw) + ((channels,) if channels else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).reshape(-1, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def test_npz_medmnist_layout(tmp_path):
    s = data.load_npz(write_npz(tmp_path / "oct.npz"), class_names=["CNV", "DME", "drusen", "normal"])
    assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 6)
    assert s.num_classes == 4 and s.in_channels == 1 and s.class_names[0] == "CNV"
    x, y = s.train[[0, 5]]
    assert x.dtype == torch.uint8 and x.shape == (2, 1, 10, 10) and y.tolist() == [0, 1]
    rgb = data.load_npz(write_npz(tmp_path / "rgb.npz", channels=3))
    assert rgb.in_channels == 3 and rgb.train[0][0].shape == (3, 10, 10)


@pytest.mark.parametrize("override, message", [
    (dict(val_labels=None), "lacks val_labels"),
    (dict(test_labels=np.array([[0], [1], [2], [3], [4], [0]])), r"outside the 4 classes"),
    (dict(train_labels=np.zeros((11, 1), np.uint8)), "has 12 samples but train_labels has 11"),
    (dict(val_labels=np.zeros((6, 3), np.uint8)), "multi-label"),
    (dict(test_images=np.zeros((6, 9, 10), np.uint8)), "test_images are"),
    (dict(train_images=np.zeros((12, 10, 10), np.float32)), "uint8"),
    (dict(train_labels=(np.arange(12) % 2).reshape(-1, 1)), "outside the 2 classes"),
    (dict(train_labels=np.array([0, 1, 3] * 4)), r"classes \[2\] have no training samples"),
])
def test_npz_malformed(tmp_path, override, message):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(data.DataError, match=message):
        data.load_npz(path)


def test_npz_unreadable(tmp_path):
    bad = tmp_path / "junk.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_npz(str(bad))
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_data(str(tmp_path / "missing.npz"))


def write_folder(root, classes=("cat", "dog", "emu"), per_class=5, size=(12, 9)):
    from PIL import Image

    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", size, (40 * i, 10 * j, 0)).save(root / c / f"{j}.png")


def test_image_folder_with_splits(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        write_folder(tmp_path / split, per_class=n)
    s = data.load_data(str(tmp_path), image_size=16)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 6)
    assert s.class_names == ["cat", "dog", "emu"] and s.in_channels == 3
    x, y = s.val[3]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == 1
    assert s.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_image_folder_single_split_is_deterministic_and_stratified(tmp_path):
    write_folder(tmp_path, per_class=10)
    a = data.load_image_folder(str(tmp_path), 8, val_fraction=0.2, test_fraction=0.2, seed=3)
    b = data.load_image_folder(str(tmp_path), 8, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (18, 6, 6)
    for split in data.SPLITS:
        assert getattr(a, split).indices.tolist() == getattr(b, split).indices.tolist()
        assert np.bincount(getattr(a, split).labels).tolist() == [len(getattr(a, split)) // 3] * 3
    union = np.concatenate([a.train.indices, a.val.indices, a.test.indices])
    assert sorted(union.tolist()) == list(range(30))


def test_image_folder_errors(tmp_path):
    write_folder(tmp_path / "train")
    with pytest.raises(data.DataError, match="no val/ folder"):
        data.load_data(str(tmp_path), image_size=8)
    write_folder(tmp_path / "val", classes=("cat", "dog"))
    write_folder(tmp_path / "test")
    with pytest.raises(data.DataError, match="validation classes"):
        data.load_data(str(tmp_path), image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="cannot use"):
        data.load_image_folder(str(tmp_path / "empty"), 8)


def test_digits_task():
    s = data.load_digits_task(range(5, 10), seed=0)
    assert s.num_classes == 5 and s.class_names == ["5", "6", "7", "8", "9"]
    assert len(s.train) + len(s.val) + len(s.test) == 896  # digits 5-9 of the 1797
    assert s.train.images.shape[1:] == (1, 8, 8) and s.train.images.max() == 255
    assert set(s.test.labels.tolist()) == set(range(5))


def test_truncate_and_split():
    labels = np.array([0, 1, 1, 2, 2, 2, 1, 0, 2])
    assert data.truncate_per_class(labels).tolist() == [0, 1, 2, 3, 4, 7]
    parts = data.stratified_split(np.repeat([0, 1], 10), (0.6, 0.2, 0.2), seed=1)
    assert [len(p) for p in parts] == [12, 4, 4]
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))


def test_epoch_sampler_shards_and_balances():
    labels = np.array([0] * 90 + [1] * 10)
    shards = [list(data.EpochSampler(labels, num_replicas=3, rank=r, seed=5)) for r in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]
    assert set(sum(shards, [])) == set(range(100))
    again = data.EpochSampler(labels, num_replicas=3, rank=1, seed=5)
    assert list(again) == shards[1]
    again.set_epoch(1)
    assert list(again) != shards[1]
    drawn = labels[list(data.EpochSampler(labels, balance=True, seed=0))]
    assert 35 <= drawn.sum() <= 65  # ≈ half from the 10% class


def test_make_loader_gathers_batches():
    ds = data.ArrayDataset(np.zeros((10, 1, 4, 4), np.uint8), np.arange(10) % 3)
    batches = list(data.make_loader(ds, range(10), batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert batches[1][1].tolist() == [1, 2, 0, 1]
