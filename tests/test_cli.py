import json
from pathlib import Path

import pytest
from conftest import run_kdlab

from kdlab.cli import main
from kdlab.config import LAB_RUNS
from kdlab.lab import Lab


def test_smoke_lab_end_to_end(smoke_lab):
    ckpt_dir, first = smoke_lab
    for run in LAB_RUNS:
        assert (ckpt_dir / f"{run}_best.pt").exists()
        results = json.loads((ckpt_dir / f"{run}_results.json").read_text())
        assert results["smoke"] is True and results["weights"] == "none"
        assert len(results["history"]) == results["epochs"] == 2
        # synthetic classes are learnable: far above the 10% of chance
        assert results["best_val_acc"] > 0.5, (run, results["best_val_acc"])
    assert "smoke run: synthetic data, not results" in first.stdout


def test_second_run_trains_nothing(smoke_lab):
    ckpt_dir, _ = smoke_lab
    stamps = {p.name: p.stat().st_mtime_ns for p in ckpt_dir.iterdir()}
    again = run_kdlab("run", "all", "--smoke", "--ckpt-dir", ckpt_dir)
    table = [line.split() for line in again.stdout.splitlines() if line.split()[:1] in ([r] for r in LAB_RUNS)]
    assert [row[1] for row in table] == ["loaded"] * len(LAB_RUNS)
    assert {p.name: p.stat().st_mtime_ns for p in ckpt_dir.iterdir()} == stamps


def test_status_lists_every_run(smoke_lab):
    ckpt_dir, _ = smoke_lab
    out = run_kdlab("status", "--ckpt-dir", ckpt_dir).stdout
    states = dict(line.split()[:2] for line in out.splitlines())
    assert states == {**{run: "trained" for run in LAB_RUNS}, "student_scratch_kd_features": "missing"}


def test_unknown_run_lists_the_valid_ones(tmp_path):
    result = run_kdlab("run", "student_tiny", "--smoke", "--ckpt-dir", tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown run student_tiny" in result.stderr and "teacher_resnet50" in result.stderr


def test_smoke_runs_have_their_own_default_folder():
    # A smoke checkpoint in the real runs' folder would block `run all` ("made with another config").
    assert Lab(device="cpu").ckpt_dir == Path("checkpoints")
    assert Lab(device="cpu", smoke=True).ckpt_dir == Path("checkpoints/smoke")


def test_run_help_says_where_the_defaults_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--epochs", "--lr", "--batch-size", "--temperature"):
        help_text = text.split(option, 2)[2].split(" --", 1)[0]   # after the usage line
        assert "default: the run's recipe, kdlab/config.py" in help_text, option
    assert "default: checkpoints, or checkpoints/smoke with --smoke" in text
