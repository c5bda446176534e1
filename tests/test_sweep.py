"""Sweeps (kdlab.sweep): trials on a local Ray, in worker processes and in this process, a killed
trial, the figure.

One local Ray with 2 CPUs serves the whole file (starting one takes seconds). Every trial trains
on one torch thread: two trials of two threads each on two cores slow each other badly, and
the thread count is part of what makes a CPU run reproducible, which the serial-against-Ray
test needs. Trials are tiny smoke runs: 20 synthetic images, 16 px, 2 epochs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import one_ray_at_a_time

from kdlab.cli import main
from kdlab.config import TEACHER_RUN
from kdlab.errors import KdlabError
from kdlab.lab import Lab
from kdlab.registry import NoSettings
from kdlab.results import RunPaths, read_results_file
from kdlab.sweep import (ProcessEngine, RayEngine, SerialEngine, SweepOptions, Trial, expand_trials, parse_grid,
                         run_sweep, start_ray)

REPO = Path(__file__).resolve().parents[1]
BASELINE, LOGIT_KD, FEATURE_KD = "student_scratch_baseline", "student_scratch_kd_scores", "student_scratch_kd_features"
TINY = dict(limit_train=20, batch_size=10, epochs=2)
SEEDS = [42, 43]
GRID = {"temperature": [2.0, 4.0]}


def tiny_options(out: Path, **changes) -> SweepOptions:
    return SweepOptions(out, device="cpu", smoke=True, cpus_per_trial=1, overrides=dict(TINY, **changes))


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    with one_ray_at_a_time(tmp_path_factory):
        threads = torch.get_num_threads()
        ray = start_ray(num_cpus=2)
        yield ray
        ray.shutdown()
        torch.set_num_threads(threads)   # the serial engine set this process's threads to one


@pytest.fixture(scope="module")
def ray_sweep(local_ray, tmp_path_factory):
    """2 runs x 2 seeds x 2 temperatures on the local Ray, and what it printed."""
    out = tmp_path_factory.mktemp("ray_sweep")
    lines = []
    sweep = run_sweep([BASELINE, LOGIT_KD], SEEDS, GRID, tiny_options(out), RayEngine(), log=lines.append)
    return out, sweep, lines


# ----------------------------------------------------------------------------- trials, no training

def test_a_setting_multiplies_only_the_runs_that_read_it():
    grid = parse_grid(["temperature=1,2,4,8", "alpha=0.5,0.9,1", "hint-weight=0.5,2"])
    trials = expand_trials([BASELINE, LOGIT_KD, FEATURE_KD], SEEDS, grid)
    per_run = {run: sum(t.run == run for t in trials) for run in (BASELINE, LOGIT_KD, FEATURE_KD)}
    assert per_run == {BASELINE: 2, LOGIT_KD: 4 * 3 * 2, FEATURE_KD: 2 * 2}
    assert Trial(LOGIT_KD, 43, (("temperature", 2.0), ("alpha", 0.9))).folder == \
        f"trials/{LOGIT_KD}/temperature=2,alpha=0.9"
    assert Trial(BASELINE, 42).folder == f"trials/{BASELINE}/recipe"


@pytest.mark.parametrize("spec, message", [("lr=0.1,0.2", "cannot sweep 'lr'"),
                                           ("temperature=", "has no values"),
                                           ("alpha=high", "must be a number")])
def test_a_bad_grid_is_one_line_that_says_what_to_do(spec, message):
    with pytest.raises(KdlabError, match=message):
        parse_grid([spec])


def test_the_teacher_is_not_a_trial():
    with pytest.raises(KdlabError, match="trains the teacher once"):
        expand_trials([TEACHER_RUN], SEEDS, {})


def test_a_student_setting_never_changes_the_teacher_it_loads(tmp_path):
    lab = Lab(tmp_path / "student", device="cpu", smoke=True, teacher_dir=tmp_path / "teacher",
              temperature=2.0, alpha=0.5, hint_weight=3.0)
    teacher = lab.config(TEACHER_RUN)
    assert teacher.settings == NoSettings(), "the teacher reads no method setting"
    assert lab.config(LOGIT_KD).settings.temperature == 2.0 and lab.teacher_dir == tmp_path / "teacher"


def test_ray_engine_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now raises ImportError
    code = main(["sweep", BASELINE, "--smoke", "--device", "cpu", "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "pip install -r requirements-sweep.txt" in err and "--engine serial" in err


@pytest.mark.parametrize("options, message", [
    (["--engine", "processes", "--address", "auto"], "--address is for --engine ray"),
    (["--engine", "serial", "--gpus-per-trial", "0.5"], "--gpus-per-trial is for --engine ray or processes"),
    (["--engine", "processes", "--gpus-per-trial", "2"], "gives a trial one GPU at most"),
])
def test_engine_options_that_do_not_go_together_are_one_line(tmp_path, capsys, options, message):
    assert main(["sweep", BASELINE, "--smoke", "--device", "cpu", "--out", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_lab_never_imports_ray():
    code = ("import sys, kdlab.cli, kdlab.lab, kdlab.figures, kdlab.report, kdlab.sweep; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                   timeout=120)


# ----------------------------------------------------------------------------- sweeps that train

def test_ray_sweep_trains_every_trial_once_and_the_teacher_before_them(ray_sweep):
    out, sweep, lines = ray_sweep
    trials = sweep["trials"]
    # The baseline does not read the temperature: once per seed, not once per temperature.
    assert [(r["run"], r["seed"], r["settings"]) for r in trials] == [
        (BASELINE, 42, {}), (BASELINE, 43, {}),
        (LOGIT_KD, 42, {"temperature": 2.0}), (LOGIT_KD, 43, {"temperature": 2.0}),
        (LOGIT_KD, 42, {"temperature": 4.0}), (LOGIT_KD, 43, {"temperature": 4.0})]
    assert sweep["teacher"]["status"] == "trained" and sweep["teacher"]["folder"] == "teacher"
    assert [r["status"] for r in trials] == ["trained"] * 6 and not any(r["error"] for r in trials)
    assert json.loads((out / "sweep.json").read_text())["trials"] == trials
    teacher = read_results_file(RunPaths(out / "teacher", TEACHER_RUN).results, TEACHER_RUN)
    for record in trials:
        r = read_results_file(out / record["results"], record["run"], record["seed"])
        assert r["test_acc"] == record["test_acc"] and r["smoke"]
        if record["run"] == LOGIT_KD:
            assert r["config"]["temperature"] == record["settings"]["temperature"]
            assert r["teacher"]["test_acc"] == teacher["test_acc"]   # the sweep's one teacher
        assert (out / record["log"]).is_file()
    assert not list((out / "trials").rglob(f"{TEACHER_RUN}*")), "a trial trained its own teacher"
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == [f"[{n}/7" for n in range(1, 8)]
    assert all("elapsed" in line and "left" in line for line in progress)


@pytest.mark.parametrize("engine", [SerialEngine, lambda: ProcessEngine(cpus_per_trial=1)], ids=["serial", "processes"])
def test_serial_and_processes_engines_give_the_same_results_as_ray(ray_sweep, tmp_path, engine):
    """The processes engine: two spawned workers on the 2-core machine (no GPU), one thread each.
    Compared on the Ray sweep's two logit-KD trials of seed 42 and their teacher (of its seven
    trainings): the path of a trial that reads a setting and loads the sweep's teacher."""
    ray_out, ray_result, _ = ray_sweep
    other = run_sweep([LOGIT_KD], SEEDS[:1], GRID, tiny_options(tmp_path), engine(), log=lambda line: None)
    assert other["engine"] == engine().name
    # Where each trial trained: one Ray node for the local Ray; this machine, no Ray node, for the others.
    assert len({r["trained_on"]["ray_node_id"] for r in [ray_result["teacher"], *ray_result["trials"]]}) == 1
    assert {(r["trained_on"]["host"], r["trained_on"]["ray_node_id"], r["trained_on"]["device"])
            for r in [other["teacher"], *other["trials"]]} == {(socket.gethostname(), None, "cpu")}
    on_ray_by_trial = {Trial.of(r): r for r in ray_result["trials"]}
    assert [Trial.of(r) for r in other["trials"]] == [Trial(LOGIT_KD, 42, (("temperature", t),)) for t in (2.0, 4.0)]
    for ray_record, other_record in [(on_ray_by_trial[Trial.of(r)], r) for r in other["trials"]] + [
            (ray_result["teacher"], other["teacher"])]:
        on_ray, here = (read_results_file(out / r["results"], r["run"], r["seed"])
                        for out, r in ((ray_out, ray_record), (tmp_path, other_record)))
        assert on_ray["test_acc"] == here["test_acc"] and on_ray["test_predictions"] == here["test_predictions"]
        assert [{k: v for k, v in h.items() if k != "seconds"} for h in on_ray["history"]] == \
               [{k: v for k, v in h.items() if k != "seconds"} for h in here["history"]]


def test_figure_draws_accuracy_against_each_swept_setting(ray_sweep, tmp_path, capsys):
    out, _, _ = ray_sweep
    assert main(["figures", "--sweep", str(out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_killed_trial_is_reported_and_the_rerun_resumes_it_alone(local_ray, tmp_path, capsys):
    """Two seeds of the baseline at once; seed 43's process is killed after its first epoch."""
    args = ["sweep", BASELINE, "--seeds", "42", "43", "--smoke", "--device", "cpu", "--out", str(tmp_path),
            "--limit-train", "40", "--batch-size", "10", "--epochs", "4"]
    victim = RunPaths(tmp_path / Trial(BASELINE, 43).folder, BASELINE, 43)
    killed = []

    def kill_after_the_first_epoch():
        deadline = time.monotonic() + 300
        while not (victim.last.exists() and victim.lock_file.exists()) and time.monotonic() < deadline:
            time.sleep(0.01)
        pid = int(victim.lock_file.read_text().split()[0])   # the Ray worker training it
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_after_the_first_epoch, daemon=True)
    killer.start()
    assert main(args) == 2
    killer.join()
    captured = capsys.readouterr()
    assert killed and "1 trial(s) failed" in captured.err
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    status = {r["seed"]: r for r in sweep["trials"]}
    assert status[42]["status"] == "trained" and status[43]["status"] == "failed"
    assert "died" in status[43]["error"].lower() or "crash" in status[43]["error"].lower(), status[43]["error"]
    assert "seed 43: FAILED" in captured.out and status[43]["log"] in captured.out
    assert victim.last.exists() and not victim.best.exists()

    finished = RunPaths(tmp_path / Trial(BASELINE, 42).folder, BASELINE, 42).best
    stamp = finished.stat().st_mtime_ns
    assert main(args) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["seed"]: r["status"] for r in sweep["trials"]} == {42: "loaded", 43: "trained"}
    assert finished.stat().st_mtime_ns == stamp
    assert "resuming after epoch" in (tmp_path / status[43]["log"]).read_text()
    assert len(read_results_file(victim.results, BASELINE, 43)["history"]) == 4
