"""The pretrained half of the lab, offline: ImageNet starts from torch's cache, no network.

A fixture writes random ResNet50 / ResNet18 ImageNet-shaped weights (1000 classes) under
torchvision's own file names into a temporary TORCH_HOME; torchvision loads a cached file
without checking its hash, so the six runs start from these tensors exactly as they would
from the real ones. Tiny synthetic data, 32 px, one epoch: this proves the path, not accuracy.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torchvision import models

import kdlab.checkpoints
import kdlab.lab
from conftest import block_network, generated_macros
from kdlab.config import LAB_RUNS, RUNS
from kdlab.latex import tex
from kdlab.report import make_report
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


@pytest.fixture(scope="module")
def six_run_lab(tmp_path_factory, imagenet_cache):
    """The six runs trained offline from the cached weights, once for the module: (checkpoint folder,
    the lab, its trained runs, each run's starting weights, the feature run's hint shapes, network attempts)."""
    torch_home, _ = imagenet_cache
    ckpt = tmp_path_factory.mktemp("six_run_lab")
    starts, hints = {}, {}
    train_epochs = kdlab.checkpoints.train_epochs

    def record_start(cfg, method, *args, **kwargs):
        starts[cfg.run] = {k: v.clone() for k, v in method.student.state_dict().items()}
        history = train_epochs(cfg, method, *args, **kwargs)
        if isinstance(method, FeatureKD):   # the hooks still hold the last batch's stage outputs
            hints[cfg.run] = (method.regressor[0], method.student_stage.output.shape,
                              method.teacher_stage.output.shape)
        return history

    with pytest.MonkeyPatch.context() as monkeypatch:
        attempts = block_network(monkeypatch)
        monkeypatch.setenv("TORCH_HOME", str(torch_home))
        monkeypatch.setattr(kdlab.lab, "load_cifar10",
                            lambda _: make_synthetic_cifar(train_per_class=5, test_per_class=1))
        monkeypatch.setattr(kdlab.checkpoints, "train_epochs", record_start)
        lab = TinyLab(ckpt, device="cpu", progress=False, log=lambda _: None, **TINY)
        trained = {run: lab.run(run) for run in LAB_RUNS}
    return ckpt, lab, trained, starts, hints, attempts


def test_the_lab_runs_from_cached_imagenet_weights(six_run_lab, imagenet_cache):
    ckpt, lab, trained, starts, hints, attempts = six_run_lab
    _, cached = imagenet_cache
    assert attempts == [], "every weight came from the cache"
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

    reloaded = TinyLab(ckpt, device="cpu", progress=False, log=lambda _: None, **TINY)
    for run in LAB_RUNS:
        assert (ckpt / f"{run}_best.pt").is_file() and (ckpt / f"{run}_results.json").is_file()
        again = reloaded.run(run)
        assert not again.trained and again.results == trained[run].results
        first, second = trained[run].model.state_dict(), again.model.state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first), run


def test_the_report_of_the_six_run_lab_reads_right(six_run_lab, tmp_path):
    """The report of a user's six runs (fine-tuned from ImageNet) expects those six, names no run
    outside them, names every start as the report does, and answers "from ImageNet or from scratch"."""
    ckpt = six_run_lab[0]
    rep = make_report(ckpt, tmp_path / "figures", tmp_path / "report", draft=True, pdf=False,
                      log=lambda _: None)
    assert rep.expected == LAB_RUNS and rep.missing == []
    macros = generated_macros(tmp_path / "report")
    generated = "\n".join(path.read_text() for path in sorted((tmp_path / "report" / "generated").glob("*.tex")))
    assert macros["ReportStatus"] == f"results of {tex(ckpt)}", "no run is missing from the page header"
    assert "missing" not in macros["AbstractResults"] + macros["MissingRunsSentence"]
    for run, entry in RUNS.items():
        if run not in LAB_RUNS:   # runs the lab did not ask for are not mentioned at all
            assert tex(entry.label) not in generated and tex(run) not in generated, run
    # starts as the report names them: "from ImageNet", "from scratch"; never a config value
    prose = re.sub(r"\\texttt\{.*?\}", "", generated)
    assert not re.search(r"\bimagenet\b", prose), "a config value printed raw"
    config_table = (tmp_path / "report" / "generated" / "config_table.tex").read_text()
    assert config_table.count("& from ImageNet &") == 4 and config_table.count("& from scratch &") == 2
    assert "From ImageNet, logit KD" in macros["KDGainSentences"]
    assert "From scratch, logit KD" in macros["KDGainSentences"]
    pretrained_vs_scratch = macros["PretrainedVsScratchSentences"]
    for method in ("cross-entropy", "logit KD"):
        assert f"With {method}, the student from ImageNet reached" in pretrained_vs_scratch
    assert pretrained_vs_scratch.count("a paired difference of") == 2
    assert "python -m kdlab run all --ckpt-dir" in (tmp_path / "report" / "generated" / "reproduce.tex").read_text()
