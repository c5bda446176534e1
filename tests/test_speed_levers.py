"""The speed levers (kdlab.config.SpeedLevers): each gives the eager step's losses, each falls back
to the eager path with one log line where it fails, and none is part of a run's config.

Whether a lever pays is a GPU measurement (benchmarks/throughput.py); here the CPU checks that
switching one on changes nothing but the speed. The compile lever is compiled with torch's
aot_eager backend: dynamo's graph capture and AOTAutograd's forward and backward, which is what
the lever changes in the step, without inductor's code generation (a minute per graph on this
CPU; the GPU benchmark compiles with it).
"""
from __future__ import annotations

import pytest
import torch
from conftest import train_tiny

import kdlab.train
from kdlab.cli import main
from kdlab.config import SpeedLevers, make_config
from kdlab.errors import KdlabError
from kdlab.methods import build_method
from kdlab.models import build_model
from kdlab.train import TrainStep, load_optimizer_state, make_optimizer, make_scaler

LOSS_KEYS = ("train_loss", "val_loss", "val_acc", "train_acc")


def assert_same_run(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Two results of one run trained two ways: the same losses and accuracies, epoch by epoch."""
    for x, y in zip(a["history"], b["history"], strict=True):
        for key in LOSS_KEYS:
            assert x[key] == pytest.approx(y[key], rel=rel), (key, x["epoch"])
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == pytest.approx(b["test_loss"], rel=rel)


@pytest.fixture(scope="module")
def eager(tiny_splits, tmp_path_factory) -> dict:
    """The tiny run's results with every lever off."""
    return train_tiny(tiny_splits, tmp_path_factory.mktemp("eager")).results


def test_fused_sgd_trains_as_the_default_sgd(tmp_path, tiny_splits, eager):
    lines = []
    fused = train_tiny(tiny_splits, tmp_path / "fused", log=lines.append, speed=SpeedLevers(fused_sgd=True)).results
    assert_same_run(fused, eager)
    assert fused["speed_levers"]["fused_sgd"] and not eager["speed_levers"]["fused_sgd"]
    assert not [line for line in lines if "not available" in line]


def test_fused_sgd_falls_back_with_one_line_where_torch_has_none(tmp_path, tiny_splits, eager, monkeypatch):
    sgd = torch.optim.SGD

    def sgd_without_fused(params, fused=None, **settings):   # a torch from before fused SGD
        if fused is not None:
            raise TypeError("SGD.__init__() got an unexpected keyword argument 'fused'")
        return sgd(params, **settings)

    monkeypatch.setattr(torch.optim, "SGD", sgd_without_fused)
    lines = []
    fallback = train_tiny(tiny_splits, tmp_path / "fallback", log=lines.append, speed=SpeedLevers(fused_sgd=True))
    assert [line for line in lines if "fused SGD" in line] == [
        "student_scratch_baseline: fused SGD is not available here (TypeError: SGD.__init__() got an unexpected keyword argument 'fused'); "
        "training with torch's default SGD"]
    assert_same_run(fallback.results, eager, rel=0)


def test_a_resumed_optimizer_keeps_this_sessions_implementation():
    cfg = make_config("student_scratch_baseline", smoke=True)
    method = build_method(cfg, build_model(cfg.arch, "none"), None)
    saved = make_optimizer(cfg, method).state_dict()
    fused = make_optimizer(cfg, method, fused=True)
    load_optimizer_state(fused, saved)
    assert all(group["fused"] for group in fused.param_groups)
    assert all(group["lr"] == cfg.lr for group in fused.param_groups)


def test_smaller_evaluation_batches_give_the_same_evaluation(tmp_path, tiny_splits, eager):
    small = train_tiny(tiny_splits, tmp_path, speed=SpeedLevers(eval_batch_size=3)).results
    assert_same_run(small, eager)
    assert small["test_predictions"] == eager["test_predictions"]
    assert small["speed_levers"]["eval_batch_size"] == 3


@pytest.fixture
def recorded_compiles(monkeypatch) -> list:
    """The compile lever with aot_eager (see the module's docstring); returns the graphs compiled."""
    from torch._dynamo.backends.registry import lookup_backend
    aot_eager, graphs = lookup_backend("aot_eager"), []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)
    monkeypatch.setattr(kdlab.train, "COMPILE_OPTIONS", dict(backend=backend))
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def steps_of(run: str, compile_step: bool, log=print, steps: int = 3) -> tuple[list[dict], dict]:
    """The losses of `steps` training steps of `run`'s method (16 px, a random ResNet50 teacher), and
    the student's weights after them; each step a quarter epoch on, so DKD's warm-up moves."""
    torch.manual_seed(0)
    cfg = make_config(run, smoke=True)
    teacher = build_model("resnet50", "none") if cfg.uses_teacher else None
    method = build_method(cfg, build_model(cfg.arch, "none"), teacher).train()
    optimizer = make_optimizer(cfg, method)
    take_step = TrainStep(method, optimizer, make_scaler(torch.device("cpu"), None), None, compile_step, log)
    images, targets = torch.randn(steps, 8, 3, 16, 16), torch.randint(0, 10, (steps, 8))
    losses = [{k: v.item() for k, v in take_step(images[i], targets[i], i / 4)[1].items()} for i in range(steps)]
    method.close()
    return losses, method.student.state_dict()


@pytest.mark.parametrize("run", ["student_scratch_baseline", "student_scratch_kd_scores", "student_scratch_kd_features",
                                 "student_scratch_dkd", "student_scratch_at"])
def test_the_compiled_step_gives_the_eager_losses(run, recorded_compiles):
    """Every method: its hooks (FitNets, attention transfer) traced, and DKD's warm-up, which reads
    epochs_done, compiled once more for a changing value, not once a step."""
    lines = []
    compiled, compiled_weights = steps_of(run, compile_step=True, log=lines.append)
    eager, eager_weights = steps_of(run, compile_step=False)
    assert lines == [] and 1 <= len(recorded_compiles) <= 2, (lines, len(recorded_compiles))
    for a, b in zip(compiled, eager, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a), (a, b)
    for name, weight in compiled_weights.items():
        assert torch.allclose(weight.float(), eager_weights[name].float(), rtol=1e-4, atol=1e-6), name


def test_a_failing_compiler_falls_back_to_the_eager_step_with_one_line(tmp_path, tiny_splits, eager, monkeypatch):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")
    monkeypatch.setattr(kdlab.train, "COMPILE_OPTIONS", dict(backend=no_compiler))
    torch._dynamo.reset()
    lines = []
    fallback = train_tiny(tiny_splits, tmp_path, log=lines.append, speed=SpeedLevers(compile_step=True))
    failed = [line for line in lines if "torch.compile failed" in line]
    assert failed == ["student_scratch_baseline: torch.compile failed (RuntimeError: no C++ compiler here); "
                      "training without it"]
    assert_same_run(fallback.results, eager, rel=0)
    torch._dynamo.reset()


def test_levers_are_not_part_of_the_config(tmp_path, tiny_splits):
    """A run trained with levers loads (or resumes) without them: its config does not differ."""
    first = train_tiny(tiny_splits, tmp_path, speed=SpeedLevers(fused_sgd=True, eval_batch_size=7))
    again = train_tiny(tiny_splits, tmp_path)
    assert first.trained and not again.trained and again.results == first.results


def test_a_bad_evaluation_batch_is_one_line_exit_2_and_nothing_trained(tmp_path, capsys):
    with pytest.raises(KdlabError, match="evaluation batch size must be a positive integer, got 0"):
        SpeedLevers(eval_batch_size=0)
    folder = tmp_path / "ckpt"
    capsys.readouterr()
    code = main(["run", "student_scratch_baseline", "--smoke", "--device", "cpu", "--ckpt-dir", str(folder),
                 "--eval-batch-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err == "kdlab: error: evaluation batch size must be a positive integer, got 0\n"
    assert not folder.exists()
