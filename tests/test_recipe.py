"""The training recipe's switches: weight average, flip test-time augmentation, label smoothing, seeds."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.checkpoints import RunFiles, train_or_load
from kdlab.cli import main
from kdlab.config import make_config
from kdlab.data import make_splits, make_synthetic_cifar
from kdlab.errors import KdlabError
from kdlab.lab import Lab
from kdlab.losses import kd_logits_terms
from kdlab.methods import build_method
from kdlab.models import build_model
from kdlab.train import WeightAverage, predict, predict_views

CPU = torch.device("cpu")
RUN = "student_scratch_baseline"
TINY = dict(limit_train=20, batch_size=10, image_size=16, epochs=2)


@pytest.fixture(scope="module")
def tiny_splits():
    data = make_synthetic_cifar(train_per_class=10, test_per_class=3)
    return make_splits(data, val_per_class=3, split_seed=42, limit_train=0, device=CPU)


def test_weight_average_follows_its_closed_form():
    cfg = make_config(RUN, ema_decay=0.9)
    student = build_model("resnet18", "none")
    average = WeightAverage(cfg, student)
    weight = student.fc.bias
    mean = student.layer1[0].bn1.running_mean
    expected_w, expected_m = weight.detach().clone(), mean.clone()
    for t in range(30):
        with torch.no_grad():
            weight.add_(torch.randn_like(weight))
            mean.add_(torch.randn_like(mean))
        student.layer1[0].bn1.num_batches_tracked += 1
        average.update(t)
        d = min(0.9, (1 + t) / (10 + t))          # the ramp, then the configured decay
        expected_w = d * expected_w + (1 - d) * weight.detach()
        expected_m = d * expected_m + (1 - d) * mean
    averaged = average.model.state_dict()
    assert torch.allclose(averaged["fc.bias"], expected_w, atol=1e-6)
    assert torch.allclose(averaged["layer1.0.bn1.running_mean"], expected_m, atol=1e-6)
    assert averaged["layer1.0.bn1.num_batches_tracked"] == 30            # copied, not averaged
    assert average.decay_at(0) == pytest.approx(0.1) and average.decay_at(10_000) == 0.9


def test_flip_tta_is_the_mean_of_the_logits_of_both_views(tiny_splits):
    model = build_model("resnet18", "none").eval()
    images = tiny_splits.test[0]
    views = predict_views(model, images, 32)
    mirrored = predict(model, images.flip(3), 32)       # the mirror image, made beforehand
    assert torch.allclose(views["single"], predict(model, images, 32))
    assert torch.allclose(views["flip"], (views["single"] + mirrored) / 2, atol=1e-5)


class Constant(nn.Module):
    """A 'network' whose logits are fixed, so each loss term can be computed by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, images):
        return self.logits.expand(len(images), -1)


def test_label_smoothing_touches_only_the_students_cross_entropy():
    logits, targets = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    smooth = F.cross_entropy(logits, targets, label_smoothing=0.1)
    plain = F.cross_entropy(logits, targets)
    teacher_logits = torch.tensor([[1.0, 1.0, 0.0]])

    baseline = make_config(RUN, label_smoothing=0.1)
    _, losses = build_method(baseline, Constant(logits), None).forward_train(torch.zeros(1, 3), targets, 0.0)
    assert torch.isclose(losses["ce"], smooth)

    kd_cfg = make_config("student_scratch_kd_scores", label_smoothing=0.1, alpha=0.5)
    kd = build_method(kd_cfg, Constant(logits), Constant(teacher_logits))
    _, losses = kd.forward_train(torch.zeros(1, 3), targets, 0.0)
    unsmoothed = kd_logits_terms(logits, teacher_logits, targets, kd_cfg.settings.temperature, 0.5)
    assert torch.isclose(losses["ce"], 0.5 * smooth)                 # the hard-label term is smoothed
    assert torch.isclose(losses["kd"], unsmoothed["kd"])             # the teacher's soft targets are not
    assert torch.isclose(unsmoothed["ce"], 0.5 * plain)


def test_label_smoothing_reaches_the_students_and_never_the_teacher(tmp_path):
    lab = Lab(tmp_path, device="cpu", label_smoothing=0.1, weights="none")
    assert lab.config("teacher_resnet50").label_smoothing == 0
    assert lab.config(RUN).label_smoothing == lab.config("student_scratch_kd_scores").label_smoothing == 0.1
    assert make_config("teacher_resnet50", weights="none").label_smoothing == 0


def test_results_record_each_evaluation_and_use_the_average_with_flip(tmp_path, tiny_splits):
    cfg = dataclasses.replace(make_config(RUN, smoke=True, epochs=2, batch_size=30), val_per_class=3)
    r = train_or_load(cfg, lambda: tiny_splits, CPU, tmp_path, progress=False, log=lambda _: None).results
    assert set(r["test_acc_by_evaluation"]) == {"average_single", "average_flip", "raw_single", "raw_flip"}
    assert r["test_acc"] == r["test_acc_by_evaluation"]["average_flip"]
    assert {"val_acc", "val_acc_single_view", "val_acc_raw"} <= set(r["history"][0])
    assert r["seed"] == 42 and r["config"]["split_seed"] == 42

    one_view = dataclasses.replace(cfg, flip_tta=False)
    r = train_or_load(one_view, lambda: tiny_splits, CPU, tmp_path / "one", progress=False, log=lambda _: None).results
    assert r["test_acc"] == r["test_acc_by_evaluation"]["average_single"]
    assert [h["val_acc"] for h in r["history"]] == [h["val_acc_single_view"] for h in r["history"]]


def test_seeds_train_apart_share_the_split_and_the_teacher(tmp_path):
    log = []
    lab = Lab(tmp_path, device="cpu", smoke=True, progress=False, log=log.append, **TINY)
    runs = {seed: lab.run("student_scratch_kd_scores", seed=seed) for seed in (42, 7)}
    assert RunFiles(tmp_path, "student_scratch_kd_scores").best.exists()           # the original name
    assert RunFiles(tmp_path, "student_scratch_kd_scores", 7).best.exists()
    assert (tmp_path / "student_scratch_kd_scores_seed7_results.json").exists()
    assert not RunFiles(tmp_path, "teacher_resnet50", 7).best.exists()            # one teacher for all seeds
    assert [line for line in log if line.startswith("teacher_resnet50: test accuracy")] != []
    assert runs[7].results["teacher"] == runs[42].results["teacher"]
    assert runs[7].results["config"]["split_seed"] == runs[42].results["config"]["split_seed"] == 42
    assert runs[7].results["history"] != runs[42].results["history"]
    # Each seed loads its own file.
    again = Lab(tmp_path, device="cpu", smoke=True, progress=False, log=log.append, **TINY)
    assert again.run("student_scratch_kd_scores", seed=7).results == runs[7].results


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "seed must be a non-negative integer, got -1"),
    (["--ema-decay", "1"], "EMA decay must be in (0, 1), got 1.0"),
    (["--ema-decay", "0"], "EMA decay must be in (0, 1), got 0.0"),
    (["--label-smoothing", "1"], "label smoothing must be in [0, 1), got 1.0"),
    (["--label-smoothing", "-0.1"], "label smoothing must be in [0, 1), got -0.1"),
])
def test_bad_recipe_settings_are_one_line_and_exit_2(tmp_path, capsys, flags, needle):
    assert main(["run", RUN, "--smoke", "--ckpt-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: ") and needle in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())                                 # nothing was trained


def test_a_seed_that_is_not_an_integer_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", RUN, "--smoke", "--seed", "1.5"])
    assert stop.value.code == 2 and "invalid int value: '1.5'" in capsys.readouterr().err
    with pytest.raises(KdlabError, match="seed must be a non-negative integer, got 1.5"):
        make_config(RUN, seed=1.5)
