"""The pretrained half of the lab, offline: ImageNet starts from torch's cache, no network.

A fixture writes random ResNet50 / ResNet18 ImageNet-shaped weights (1000 classes) under
torchvision's own file names into a temporary TORCH_HOME; torchvision loads a cached file
without checking its hash, so the six runs start from these tensors exactly as they would
from the real ones. Tiny synthetic data, 32 px, one epoch: this proves the path, not accuracy.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision import models

import kdlab.checkpoints
import kdlab.lab
from kdlab.config import LAB_RUNS
from kdlab.data import make_synthetic_cifar
from kdlab.lab import Lab
from kdlab.methods import FeatureKD
from kdlab.models import ARCHS, imagenet_file

TINY = dict(epochs=1, image_size=32, batch_size=10)


@pytest.fixture(scope="module")
def imagenet_cache(tmp_path_factory) -> tuple:
    """(TORCH_HOME, {arch: state dict}): random 1000-class weights where torchvision caches its own."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    cached = {}
    for arch in ARCHS:
        cached[arch] = getattr(models, arch)(num_classes=1000).state_dict()
        torch.save(cached[arch], folder / imagenet_file(arch))
    return torch_home, cached


class TinyLab(Lab):
    """The lab with 2 validation images per class, so that 50 synthetic images per class suffice."""

    def config(self, run, seed=None):
        return dataclasses.replace(super().config(run, seed), val_per_class=2)


def stage_width(state: dict, stage: str) -> int:
    """A stage's output channels as the weights have them: its first block's shortcut BN."""
    return state[f"{stage}.0.downsample.1.weight"].shape[0]


def test_the_lab_runs_from_cached_imagenet_weights(tmp_path, monkeypatch, no_network, imagenet_cache):
    torch_home, cached = imagenet_cache
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(kdlab.lab, "load_cifar10",
                        lambda _: make_synthetic_cifar(train_per_class=5, test_per_class=1))
    starts, hints = {}, {}
    train_epochs = kdlab.checkpoints.train_epochs

    def record_start(cfg, method, *args, **kwargs):
        starts[cfg.run] = {k: v.clone() for k, v in method.student.state_dict().items()}
        history = train_epochs(cfg, method, *args, **kwargs)
        if isinstance(method, FeatureKD):   # the hooks still hold the last batch's stage outputs
            hints[cfg.run] = (method.regressor[0], method.student_stage.output.shape,
                              method.teacher_stage.output.shape)
        return history

    monkeypatch.setattr(kdlab.checkpoints, "train_epochs", record_start)
    lab = TinyLab(tmp_path, device="cpu", progress=False, log=lambda _: None, **TINY)
    trained = {run: lab.run(run) for run in LAB_RUNS}

    assert no_network == [], "every weight came from the cache"
    assert set(starts) == set(LAB_RUNS)
    for run, start in starts.items():
        cfg = lab.config(run)
        imagenet = cached[cfg.arch]
        assert trained[run].results["weights"] == cfg.weights
        assert start["fc.weight"].shape[0] == trained[run].model.fc.out_features == 10
        body = [k for k in imagenet if not k.startswith("fc.")]
        if cfg.weights == "imagenet":
            assert all(torch.equal(start[k], imagenet[k]) for k in body), run
        else:
            assert not torch.equal(start["conv1.weight"], imagenet["conv1.weight"]), run

    regressor, student_out, teacher_out = hints["student_pretrained_kd_features"]
    stage = lab.config("student_pretrained_kd_features").settings.hint_layer
    student_width = stage_width(cached["resnet18"], stage)
    teacher_width = stage_width(cached["resnet50"], stage)
    assert (regressor.in_channels, regressor.out_channels) == (student_width, teacher_width)
    assert student_out[1] == student_width and teacher_out[1] == teacher_width
    assert student_out[2:] == teacher_out[2:], "the hint compares maps of one size"

    reloaded = TinyLab(tmp_path, device="cpu", progress=False, log=lambda _: None, **TINY)
    for run in LAB_RUNS:
        assert (tmp_path / f"{run}_best.pt").is_file() and (tmp_path / f"{run}_results.json").is_file()
        again = reloaded.run(run)
        assert not again.trained and again.results == trained[run].results
        first, second = trained[run].model.state_dict(), again.model.state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first), run
