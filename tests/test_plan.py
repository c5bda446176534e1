"""scripts/reference_run.py, the GPU plan: its trial end to end on the CPU with the kept teacher (a
first call keeps it, a second loads it), what a call skips because earlier results are committed,
that no kill point loses a finished task, its bookkeeping with a stand-in runner, its dry run (no
torch), and its bad input.

The trial trains kdlab's synthetic smoke data at 16 px, 40 images, one epoch, seeds 42 and 43;
its numbers mean nothing, what it proves is the plan's bookkeeping.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import REPO

from kdlab.results import budget_matched_epochs, load_seed_ablation, load_seed_results, read_json

SCRIPT = REPO / "scripts" / "reference_run.py"
REFERENCE_TRIAL = [f"{run}{suffix}_results.json" for run in ("student_scratch_baseline", "student_scratch_kd_scores",
                                                              "student_scratch_kd_features", "student_scratch_dkd",
                                                              "student_scratch_at") for suffix in ("", "_seed43")]
TEACHER_KEPT = "checkpoints/reference/teacher_resnet50"
CALL_TIMEOUT_S = 900   # a trial call on a busy 2-core machine; a hang fails instead of hanging the suite


def plan(*args, block_torch: bool = False) -> subprocess.CompletedProcess:
    """The script as a user runs it; with `block_torch`, importing torch fails."""
    argv = [str(SCRIPT), *map(str, args)]
    if block_torch:
        command = [sys.executable, "-c", "import runpy, sys; sys.modules['torch'] = None; "
                   f"sys.argv = {argv!r}; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"]
    else:
        command = [sys.executable, *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=CALL_TIMEOUT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))


def bring_back(out, back) -> None:
    """What a session does with a call's output: results.tgz unpacked, the kept parts beside their manifests."""
    with tarfile.open(out / "results.tgz") as tar:
        tar.extractall(back, filter="data")
    for folder in (out / "weights").glob("*"):
        for part in folder.iterdir():
            shutil.copy(part, back / "checkpoints" / "reference" / folder.name / part.name)


def call(tmp_path, name: str, committed, *args) -> tuple[dict, object, object]:
    """A trial call on a fresh machine (its own --ckpt-dir); returns its manifest, its --out, and the
    folder its output was brought back into, a checkout with what the call brought back."""
    out, ckpt = tmp_path / f"{name}-out", tmp_path / f"{name}-ckpt"
    result = plan("--trial", "--budget", 3000, "--committed", committed, "--ckpt-dir", ckpt, "--out", out, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    back = tmp_path / f"{name}-back"
    bring_back(out, back)
    return json.loads((out / "manifest.json").read_text()), out, back


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    """Nothing committed: the teacher (kept), the reference, the T4 path, DKD and AT, the budget-matched baselines."""
    tmp = tmp_path_factory.mktemp("plan")
    (tmp / "empty").mkdir()
    manifest, out, back = call(tmp, "first", tmp / "empty",
                               "--only", "teacher", "reference", "t4", "dkd-at", "budget-baselines")
    return tmp, manifest, out, back


def kept_sha(back) -> str:
    return read_json(back / TEACHER_KEPT / "manifest.json", "")["tensors_sha256"]


def test_the_first_call_keeps_the_teacher_it_trains_and_brings_its_parts_back(first_call):
    _, manifest, out, back = first_call
    tasks = manifest["calls"][-1]["tasks"]
    assert list(tasks)[0] == "teacher/teacher_resnet50" and tasks["teacher/teacher_resnet50"]["status"] == "trained"
    kept = read_json(back / TEACHER_KEPT / "manifest.json", "")
    parts = sorted((out / "weights" / "teacher_resnet50").iterdir())
    assert [p.name for p in parts] == [part["name"] for part in kept["parts"]]
    assert all(p.stat().st_size <= 15 * 2 ** 20 for p in parts)
    assert hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest() == kept["sha256"]
    with tarfile.open(out / "results.tgz") as tar:   # the parts come back on their own, never in the archive
        assert not [name for name in tar.getnames() if ".part" in name]
    assert kept["float16_within_tolerance"] and manifest["checks"]["teacher"]["tensors_sha256"] == kept["tensors_sha256"]
    teacher = read_json(back / "results/reference/teacher_resnet50_results.json", "")
    assert teacher["kept_weights"]["tensors_sha256"] == kept["tensors_sha256"]


def test_the_first_call_brings_back_every_result_at_its_repository_path(first_call):
    _, manifest, _, back = first_call
    reference = back / "results" / "reference"
    assert sorted(p.name for p in reference.iterdir()) == sorted(REFERENCE_TRIAL + ["teacher_resnet50_results.json"])
    for folder in ("ablation-recipe/label-smoothing-0.1", "ablation-recipe/no-label-smoothing",
                   "ablation-precision/fp32", "ablation-precision/bf16"):
        assert len(list((back / "results" / folder).glob("*_results.json"))) == 1, folder
    assert read_json(back / "results/plan/manifest.json", "") == manifest
    assert "--- python scripts/reference_run.py --trial" in (back / "results/plan/run.log").read_text()
    tasks = manifest["calls"][-1]["tasks"]
    assert len(tasks) == 1 + 2 + 6 + 2 + 4 + 4   # teacher, reference (ablation, students), t4, dkd-at, budget
    # The ablation's winner is the baseline's seed 42: loaded, not trained again.
    assert {name for name, t in tasks.items() if t["status"] != "trained"} == {"reference/student_scratch_baseline"}
    assert tasks["reference/student_scratch_baseline"]["status"] == "loaded"
    assert all(r["smoke"] for runs in load_seed_results(reference).values() for r in runs)


def test_every_distilled_run_names_the_kept_teacher(first_call):
    _, manifest, _, back = first_call
    distilled = [r for folder in ("results/reference", "results/ablation-precision/fp32")
                 for runs in load_seed_results(back / folder).values() for r in runs if r["teacher"]]
    assert len(distilled) == 4 * 2 + 1   # logit KD, FitNets, DKD, AT at two seeds; the T4 run
    assert {r["teacher"]["weights_sha256"] for r in distilled} == {kept_sha(back)}


def test_dkd_and_attention_transfer_are_paired_with_the_baseline_of_each_seed(first_call):
    _, manifest, _, _ = first_call
    for run in ("student_scratch_dkd", "student_scratch_at"):
        paired = manifest["checks"]["dkd-at"][run]
        assert paired["seeds"] == [42, 43] and paired["ci_low"] <= paired["mean_difference"] <= paired["ci_high"]


def test_the_t4_item_records_both_precisions_and_the_scaler(first_call):
    """On a CPU the trial compares fp32 with bf16 autocast: a CPU has no fp16 path."""
    _, manifest, _, back = first_call
    check = manifest["checks"]["t4"]
    for precision in ("fp32", "bf16"):
        r = read_json(back / f"results/ablation-precision/{precision}/student_scratch_kd_scores_results.json", "")
        assert r["precision"] == precision and r["epochs"] == 1
        assert check[precision]["finite"] and check[precision]["skipped_steps"] is None   # no scaler but fp16's
    assert check["difference"] == pytest.approx(check["fp32"]["test_acc"] - check["bf16"]["test_acc"])
    assert check["within_tolerance"] == (abs(check["difference"]) <= 0.01)


def test_the_budget_matched_baselines_train_the_epochs_the_reference_files_give(first_call):
    _, manifest, _, back = first_call
    epochs = budget_matched_epochs(load_seed_results(back / "results" / "reference"))
    variants = load_seed_ablation(back / "results" / "ablation-budget")
    assert set(variants) == set(epochs) == {"equal-training-time", "teacher-plus-student-epochs"}
    for variant, runs in variants.items():
        assert [r["config"]["seed"] for r in runs] == [42, 43]
        assert {r["epochs"] for r in runs} == {epochs[variant]}
        assert {r["run"] for r in runs} == {"student_scratch_baseline"}
        assert manifest["checks"]["budget-baselines"][variant]["logit_kd_minus_it"]["seeds"] == [42, 43]
    assert epochs["teacher-plus-student-epochs"] == 1 + 1   # the trial's teacher and student epochs


@pytest.fixture(scope="module")
def second_call(first_call):
    """A fresh machine with the first call's output committed, less its DKD results: the kept teacher is
    loaded, never trained; DKD distils it again, the packing sweeps distil it in their own processes,
    and the one-teacher item keeps logit KD at seed 42."""
    tmp, first, _, back = first_call
    committed = shutil.copytree(back, tmp / "second-committed")
    for dkd in (committed / "results/reference").glob("student_scratch_dkd*"):
        dkd.unlink()
    manifest, out, back = call(tmp, "second", committed, "--only", "teacher", "dkd-at", "sweep-packing", "one-teacher")
    return first, manifest, out, back, committed


def test_a_second_call_loads_the_kept_teacher_and_trains_none(second_call):
    first, manifest, _, back, committed = second_call
    latest = manifest["calls"][-1]
    assert len(manifest["calls"]) == 2 and manifest["calls"][0] == first["calls"][0]
    assert {name: t["status"] for name, t in latest["tasks"].items()} == {
        "dkd-at/student_scratch_dkd": "trained", "dkd-at/student_scratch_dkd_seed43": "trained",
        "sweep-packing/one-per-gpu": "ran", "sweep-packing/four-per-gpu": "ran",
        "one-teacher/student_scratch_kd_scores": "trained"}
    log = (back / "results/plan/run.log").read_text().split("--- python scripts/reference_run.py")[-1]
    assert "teacher_resnet50: loaded the kept weights" in log and "teacher_resnet50: training" not in log
    for seed in ("", "_seed43"):
        dkd = read_json(back / f"results/reference/student_scratch_dkd{seed}_results.json", "")
        assert dkd["teacher"]["weights_sha256"] == kept_sha(committed)
    for name in ("one-per-gpu", "four-per-gpu"):
        sweep = read_json(back / f"results/sweep-packing/{name}/sweep.json", "")
        assert sweep["teacher"]["status"] == "kept" and sweep["engine"] == "processes"
        assert sweep["teacher"]["weights_sha256"] == kept_sha(committed)
        assert sweep["options"]["teacher_weights"].endswith(TEACHER_KEPT)
    assert "gain" in manifest["checks"]["sweep-packing"]
    assert not list(back.rglob("*.pt")), "checkpoints never come back"


def test_the_one_teacher_item_keeps_logit_kd_at_the_default_seed(second_call):
    _, manifest, out, back, committed = second_call
    student = read_json(back / "checkpoints/reference/student_scratch_kd_scores/manifest.json", "")
    assert student["run"] == "student_scratch_kd_scores" and student["config"]["seed"] == 42
    assert sorted(p.name for p in (out / "weights/student_scratch_kd_scores").iterdir()) == [
        part["name"] for part in student["parts"]]
    check = manifest["checks"]["one-teacher"]
    assert check["one_teacher"] and check["kept_teacher"] == kept_sha(committed)


def test_the_dry_run_says_what_is_done_and_what_the_next_call_runs_without_torch(first_call):
    _, _, _, committed = first_call
    result = plan("--dry-run", "--trial", "--committed", committed, block_torch=True)
    assert result.returncode == 0, result.stderr
    status = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert "done" in status["teacher/teacher_resnet50"] and "done" in status["reference/student_scratch_kd_scores_seed43"]
    assert "reference teacher kept (checkpoints/reference/teacher_resnet50): yes" in result.stdout
    assert "runs in the next call" in status["sweep-packing/one-per-gpu"]
    assert "  $ python -m kdlab sweep student_scratch_kd_scores --seeds 43" in result.stdout
    assert "sweep: waits for the packing gain (sweep-packing)" in result.stdout
    assert "calls left for the tasks known now: " in result.stdout


def committed_reference(tmp_path, with_teacher: bool):
    """The repository's reference results, with or without its kept teacher."""
    for folder in ("reference", "ablation-recipe"):
        shutil.copytree(REPO / "results" / folder, tmp_path / "results" / folder)
    if with_teacher:
        shutil.copytree(REPO / TEACHER_KEPT, tmp_path / TEACHER_KEPT)
    return tmp_path


def test_the_gpu_plans_estimates_come_from_the_committed_results(tmp_path):
    """The reference and its kept teacher committed, nothing after it: what the next GPU call would do."""
    result = plan("--dry-run", "--committed", committed_reference(tmp_path, True), "--budget", 300, block_torch=True)
    assert result.returncode == 0, result.stderr
    status = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    reference = load_seed_results(REPO / "results" / "reference")
    manifest = read_json(REPO / "results/reference/manifest.json", "")
    rate = {run: sum(r["wall_seconds"] / r["epochs"] for r in runs) / len(runs) for run, runs in reference.items()}
    overheads = [r["seconds"] - r["training_seconds"] for name, r in manifest["runs"].items() if "teacher" not in name]
    overhead = sum(overheads) / len(overheads)
    equal_time = budget_matched_epochs(reference)["equal-training-time"]
    assert f"{equal_time * rate['student_scratch_baseline'] + overhead:5.0f} s" in \
        status["budget-baselines/equal-training-time/student_scratch_baseline"]
    assert f"{3 * rate['student_scratch_kd_scores'] + overhead:5.0f} s" in status["t4/fp16"]
    assert "done" in status["teacher/teacher_resnet50"] and "done" in status["reference/student_scratch_kd_features_seed44"]
    assert "a later call" in status["one-teacher/student_scratch_kd_features_seed44"]   # the lowest priority
    assert "reference teacher kept (checkpoints/reference/teacher_resnet50): yes" in result.stdout


def test_a_call_without_the_kept_teacher_trains_it_first(tmp_path):
    result = plan("--dry-run", "--committed", committed_reference(tmp_path, False), block_torch=True)
    assert result.returncode == 0, result.stderr
    next_call = next(line for line in result.stdout.splitlines() if line.startswith("the next call"))
    assert next_call.split(": ", 2)[2].startswith("teacher/teacher_resnet50, ")


def test_a_task_that_does_not_fit_the_budget_is_skipped_and_named(tmp_path):
    result = plan("--trial", "--budget", 1, "--committed", tmp_path, "--ckpt-dir", tmp_path / "ckpt",
                  "--out", tmp_path / "out", "--only", "teacher", "reference")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    tasks = manifest["calls"][-1]["tasks"]
    assert set(tasks) == {"teacher/teacher_resnet50", "reference/ablation/label-smoothing-0.1",
                          "reference/ablation/no-label-smoothing"}   # the students wait for the ablation
    assert all(t["status"] == "skipped" and t["reason"].startswith("needs about") for t in tasks.values())


def test_a_call_killed_in_its_second_task_leaves_the_first_tasks_results(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--trial", "--committed", tmp_path / "empty",
                                "--ckpt-dir", tmp_path / "ckpt", "--out", out, "--only", "reference"],
                               cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = "results/ablation-recipe/label-smoothing-0.1/student_scratch_baseline_results.json"
    try:
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not (out / "results.tgz").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the call ended before it could be killed in its second task"
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
        assert first in names and json.load(tar.extractfile(first))["run"] == "student_scratch_baseline"
        assert "results/ablation-recipe/no-label-smoothing/student_scratch_baseline_results.json" not in names


# ----------------------------------------------------------------------------- with a stand-in runner

@pytest.fixture
def script(monkeypatch):
    """The script as a module (registered: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("reference_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reference_run", module)
    spec.loader.exec_module(module)
    return module


def plan_in_process(script, tmp_path, *only, committed=None):
    args = argparse.Namespace(data_dir=str(tmp_path / "data"), ckpt_dir=str(tmp_path / "ckpt"), out=str(tmp_path / "out"),
                              budget=3000.0, committed=str(committed or tmp_path / "empty"), only=list(only),
                              dry_run=False, trial=True)
    return script.Plan(args, script.TRIAL)


def test_a_task_that_raises_is_marked_failed_and_the_next_one_runs(script, tmp_path, monkeypatch):
    """The benchmark's two commands, the first raising ValueError (a results file it could not read):
    the second still runs, and only it gets its completion marker."""
    ran = []

    def command(self, work):
        ran.append(work.outputs[0])
        if len(ran) == 1:
            raise ValueError("a results file without 'test_acc'")
        for output in work.outputs:
            (self.staging / output).parent.mkdir(parents=True, exist_ok=True)
            (self.staging / output).write_text("{}")
        return dict(status="ran")

    monkeypatch.setattr(script.Plan, "command", command)
    the_plan = plan_in_process(script, tmp_path, "benchmark")
    assert the_plan.run() == 1
    tasks = json.loads((tmp_path / "out" / "manifest.json").read_text())["calls"][-1]["tasks"]
    assert tasks["benchmark/throughput-full"]["status"] == "failed"
    assert tasks["benchmark/throughput-full"]["error"] == "ValueError: a results file without 'test_acc'"
    assert tasks["benchmark/lab-time"]["status"] == "ran" and len(ran) == 2
    assert (tmp_path / "ckpt/out/results/plan/done/benchmark/lab-time").is_file()
    assert not (tmp_path / "ckpt/out/results/plan/done/benchmark/throughput-full").exists()


def test_a_partial_benchmark_is_not_done_until_its_marker_is_written(script, tmp_path):
    the_plan = plan_in_process(script, tmp_path, "benchmark")
    task = next(t for item in the_plan.builder("cpu").items() for t in item.tasks if t.name == "benchmark/throughput-full")
    partial = the_plan.staging / task.work.outputs[0]
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps(dict(mode="full", sections=["forward"])))   # what a benchmark stopped halfway leaves
    assert not the_plan.done(task)
    the_plan.mark_done(task)
    assert the_plan.done(task)


def test_trial_and_gpu_calls_never_share_a_folder(script, tmp_path):
    plan_in_process(script, tmp_path).check_mode()
    result = plan("--ckpt-dir", tmp_path / "ckpt", "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert f"{tmp_path / 'ckpt'} holds a trial call's files and this is a gpu call" in result.stderr
    assert "written under /tmp/kdlab-plan-trial/out\n" in plan("--trial", "--dry-run").stdout   # the defaults differ


def test_the_plan_is_a_table_in_priority_order_with_the_packed_sweep_at_its_packed_cost(script, tmp_path):
    committed = committed_reference(tmp_path / "committed", True)
    items = plan_in_process(script, tmp_path, committed=committed).builder("h200").items()
    assert tuple(item.name for item in items) == script.ITEMS
    assert items[0].name == "teacher" and [t.name for t in items[0].tasks] == ["teacher/teacher_resnet50"]
    # with a measured packing gain, the sweep costs its trials one by one divided by it
    for name, seconds in (("one-per-gpu", 400), ("four-per-gpu", 100)):
        folder = committed / "results/sweep-packing" / name
        folder.mkdir(parents=True)
        (folder / "sweep.json").write_text(json.dumps(dict(
            started="2026-01-01T00:00:00+00:00", finished=f"2026-01-01T00:{seconds // 60:02d}:{seconds % 60:02d}+00:00",
            teacher=None, trials=[dict(run="student_scratch_kd_scores", status="trained")] * 2)))
    the_plan = plan_in_process(script, tmp_path, committed=committed)
    builder = the_plan.builder("h200")
    sweep = next(item for item in builder.items() if item.name == "sweep").tasks[0]
    _, one_by_one, _ = builder.sweep_command("sweep-temperature-alpha", ["student_scratch_baseline",
                                                                          "student_scratch_kd_scores"],
                                             script.TRIAL.sweep_seeds, script.TRIAL.sweep_grid, 0.25, ("", {}))
    assert sweep.estimate == pytest.approx(one_by_one / 4)


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be a number of seconds above 0, got 0"),
    (["--budget", "-60"], "--budget must be a number of seconds above 0, got -60"),
    (["--budget", "nan"], "--budget must be a number of seconds above 0, got nan"),
    (["--only", "teachers"], "no item teachers in the plan; its items: teacher, reference, t4"),
    ([], "--out is needed to run the plan"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = plan(*args, block_torch=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"reference_run: error: {message}") and result.stderr.count("\n") == 1


def test_the_report_of_the_trial_compares_logit_kd_with_the_budget_matched_baselines(first_call, tmp_path):
    """The trial's results, as a call brings them back, give the report its three comparisons."""
    from conftest import generated_macros
    from kdlab.report import make_report

    _, _, _, back = first_call
    make_report(back / "results" / "reference", tmp_path / "figures", tmp_path / "report", draft=True, pdf=False,
                budget_dir=back / "results" / "ablation-budget", log=lambda _: None)
    macros = generated_macros(tmp_path / "report")
    budget = macros["BudgetSentences"]
    assert "pending" not in budget and budget.count("a paired difference of") == 3
    for label in ("at equal epochs", "at equal training time", "at equal total epochs, the teacher's included"):
        assert label in budget
    assert "still open" not in macros["DistillationVerdict"]
