"""scripts/reference_run.py, the GPU plan: its trial end to end on the CPU, what a second session
skips because the first one's results are committed, its dry run (no torch), and its bad input.

The trial trains kdlab's synthetic smoke data at 32 px, 100 images, one epoch, seeds 42 and 43;
its numbers mean nothing, what it proves is the plan's bookkeeping.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from conftest import REPO

from kdlab.results import budget_matched_epochs, load_seed_ablation, load_seed_results, read_json

SCRIPT = REPO / "scripts" / "reference_run.py"
REFERENCE_TRIAL = [f"{run}{suffix}_results.json" for run in ("student_scratch_baseline", "student_scratch_kd_scores",
                                                              "student_scratch_kd_features", "student_scratch_dkd",
                                                              "student_scratch_at") for suffix in ("", "_seed43")]


def plan(*args, block_torch: bool = False) -> subprocess.CompletedProcess:
    """The script as a session runs it; with `block_torch`, importing torch fails."""
    argv = [str(SCRIPT), *map(str, args)]
    if block_torch:
        command = [sys.executable, "-c", "import runpy, sys; sys.modules['torch'] = None; "
                   f"sys.argv = {argv!r}; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"]
    else:
        command = [sys.executable, *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))


def session(tmp_path, name: str, committed, *args) -> tuple[dict, object]:
    """A trial call on a fresh machine (its own --ckpt-dir); returns its manifest and the folder
    results.tgz was extracted into, a checkout with what the call brought back."""
    out, ckpt = tmp_path / f"{name}-out", tmp_path / f"{name}-ckpt"
    result = plan("--trial", "--budget", 3000, "--committed", committed, "--ckpt-dir", ckpt, "--out", out, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    back = tmp_path / f"{name}-back"
    with tarfile.open(out / "results.tgz") as tar:
        tar.extractall(back, filter="data")
    return json.loads((out / "manifest.json").read_text()), back


@pytest.fixture(scope="module")
def first_session(tmp_path_factory):
    """Nothing committed: the reference, the T4 path, DKD and AT, the budget-matched baselines."""
    tmp = tmp_path_factory.mktemp("plan")
    (tmp / "empty").mkdir()
    manifest, back = session(tmp, "first", tmp / "empty", "--only", "reference", "t4", "dkd-at", "budget-baselines")
    return tmp, manifest, back


def test_the_first_session_brings_back_every_result_at_its_repository_path(first_session):
    _, manifest, back = first_session
    reference = back / "results" / "reference"
    assert sorted(p.name for p in reference.iterdir()) == sorted(REFERENCE_TRIAL + ["teacher_resnet50_results.json"])
    for folder in ("ablation-recipe/label-smoothing-0.1", "ablation-recipe/no-label-smoothing",
                   "ablation-precision/fp32", "ablation-precision/bf16"):
        assert len(list((back / "results" / folder).glob("*_results.json"))) == 1, folder
    assert read_json(back / "results/plan/manifest.json", "") == manifest
    assert "--- python scripts/reference_run.py --trial" in (back / "results/plan/run.log").read_text()
    tasks = manifest["calls"][-1]["tasks"]
    assert len(tasks) == 1 + 2 + 6 + 2 + 4 + 4   # the reference (teacher, ablation, students), t4, dkd-at, budget
    # The ablation's winner is the baseline's seed 42: loaded, not trained again.
    assert {name for name, t in tasks.items() if t["status"] != "trained"} == {"reference/student_scratch_baseline"}
    assert tasks["reference/student_scratch_baseline"]["status"] == "loaded"
    assert all(r["smoke"] for runs in load_seed_results(reference).values() for r in runs)


def test_dkd_and_attention_transfer_are_paired_with_the_baseline_of_each_seed(first_session):
    _, manifest, _ = first_session
    for run in ("student_scratch_dkd", "student_scratch_at"):
        paired = manifest["checks"]["dkd-at"][run]
        assert paired["seeds"] == [42, 43] and paired["ci_low"] <= paired["mean_difference"] <= paired["ci_high"]


def test_the_t4_item_records_both_precisions_and_the_scaler(first_session):
    """On a CPU the trial compares fp32 with bf16 autocast: a CPU has no fp16 path."""
    _, manifest, back = first_session
    check = manifest["checks"]["t4"]
    for precision in ("fp32", "bf16"):
        r = read_json(back / f"results/ablation-precision/{precision}/student_scratch_kd_scores_results.json", "")
        assert r["precision"] == precision and r["epochs"] == 1
        assert check[precision]["finite"] and check[precision]["skipped_steps"] is None   # no scaler but fp16's
    assert check["difference"] == pytest.approx(check["fp32"]["test_acc"] - check["bf16"]["test_acc"])
    assert check["within_tolerance"] == (abs(check["difference"]) <= 0.01)


def test_the_budget_matched_baselines_train_the_epochs_the_reference_files_give(first_session):
    _, manifest, back = first_session
    epochs = budget_matched_epochs(load_seed_results(back / "results" / "reference"))
    variants = load_seed_ablation(back / "results" / "ablation-budget")
    assert set(variants) == set(epochs) == {"equal-training-time", "teacher-plus-student-epochs"}
    for variant, runs in variants.items():
        assert [r["config"]["seed"] for r in runs] == [42, 43]
        assert {r["epochs"] for r in runs} == {epochs[variant]}
        assert {r["run"] for r in runs} == {"student_scratch_baseline"}
        assert manifest["checks"]["budget-baselines"][variant]["logit_kd_minus_it"]["seeds"] == [42, 43]
    assert epochs["teacher-plus-student-epochs"] == 1 + 1   # the trial's teacher and student epochs


def test_a_second_session_skips_what_is_committed_and_retrains_only_the_teacher(first_session):
    """A fresh machine with the first session's results committed: nothing done trains again; the
    sweep needs the reference teacher, which the machine lacks, so it is retrained first (the same
    seed on the CPU: the committed predictions exactly), draws the soft-targets figure the checkout
    lacks, and is copied into the sweep, which loads it.
    A longer teacher is ranked on validation beside the reference's."""
    tmp, first, committed = first_session
    manifest, back = session(tmp, "second", committed, "--only", "reference", "dkd-at", "budget-baselines", "sweep",
                             "stronger-teacher")
    call = manifest["calls"][-1]
    assert len(manifest["calls"]) == 2 and manifest["calls"][0] == first["calls"][0]
    assert {name: t["status"] for name, t in call["tasks"].items()} == {"sweep/temperature-alpha": "ran",
                                                                         "stronger-teacher/epochs-2": "trained"}
    ranked = manifest["checks"]["stronger-teacher"]["ranked_on_validation"]
    assert sorted(t["variant"] for t in ranked) == ["epochs-1 (reference)", "epochs-2"]
    assert ranked[0]["best_val_acc"] >= ranked[1]["best_val_acc"]
    teacher = call["teacher"]
    assert teacher["status"] == "retrained" and teacher["agreement_with_committed"] == 1.0
    assert teacher["test_acc"] == teacher["committed_test_acc"]
    # what the teacher knows, drawn from the retrained teacher while the checkout has no such figure
    assert (back / "figures/soft_targets.png").is_file()
    assert read_json(back / "results/plan/teacher/teacher_resnet50_results.json", "")["soft_target_examples"]
    sweep = read_json(back / "results/sweep-temperature-alpha/sweep.json", "")
    assert sweep["teacher"]["status"] == "loaded" and sweep["engine"] == "processes"
    assert [(t["run"], t["status"]) for t in sweep["trials"]] == [
        ("student_scratch_baseline", "trained"), ("student_scratch_kd_scores", "trained"),
        ("student_scratch_kd_scores", "trained")]
    assert not list(back.rglob("*.pt")), "checkpoints never come back"


def test_the_dry_run_says_what_is_done_without_torch(first_session):
    _, _, committed = first_session
    result = plan("--dry-run", "--trial", "--committed", committed, block_torch=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    status = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert all("done" in status[f"reference/{name}"] for name in ("teacher_resnet50", "student_scratch_kd_scores_seed43"))
    assert all("done" in status[f"dkd-at/student_scratch_{run}"] for run in ("dkd", "at_seed43"))
    assert "to do (+" in status["sweep-packing/one-per-gpu"]   # the teacher is not on a fresh machine
    assert "  $ python -m kdlab sweep student_scratch_kd_scores --seeds 43" in result.stdout


def test_the_gpu_plans_estimates_come_from_the_committed_results(tmp_path):
    """The reference committed and nothing after it: what the next GPU session would do."""
    for folder in ("reference", "ablation-recipe"):
        shutil.copytree(REPO / "results" / folder, tmp_path / "results" / folder)
    result = plan("--dry-run", "--committed", tmp_path, "--budget", 300, block_torch=True)
    assert result.returncode == 0, result.stderr
    status = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    reference = load_seed_results(REPO / "results" / "reference")
    manifest = read_json(REPO / "results/reference/manifest.json", "")
    rate = {run: sum(r["wall_seconds"] / r["epochs"] for r in runs) / len(runs) for run, runs in reference.items()}
    overheads = [r["seconds"] - r["training_seconds"] for name, r in manifest["runs"].items() if "teacher" not in name]
    overhead = sum(overheads) / len(overheads)
    teacher = 40 * rate["teacher_resnet50"] + manifest["runs"]["teacher_resnet50"]["seconds"] \
        - manifest["runs"]["teacher_resnet50"]["training_seconds"]
    equal_time = budget_matched_epochs(reference)["equal-training-time"]
    assert f"{equal_time * rate['student_scratch_baseline'] + overhead:5.0f} s  to do" in \
        status["budget-baselines/equal-training-time/student_scratch_baseline"]
    assert f"{3 * rate['student_scratch_kd_scores'] + overhead:5.0f} s  to do (+ {teacher:.0f} s: the teacher first)" \
        in status["t4/fp16"]
    assert "does not fit" in status["dkd-at/student_scratch_at_seed44"]
    assert all("done" in status[f"reference/{name}"] for name in ("teacher_resnet50", "student_scratch_kd_features_seed44"))


def test_a_task_that_does_not_fit_the_budget_is_skipped_and_named(tmp_path):
    result = plan("--trial", "--budget", 1, "--committed", tmp_path, "--ckpt-dir", tmp_path / "ckpt",
                  "--out", tmp_path / "out", "--only", "reference")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    tasks = manifest["calls"][-1]["tasks"]
    assert set(tasks) == {"reference/teacher_resnet50", "reference/ablation/label-smoothing-0.1",
                          "reference/ablation/no-label-smoothing"}   # the students wait for the ablation
    assert all(t["status"] == "skipped" and t["reason"].startswith("needs about") for t in tasks.values())


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be a number of seconds above 0, got 0"),
    (["--budget", "-60"], "--budget must be a number of seconds above 0, got -60"),
    (["--budget", "nan"], "--budget must be a number of seconds above 0, got nan"),
    (["--only", "teachers"], "no item teachers in the plan; its items: reference, t4"),
    ([], "--out is needed to run the plan"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = plan(*args, block_torch=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"reference_run: error: {message}") and result.stderr.count("\n") == 1


def test_the_report_of_the_trial_compares_logit_kd_with_the_budget_matched_baselines(first_session, tmp_path):
    """The trial's results, as a session brings them back, give the report its three comparisons."""
    from conftest import generated_macros
    from kdlab.report import make_report

    _, _, back = first_session
    make_report(back / "results" / "reference", tmp_path / "figures", tmp_path / "report", draft=True, pdf=False,
                budget_dir=back / "results" / "ablation-budget", log=lambda _: None)
    macros = generated_macros(tmp_path / "report")
    budget = macros["BudgetSentences"]
    assert "pending" not in budget and budget.count("a paired difference of") == 3
    for label in ("at equal epochs", "at equal training time", "at equal total epochs, the teacher's included"):
        assert label in budget
    assert "still open" not in macros["DistillationVerdict"]
