"""torchvision's ResNet50 (teacher) and ResNet18 (student) with a 10-class head.

The architectures are torchvision's, unmodified, so ImageNet weights load as trained;
CIFAR images are upsampled on the device instead (docs/recipe.md: "Input resolution").
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from kdlab.errors import KdlabError

ARCHS = {
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
}


def imagenet_file(arch: str) -> str:
    """The file name torchvision caches `arch`'s ImageNet weights under (the last part of its URL)."""
    return ARCHS[arch][1].url.rsplit("/", 1)[-1]


def build_model(arch: str, weights: str, num_classes: int = 10) -> nn.Module:
    """A torchvision ResNet; `weights="imagenet"` downloads (or reuses the cache of) its weights.

    Never falls back to random weights: a run that asked for ImageNet and cannot get it stops.
    """
    constructor, imagenet = ARCHS[arch]
    if weights == "none":
        # Zero-init of each block's last BN makes every residual block start as the identity
        # (Goyal et al. 2017), which helps short from-scratch schedules.
        return constructor(weights=None, num_classes=num_classes, zero_init_residual=True)
    try:
        model = constructor(weights=imagenet)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad cache file a RuntimeError
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise KdlabError(
            f"the ImageNet weights of {arch} ({imagenet}, file {imagenet_file(arch)}) are not in "
            f"torch's cache {folder} and could not be downloaded ({err}). Run once with a network, "
            f"or copy the lab's two weight files, {' and '.join(map(imagenet_file, ARCHS))} (from "
            f"https://download.pytorch.org/models/), into {folder}; or pass --weights none to "
            f"train from scratch on purpose.") from None
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def load_weights(model: nn.Module, state: dict, source) -> None:
    """`model.load_state_dict(state)`, with weights that do not fit the model refused by name."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        # torch lists every missing, unexpected and mis-shaped tensor; the first few name the problem.
        detail = " ".join(str(err).split())
        raise KdlabError(f"{source} does not fit the model ({detail[:300]}). Either run again with "
                         f"--retrain to train this run from the start, or delete the file.") from None


def stage_channels(model: nn.Module, stage: str) -> int:
    """Output channels of a ResNet stage (`layer1`..`layer4`): its last BatchNorm's width."""
    norms = [m for m in getattr(model, stage).modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


class StageOutput:
    """Keeps the latest output of one stage, taken by a forward hook (the model is untouched)."""

    def __init__(self, model: nn.Module, stage: str):
        self.output: torch.Tensor | None = None
        self._handle = getattr(model, stage).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.output = output

    def remove(self) -> None:
        """Unhook, and let the last activation go (the teacher outlives one run)."""
        self._handle.remove()
        self.output = None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict's names, dtypes, shapes and values, however it was serialized: the
    identity of a teacher in its students' results files."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
