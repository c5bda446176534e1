import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_kdlab

from kdlab.cli import main
from kdlab.config import LAB_RUNS, RUNS
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
    assert states == {**{run: "trained" for run in LAB_RUNS},
                      **{run: "missing" for run in RUNS if run not in LAB_RUNS}}


def test_unknown_run_lists_the_valid_ones(tmp_path):
    result = run_kdlab("run", "student_tiny", "--smoke", "--ckpt-dir", tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown run student_tiny" in result.stderr and "teacher_resnet50" in result.stderr


def test_runs_beyond_the_lab_train_by_name_with_their_settings_and_show_everywhere(smoke_lab, tmp_path):
    """Decoupled KD and attention transfer, on the smoke lab's teacher: trained with settings from
    the command line, then listed by status and drawn and reported like the lab's runs."""
    ckpt_dir, _ = smoke_lab
    for name in ("teacher_resnet50_best.pt", "teacher_resnet50_results.json"):
        shutil.copy(ckpt_dir / name, tmp_path / name)
    new_runs = ["student_scratch_dkd", "student_scratch_at"]
    run_kdlab("run", *new_runs, "--smoke", "--beta", "4", "--attention-stages", "layer3", "layer4",
              "--ckpt-dir", tmp_path)
    dkd, at = (json.loads((tmp_path / f"{run}_results.json").read_text()) for run in new_runs)
    assert dkd["config"]["beta"] == 4.0 and set(dkd["history"][0]["losses"]) == {"ce", "dkd"}
    assert at["config"]["attention_stages"] == ["layer3", "layer4"] and "attention" in at["history"][0]["losses"]

    states = dict(line.split()[:2] for line in run_kdlab("status", "--ckpt-dir", tmp_path).stdout.splitlines())
    assert [run for run, state in states.items() if state == "trained"] == ["teacher_resnet50", *new_runs]
    run_kdlab("figures", "--ckpt-dir", tmp_path, "--out", tmp_path / "figures", "--device", "cpu")
    assert (tmp_path / "figures" / "training_losses.png").exists()
    (tmp_path / "report").mkdir()
    shutil.copy(REPO / "report" / "KD_LAB.tex", tmp_path / "report")
    run_kdlab("report", "--results", tmp_path, "--figures", tmp_path / "figures", "--report-dir", tmp_path / "report",
              "--runs", "teacher_resnet50", *new_runs, "--draft", "--no-pdf")
    config_table = (tmp_path / "report" / "generated" / "config_table.tex").read_text()
    assert "decoupled KD" in config_table and r"$\beta$ 4" in config_table and "attention transfer" in config_table


def test_smoke_runs_have_their_own_default_folder():
    # A smoke checkpoint in the real runs' folder would block `run all` ("made with another config").
    assert Lab(device="cpu").ckpt_dir == Path("checkpoints")
    assert Lab(device="cpu", smoke=True).ckpt_dir == Path("checkpoints/smoke")


def test_run_help_says_where_the_defaults_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--epochs", "--lr", "--batch-size"):
        help_text = text.split(option, 2)[2].split(" --", 1)[0]   # after the usage line
        assert "default: the run's recipe, kdlab/config.py" in help_text, option
    # a method setting's default is its method's (kdlab.registry), each method's named
    assert "logit KD and decoupled KD: softens both distributions (default 4.0)" in text
    assert "default: checkpoints, or checkpoints/smoke with --smoke" in text
