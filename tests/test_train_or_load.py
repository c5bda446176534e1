import dataclasses
from pathlib import Path

import pytest
import torch

from kdlab.checkpoints import RunFiles, load_checkpoint, train_or_load
from kdlab.config import make_config
from kdlab.data import make_splits, make_synthetic_cifar
from kdlab.errors import KdlabError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_splits():
    data = make_synthetic_cifar(train_per_class=30, test_per_class=5)
    return make_splits(data, val_per_class=5, split_seed=42, limit_train=0, device=CPU)


def tiny_config(**changes):
    cfg = make_config("student_scratch_baseline", smoke=True, epochs=3, batch_size=50)
    return dataclasses.replace(cfg, val_per_class=5, **changes)


def train(cfg, splits, ckpt_dir, **kwargs):
    return train_or_load(cfg, lambda: splits, CPU, ckpt_dir, progress=False, log=lambda _: None, **kwargs)


def without_timings(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_trains_then_loads_without_training(tmp_path, tiny_splits):
    first = train(tiny_config(), tiny_splits, tmp_path)
    assert first.trained and len(first.results["history"]) == 3
    files = RunFiles(tmp_path, "student_scratch_baseline")
    assert files.best.exists() and files.results.exists() and not files.last.exists()
    stamp = files.best.stat().st_mtime_ns

    def no_data():
        raise AssertionError("a finished run must load without touching the data")

    second = train_or_load(tiny_config(), no_data, CPU, tmp_path, progress=False, log=lambda _: None)
    assert not second.trained and second.results == first.results
    assert files.best.stat().st_mtime_ns == stamp
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_splits, monkeypatch):
    straight = train(tiny_config(), tiny_splits, tmp_path / "straight")

    original = RunFiles.save_last

    def interrupt_after_first_epoch(self, state):
        original(self, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunFiles, "save_last", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), tiny_splits, tmp_path / "resumed")
    monkeypatch.setattr(RunFiles, "save_last", original)
    assert load_checkpoint(tmp_path / "resumed" / "student_scratch_baseline_last.pt")["epoch"] == 1
    resumed = train(tiny_config(), tiny_splits, tmp_path / "resumed")

    assert without_timings(resumed.results["history"]) == without_timings(straight.results["history"])
    assert resumed.results["test_predictions"] == straight.results["test_predictions"]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, tiny_splits, monkeypatch):
    real_write = Path.write_bytes
    calls = []

    def write_half_then_fail(self, data):
        calls.append(self)
        if len(calls) == 2:  # the second epoch's write: leave a half-written temporary, then fail
            real_write(self, bytes(data[:len(data) // 2]))
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    with pytest.raises(KdlabError, match="student_scratch_baseline_last.pt"):
        train(tiny_config(), tiny_splits, tmp_path)
    last = tmp_path / "student_scratch_baseline_last.pt"
    assert load_checkpoint(last)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [last.name]


def test_a_checkpoint_of_another_config_is_refused_with_the_fields(tmp_path, tiny_splits):
    train(tiny_config(), tiny_splits, tmp_path)
    with pytest.raises(KdlabError) as err:
        train(tiny_config(lr=0.1, epochs=4), tiny_splits, tmp_path)
    assert "lr: 0.05 -> 0.1" in str(err.value) and "epochs: 3 -> 4" in str(err.value)
    assert "--retrain" in str(err.value)
    retrained = train(tiny_config(epochs=1), tiny_splits, tmp_path, retrain=True)
    assert retrained.trained and retrained.results["epochs"] == 1


def test_a_corrupted_checkpoint_gives_a_clear_error(tmp_path, tiny_splits):
    train(tiny_config(), tiny_splits, tmp_path)
    best = tmp_path / "student_scratch_baseline_best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(KdlabError) as err:
        train(tiny_config(), tiny_splits, tmp_path)
    assert str(best) in str(err.value) and "--retrain" in str(err.value) and "delete" in str(err.value)
    assert best.stat().st_size == 1000, "a bad checkpoint is never overwritten silently"


def test_an_epoch_of_few_steps_is_warned_about_with_a_batch_to_use(tmp_path, tiny_splits):
    logged = []
    cfg = dataclasses.replace(tiny_config(epochs=1), smoke=False)    # 250 images, batches of 50
    train_or_load(cfg, lambda: tiny_splits, CPU, tmp_path, progress=False, log=logged.append)
    warning = next(line for line in logged if "warning" in line)
    assert "only 5 optimizer steps an epoch (250 images in batches of 50)" in warning
    assert "--batch-size 16 --lr" in warning
