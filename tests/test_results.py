"""kdlab.results: reading a folder of results files, and the commands that only read files."""
import json
import math
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from kdlab.cli import main
from kdlab.errors import KdlabError
from kdlab.results import (EQUAL_TRAINING_TIME, RESULT_KEYS, TEACHER_PLUS_STUDENT_EPOCHS, budget_matched_epochs,
                           load_ablation, load_results, load_seed_ablation, load_seed_results, run_status, seeds_in)

RUN = "student_scratch_baseline"


def results_file(run=RUN, **changes):
    r = {key: None for key in RESULT_KEYS}
    r.update(dict(run=run, test_acc=0.5, best_val_acc=0.5, smoke=True, config={"seed": 42}), **changes)
    return json.dumps(r)


def test_an_empty_folder_has_no_results_and_runs_come_in_the_lab_order(tmp_path):
    assert load_results(tmp_path) == {}
    for run in ("student_scratch_kd_scores", RUN, "teacher_resnet50"):
        (tmp_path / f"{run}_results.json").write_text(results_file(run))
    (tmp_path / "notes_results.json").write_text("not a run's file: ignored")
    assert list(load_results(tmp_path)) == ["teacher_resnet50", RUN, "student_scratch_kd_scores"]


@pytest.mark.parametrize("content, message", [
    ("{truncated", f"not readable JSON .*copy it again .*delete it and run `python -m kdlab run {RUN} --ckpt-dir"),
    ("[1, 2]", "not a kdlab results file .*lacks run, test_acc"),
    (json.dumps({"run": RUN}), "lacks test_acc, best_val_acc"),
    (results_file("teacher_resnet50"), "holds the results of 'teacher_resnet50'; rename it teacher_resnet50_results.json"),
])
def test_a_damaged_or_foreign_results_file_says_what_to_do(tmp_path, content, message):
    (tmp_path / f"{RUN}_results.json").write_text(content)
    with pytest.raises(KdlabError, match=message):
        load_results(tmp_path)


def write_checkpoint_stub(path):
    """A zip, as torch.save writes: what `status` checks of a finished checkpoint."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"")


def test_run_status_reads_the_file_names(tmp_path):
    assert run_status(tmp_path, RUN) == "missing"
    (tmp_path / f"{RUN}_last.pt").write_bytes(b"")
    assert run_status(tmp_path, RUN) == "resumable"
    write_checkpoint_stub(tmp_path / f"{RUN}_best.pt")
    assert run_status(tmp_path, RUN) == "trained"


def test_status_calls_a_truncated_checkpoint_damaged(tmp_path, capsys):
    best = tmp_path / f"{RUN}_best.pt"
    write_checkpoint_stub(best)
    best.write_bytes(best.read_bytes()[:-10])   # an interrupted copy: the zip's directory is cut off
    assert main(["status", "--ckpt-dir", str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(RUN))
    assert line.split()[1] == "damaged" and str(best) in line and "--retrain" in line


def test_status_of_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    assert main(["status", "--ckpt-dir", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: ") and err.count("\n") == 1
    assert f"the checkpoint folder {tmp_path / 'typo'} does not exist" in err and "--smoke" in err


@pytest.mark.parametrize("args", [["--help"], ["status", "--ckpt-dir", "{tmp}"],
                                  ["report", "--report-dir", "{tmp}", "--no-pdf"]])
def test_commands_that_only_read_files_do_not_import_torch(tmp_path, args):
    """Importing torch takes seconds: `--help`, `status` and `report` answer without it."""
    args = [a.format(tmp=tmp_path) for a in args]
    shutil.copy(REPO / "report" / "KD_LAB.tex", tmp_path)   # the report's generated tables go next to it
    code = ("import sys; from kdlab.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_status_names_a_damaged_results_file_on_its_own_line(tmp_path, capsys):
    for run in (RUN, "teacher_resnet50"):
        write_checkpoint_stub(tmp_path / f"{run}_best.pt")
    (tmp_path / "teacher_resnet50_results.json").write_text(results_file("teacher_resnet50"))
    (tmp_path / f"{RUN}_results.json").write_text("{truncated")
    assert main(["status", "--ckpt-dir", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "test 0.5000" in lines["teacher_resnet50"] and "(smoke)" in lines["teacher_resnet50"]
    assert "results file unusable" in lines[RUN] and "not readable JSON" in lines[RUN]
    assert lines["student_scratch_kd_scores"].split()[1] == "missing"


def test_seeds_have_their_own_files_and_load_together_in_seed_order(tmp_path):
    for seed in (7, 42, 3):
        name = RUN if seed == 42 else f"{RUN}_seed{seed}"
        (tmp_path / f"{name}_results.json").write_text(results_file(config={"seed": seed}, test_acc=seed / 100))
    (tmp_path / f"{RUN}_seed9_last.pt").write_bytes(b"")
    assert seeds_in(tmp_path, RUN) == [42, 3, 7, 9]
    assert seeds_in(tmp_path, "student_scratch_kd_scores") == []
    assert run_status(tmp_path, RUN, 9) == "resumable" and run_status(tmp_path, RUN, 5) == "missing"
    assert [r["test_acc"] for r in load_seed_results(tmp_path)[RUN]] == [0.03, 0.07, 0.42]
    assert list(load_results(tmp_path)) == [RUN] and load_results(tmp_path)[RUN]["test_acc"] == 0.42
    out = subprocess.run([sys.executable, "-m", "kdlab", "status", "--ckpt-dir", tmp_path], cwd=REPO,
                         capture_output=True, text=True, timeout=120).stdout
    assert f"{RUN}_seed9 " in out and "resumable" in out and f"{RUN}_seed3 " in out


def test_a_results_file_under_another_seeds_name_is_refused(tmp_path):
    (tmp_path / f"{RUN}_seed3_results.json").write_text(results_file(config={"seed": 4}))
    with pytest.raises(KdlabError, match=f"'{RUN}_seed4'; rename it {RUN}_seed4_results.json"):
        load_seed_results(tmp_path)


def test_the_same_run_and_seed_twice_with_other_settings_is_never_averaged(tmp_path):
    first, second = tmp_path / f"{RUN}_results.json", tmp_path / f"{RUN}_seed42_results.json"
    first.write_text(results_file(config={"seed": 42, "lr": 0.4}))
    second.write_text(results_file(config={"seed": 42, "lr": 0.4}))
    assert len(load_seed_results(tmp_path)[RUN]) == 1          # a copy: read once
    second.write_text(results_file(config={"seed": 42, "lr": 0.2}))
    with pytest.raises(KdlabError) as err:
        load_seed_results(tmp_path)
    assert str(first) in str(err.value) and str(second) in str(err.value) and "lr" in str(err.value)


def test_status_smoke_reads_the_smoke_runs_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "smoke").mkdir(parents=True)
    write_checkpoint_stub(tmp_path / "checkpoints" / "smoke" / f"{RUN}_best.pt")
    assert main(["status", "--smoke"]) == 0
    states = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert states[RUN] == "trained" and states["teacher_resnet50"] == "missing"
    assert main(["status"]) == 0
    states = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert states[RUN] == "missing", "a smoke run is never listed as a real one"


def test_an_ablation_variant_holds_one_run_at_several_seeds(tmp_path):
    """results/ablation-budget/<variant>/: a variant's seeds load together; the default seed is its
    row in the one-seed view; two runs in one variant are refused."""
    for variant, seeds in (("equal-training-time", (42, 43, 44)), ("teacher-plus-student-epochs", (42, 43))):
        (tmp_path / variant).mkdir()
        for seed in seeds:
            name = RUN if seed == 42 else f"{RUN}_seed{seed}"
            (tmp_path / variant / f"{name}_results.json").write_text(
                results_file(test_acc=seed / 100, config={"seed": seed, "epochs": len(variant)}))
    variants = load_seed_ablation(tmp_path)
    assert {v: [r["config"]["seed"] for r in runs] for v, runs in variants.items()} == {
        "equal-training-time": [42, 43, 44], "teacher-plus-student-epochs": [42, 43]}
    assert {v: r["test_acc"] for v, r in load_ablation(tmp_path).items()} == {
        "equal-training-time": 0.42, "teacher-plus-student-epochs": 0.42}
    (tmp_path / "equal-training-time" / "student_scratch_kd_scores_results.json").write_text(
        results_file("student_scratch_kd_scores"))
    with pytest.raises(KdlabError, match="must hold the results files of one run, found 2 runs"):
        load_seed_ablation(tmp_path)


def test_an_ablation_variant_without_the_default_seed_has_no_one_seed_row(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / f"{RUN}_seed43_results.json").write_text(results_file(config={"seed": 43}))
    assert list(load_seed_ablation(tmp_path)) == ["v"]
    with pytest.raises(KdlabError, match="no results file of the default seed 42"):
        load_ablation(tmp_path)


def test_budget_matched_epochs_come_from_the_reference_results():
    """Equal training time: logit KD's mean wall time over the baseline's mean time per epoch,
    rounded down (49.5 s / 1.43 s: 34 epochs in the committed reference); teacher plus student: the
    two runs' epochs (40 + 20)."""
    reference = load_seed_results(REPO / "results" / "reference")
    kd, base = reference["student_scratch_kd_scores"], reference[RUN]
    kd_seconds = sum(r["wall_seconds"] for r in kd) / len(kd)
    per_epoch = sum(r["wall_seconds"] / r["epochs"] for r in base) / len(base)
    epochs = budget_matched_epochs(reference)
    assert epochs[EQUAL_TRAINING_TIME] == math.floor(kd_seconds / per_epoch)
    assert epochs[TEACHER_PLUS_STUDENT_EPOCHS] == reference["teacher_resnet50"][0]["epochs"] + kd[0]["epochs"]
    with pytest.raises(KdlabError, match="need the results of teacher_resnet50"):
        budget_matched_epochs({RUN: base, "student_scratch_kd_scores": kd})

