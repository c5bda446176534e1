import pickle

import numpy as np
import pytest
import torch

from kdlab.data import (BATCHES_DIR, DeviceLoader, batch_flip_crop, epoch_generator, load_cifar10,
                        make_synthetic_cifar, preprocess, split_train_val)
from kdlab.errors import KdlabError

CIFAR_LABELS = np.arange(50000) % 10


def test_split_is_stratified_disjoint_and_complete():
    train, val = split_train_val(CIFAR_LABELS, val_per_class=500, seed=42)
    assert len(train) == 45000 and len(val) == 5000
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(50000))
    assert np.bincount(CIFAR_LABELS[val], minlength=10).tolist() == [500] * 10
    assert np.bincount(CIFAR_LABELS[train], minlength=10).tolist() == [4500] * 10


def test_split_is_the_same_on_every_machine():
    _, val = split_train_val(CIFAR_LABELS, seed=42)
    # PCG64's raw stream is fixed by numpy across versions: so are these indices.
    assert val[:5].tolist() == [4, 17, 27, 51, 68]
    _, other = split_train_val(CIFAR_LABELS, seed=43)
    assert not np.array_equal(val, other)


def test_augmentation_keeps_shapes_and_ranges_and_is_seeded():
    data = make_synthetic_cifar(train_per_class=10, test_per_class=1)
    loader = DeviceLoader(data.train_images, data.train_labels, batch_size=32, image_size=64, seed=0)
    first = [(x.clone(), y.clone()) for x, y in loader.epoch(0)]
    again = list(loader.epoch(0))
    other_epoch = list(loader.epoch(1))
    assert len(first) == len(loader) == 3
    x, y = first[0]
    assert x.shape == (32, 3, 64, 64) and x.dtype == torch.float32 and y.shape == (32,)
    assert x.is_contiguous(memory_format=torch.channels_last)
    lowest = min((0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    highest = max((1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert lowest - 1e-4 <= x.min() and x.max() <= highest + 1e-4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other_epoch[0][0])


def test_crop_and_flip_move_pixels_as_promised():
    image = torch.arange(3 * 40 * 40, dtype=torch.int64).view(1, 3, 40, 40).repeat(256, 1, 1, 1)
    crops = batch_flip_crop(image, epoch_generator(0, 0, torch.device("cpu")))
    assert crops.shape == (256, 3, 32, 32)
    corners = {(int(c[0, 0, 0]) // 40, int(c[0, 0, 0]) % 40) for c in crops}
    # Every crop is a window of the padded image, offsets 0..8, mirrored or not.
    assert all(0 <= r <= 8 and (0 <= col <= 8 or 31 <= col <= 39) for r, col in corners)
    assert any(col >= 31 for _, col in corners) and any(col <= 8 for _, col in corners)


def test_preprocess_resizes_on_the_device():
    x = preprocess(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 128)
    assert x.shape == (2, 3, 128, 128)


def write_batches(folder, images_per_file=20, corrupt=None):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (images_per_file, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, images_per_file).tolist()}
        if corrupt and name == "data_batch_3":
            batch = corrupt(batch)
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)


def test_reads_the_torchvision_layout(tmp_path):
    write_batches(tmp_path / BATCHES_DIR)
    data = load_cifar10(tmp_path, download=False)
    assert data.train_images.shape == (100, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_labels.shape == (20,) and data.test_labels.dtype == torch.int64
    assert "re-encoded copy" in data.source


@pytest.mark.parametrize("corrupt,expected", [
    (lambda b: {**b, b"data": b[b"data"][:, :100]}, "shape"),
    (lambda b: {**b, b"labels": [12] * 20}, "labels must be in 0..9"),
    (lambda b: {b"nothing": 1}, "not a readable CIFAR-10 batch"),
])
def test_malformed_batches_name_the_file(tmp_path, corrupt, expected):
    write_batches(tmp_path / BATCHES_DIR, corrupt=corrupt)
    with pytest.raises(KdlabError, match=expected) as err:
        load_cifar10(tmp_path, download=False)
    assert "data_batch_3" in str(err.value)


def test_truncated_batch_names_the_file(tmp_path):
    write_batches(tmp_path / BATCHES_DIR)
    path = tmp_path / BATCHES_DIR / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(KdlabError, match="test_batch"):
        load_cifar10(tmp_path, download=False)


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(KdlabError) as err:
        load_cifar10(tmp_path / "nowhere", download=False)
    assert str(tmp_path / "nowhere" / BATCHES_DIR) in str(err.value)
    assert "cifar-10-python.tar.gz" in str(err.value) and "--smoke" in str(err.value)


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('ran')",))


def test_a_batch_that_would_run_code_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_batches(tmp_path / BATCHES_DIR, corrupt=lambda b: {**b, b"labels": RunsCode()})
    with pytest.raises(KdlabError, match=r"data_batch_3.*exec is not allowed"):
        load_cifar10(tmp_path, download=False)
    assert not (tmp_path / "PWNED").exists()
