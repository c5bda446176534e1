"""CIFAR-10 as uint8 tensors, the 45k/5k split, and a loader that augments on the device.

The pickles of torchvision's `cifar-10-batches-py` layout are read directly, so the
original download and the JPEG copy in ../shared/data go through the same code. The
training split lives on the device as one uint8 tensor; augmentation, normalisation and
resizing run on whole batches there (airbench's way), never per image on the CPU.
"""
from __future__ import annotations

import functools
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.config import CLASSES, NUM_CLASSES
from kdlab.errors import KdlabError
from kdlab.folders import no_empty_folders_left

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
# torchvision's ImageNet statistics: the pretrained weights expect inputs normalised with them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD = 4


@dataclass
class Cifar10:
    train_images: torch.Tensor   # (50000, 3, 32, 32) uint8
    train_labels: torch.Tensor   # (50000,) int64
    test_images: torch.Tensor    # (10000, 3, 32, 32) uint8
    test_labels: torch.Tensor    # (10000,) int64
    source: str                  # where the images came from, recorded in every results file


# ----------------------------------------------------------------------------- reading

def load_cifar10(root: str | Path, download: bool = True) -> Cifar10:
    """Read CIFAR-10 from `root/cifar-10-batches-py`, downloading it first if it is missing."""
    folder = Path(root) / BATCHES_DIR
    if not all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES):
        if not download:
            raise KdlabError(_missing_message(folder, "downloading is off"))
        with no_empty_folders_left(root):
            _download(Path(root), folder)
    train_images, train_labels = _read_batches(folder, TRAIN_FILES)
    test_images, test_labels = _read_batches(folder, TEST_FILES)
    return Cifar10(train_images, train_labels, test_images, test_labels, _describe_source(folder))


def _download(root: Path, folder: Path) -> None:
    import torchvision  # the path Colab takes; only needed when the data is missing
    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise KdlabError(_missing_message(folder, f"the download failed ({err})")) from None


def _missing_message(folder: Path, why: str) -> str:
    return (f"CIFAR-10 is not in {folder} and {why}. Fill that folder with the five "
            f"data_batch_N files and test_batch of torchvision's cifar-10-batches-py layout: "
            f"with a network, run the lab once (it downloads them); offline, extract a copy of "
            f"cifar-10-python.tar.gz into {folder.parent} (docs/offline.md). Or use "
            f"--data-dir to point at a folder that holds {BATCHES_DIR}/, or --smoke for synthetic data.")


def _read_batches(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        x, y = read_batch(folder / name)
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches and nothing else: a data file is data, never code.

    A batch holds byte strings, lists and one numpy array, so numpy's array rebuilders (under
    numpy 1's and numpy 2's module names) and the byte decoder are the only globals it needs.
    """
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch as (N, 3, 32, 32) uint8 images and (N,) int64 labels, checked."""
    try:
        with open(path, "rb") as fh:
            batch = BatchUnpickler(fh, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise KdlabError(f"{path} is not a readable CIFAR-10 batch ({type(err).__name__}: {err}); "
                         f"delete {path.parent} and let the lab fetch or convert it again") from None
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise KdlabError(f"{path}: expected uint8 images of shape (N, 3072), got {data.dtype} "
                         f"{data.shape}; the file is not in cifar-10-batches-py format")
    if labels.shape != (len(data),):
        raise KdlabError(f"{path}: {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise KdlabError(f"{path}: labels must be in 0..{NUM_CLASSES - 1}, "
                         f"found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _describe_source(folder: Path) -> str:
    """Name the copy: the original download has torchvision's md5 sums, a re-encoded copy not."""
    from torchvision.datasets import CIFAR10
    expected = dict(CIFAR10.train_list + CIFAR10.test_list)
    original = all(hashlib.md5((folder / name).read_bytes()).hexdigest() == expected.get(name)
                   for name in TRAIN_FILES + TEST_FILES)
    kind = "original" if original else "re-encoded copy (md5 differs from the original)"
    return f"CIFAR-10 {kind}, {folder}"


def make_synthetic_cifar(train_per_class: int = 100, test_per_class: int = 20,
                         seed: int = 0) -> Cifar10:
    """A CIFAR-shaped dataset with learnable structure, made in memory for smoke runs and tests.

    Each class is a smooth random colour pattern; images are that pattern, shifted a few
    pixels and covered in noise, so a network must learn something to beat chance (10%).
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=g)
    prototypes = F.interpolate(coarse, size=40, mode="bilinear", align_corners=False) * 255

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=g)]
        dx, dy = torch.randint(0, 2 * PAD + 1, (2, len(labels)), generator=g)
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
        images = prototypes[labels[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        images = images + 60 * torch.randn(images.shape, generator=g)
        return images.clamp(0, 255).to(torch.uint8), labels

    train_images, train_labels = sample(train_per_class)
    test_images, test_labels = sample(test_per_class)
    return Cifar10(train_images, train_labels, test_images, test_labels,
                   f"synthetic smoke data (seed {seed}), not CIFAR-10")


# ----------------------------------------------------------------------------- split

def split_train_val(labels, val_per_class: int = 500, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the training set: `val_per_class` images of each class go to val.

    The order comes from PCG64's raw 64-bit stream, which numpy guarantees across versions and
    platforms (Generator.permutation is not), so the split is the same on every machine.
    """
    labels = np.asarray(labels)
    keys = np.random.PCG64(seed).random_raw(len(labels))
    val = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        if len(members) <= val_per_class:
            raise KdlabError(f"class {CLASSES[c]} has {len(members)} training images, "
                             f"too few for {val_per_class} validation images")
        val.append(members[np.argsort(keys[members], kind="stable")][:val_per_class])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def limit_stratified(train_idx: np.ndarray, labels, n: int, seed: int = 42) -> np.ndarray:
    """A class-balanced subset of `n` training indices, for quick experiments."""
    labels = np.asarray(labels)
    keys = np.random.PCG64(seed + 1).random_raw(len(labels))
    per_class = n // NUM_CLASSES
    members = [train_idx[labels[train_idx] == c] for c in range(NUM_CLASSES)]
    keep = [m[np.argsort(keys[m], kind="stable")][:per_class] for m in members]
    return np.sort(np.concatenate(keep))


@dataclass
class Splits:
    """The three splits as uint8 image tensors and int64 labels, on one device."""
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    source: str


def make_splits(data: Cifar10, val_per_class: int, split_seed: int, limit_train: int,
                device: torch.device) -> Splits:
    train_idx, val_idx = split_train_val(data.train_labels.numpy(), val_per_class, split_seed)
    if limit_train:
        train_idx = limit_stratified(train_idx, data.train_labels.numpy(), limit_train, split_seed)

    def take(images, labels, idx=None):
        if idx is not None:
            idx = torch.from_numpy(idx)
            images, labels = images[idx], labels[idx]
        return images.to(device), labels.to(device)

    return Splits(train=take(data.train_images, data.train_labels, train_idx),
                  val=take(data.train_images, data.train_labels, val_idx),
                  test=take(data.test_images, data.test_labels),
                  source=data.source)


# ----------------------------------------------------------------------------- device-side batches

@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in uint8 units, made once per device: a host-to-device copy every batch
    would make each step wait for the host."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def preprocess(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) -> normalised float (B, 3, S, S), channels_last, on the same device."""
    mean, std = _normalisation(images.device)
    x = (images.float() - mean) / std
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def batch_flip_crop(padded: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of reflect-padded (B, 3, 40, 40) images, half of them mirrored."""
    b, device = padded.shape[0], padded.device
    dy, dx = torch.randint(0, 2 * PAD + 1, (2, b), device=device, generator=generator)
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    span = torch.arange(32, device=device)
    cols = dx[:, None] + span
    cols = torch.where(flip[:, None], cols.flip(1), cols)   # a mirrored crop reads columns backwards
    rows = dy[:, None] + span
    channels = torch.arange(3, device=device)[None, :, None, None]
    return padded[torch.arange(b, device=device)[:, None, None, None], channels,
                  rows[:, None, :, None], cols[:, None, None, :]]


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The random stream of one epoch, a function of (seed, epoch) alone: resuming replays it."""
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


class DeviceLoader:
    """Shuffled, augmented training batches cut from a uint8 tensor that stays on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 image_size: int, seed: int):
        # Pad once for the whole split: reflect padding per batch would repeat the work.
        self.padded = F.pad(images.float(), (PAD,) * 4, mode="reflect").to(torch.uint8)
        self.labels = labels
        self.batch_size = min(batch_size, len(labels))
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size  # drop the ragged last batch: BN dislikes tiny ones

    def epoch(self, epoch: int):
        g = epoch_generator(self.seed, epoch, self.labels.device)
        order = torch.randperm(len(self.labels), device=self.labels.device, generator=g)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = batch_flip_crop(self.padded[idx], g)
            yield preprocess(images, self.image_size), self.labels[idx]
