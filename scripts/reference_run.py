"""The GPU plan: the reference's runs and measurements, as many as fit one call of --budget seconds.

    KDLAB_COMMIT=<commit> python3 scripts/reference_run.py --data-dir data --ckpt-dir /dev/shm/kd --out OUT --budget 570

(KDLAB_COMMIT names the commit, which a copy without .git cannot tell: the manifest and the
benchmark files record it.) It works through the items below in priority order within --budget
seconds, counted from the process start. An item is a list of tasks, each a run of the lab or a
command line, with the files it writes in this repository, its done check and its estimated
seconds (PlanBuilder.items() is that table). A task whose files are committed (under --committed,
by default this checkout) or were written by an earlier call with the same --ckpt-dir is done
and skipped, so consecutive calls continue the plan instead of repeating it. A task whose estimate
does not fit the time left is skipped and named in the manifest; the next one that fits runs.

  teacher           the reference teacher (ResNet50 from scratch, 40 epochs, seed 42), trained once and
                    kept: its best weights come back as float16 parts (checkpoints/reference/
                    teacher_resnet50/, kdlab.kept), and every student of the plan distils them
  reference         the label-smoothing ablation that picks the students' recipe on validation
                    (results/ablation-recipe/); the scratch baseline, logit KD and feature KD at seeds
                    42, 43, 44 (results/reference/)
  t4                a Colab T4's path: logit KD from scratch, 3 epochs, seed 42 (the same batches), at
                    fp16 with a loss scaler and at bf16 (results/ablation-precision/<precision>/);
                    checked: both finite, test accuracy within 1 point, the scaler's skipped steps
  dkd-at            decoupled KD and attention transfer from scratch at seeds 42-44, distilled from the
                    kept teacher (results/reference/), each paired with the baseline of its seed
  efficiency        the efficiency table measured on the GPU for every run of results/reference/
                    (figures/efficiency.json: the figures are then redrawn anywhere with
                    `python -m kdlab figures --efficiency-from figures`)
  budget-baselines  the baseline given logit KD's budget, seeds 42-44: as many epochs as fit in logit
                    KD's training time, and the teacher's plus the student's epochs
                    (results/ablation-budget/<variant>/; kdlab.results.budget_matched_epochs)
  benchmark         benchmarks/throughput.py in full on the GPU, the speed levers on and off in the same
                    run (benchmarks/results/<gpu>-full-levers.json), and the six-run lab's wall time at its
                    default settings (--lab-time: benchmarks/results/<gpu>-lab-time.json)
  sweep-packing     the same 8 logit-KD trials (seed 44, temperature 1, 2, 4, 8 x alpha 0.5, 0.9; 10
                    epochs) one per GPU, then four per GPU: the packing gain in trials per hour
                    (results/sweep-packing/)
  sweep             temperature x alpha: the baseline and 24 logit-KD trials at seeds 42, 43, 10 epochs,
                    four per GPU (results/sweep-temperature-alpha/); it waits for the packing gain
  stronger-teacher  the teacher at 60 and 80 epochs, ranked on validation beside the 40-epoch one
                    (results/ablation-teacher/epochs-<N>/); augmentation waits for a switch in kdlab.data
  recipe-lr         the previous recipe's LR (0.2) as the last row of the recipe ablation
  one-teacher       logit KD and feature KD at seeds 42-44 distilled again from the kept teacher, so that
                    every distillation run of results/reference/ has one teacher; logit KD at seed 42 is
                    kept too (checkpoints/reference/student_scratch_kd_scores/: the student to deploy)

The sweeps run `python -m kdlab sweep --engine processes --teacher-weights <kept teacher>`: the
GPU machine has no Ray, and the processes engine packs trials on a GPU as Ray's
`--gpus-per-trial 0.25` does.

A call that finds no kept teacher trains it first, before any task that needs it, and that task's
estimate includes it; tasks that need no teacher never wait for it. Once kept, the teacher is
loaded (joined and checked by sha256), never trained again; its float16 copy's test accuracy is
measured on the GPU beside the float32 weights', and every distilled run's results file records
the teacher's sha256. Distilling tasks count as done only when their results name the kept teacher.

Estimates: the seconds per epoch of each step kind and per run on top (test, checkpoints), from
the committed reference's results files and manifest (results/reference/), each replaced by what
this call measures once a run of its kind has trained. Decoupled KD is estimated as logit KD,
attention transfer as feature KD (the same networks and passes; their losses cost little beside
them). The benchmark costs what the longest committed full benchmark on this GPU took, the
lab's wall time its six runs at those rates, the efficiency table what the previous script
reserved for the figures (30 s); the packed sweep costs its trials one after another divided by
the packing gain sweep-packing measured. A task that ran before in the plan (stopped by the
budget, say) is estimated at no less than it took. The fit is checked again after the teacher.

Nothing finished is lost: every task's exception is logged and the task marked failed, the plan
going on; a command's output counts as done only with the completion marker the plan writes when
it ended well (results/plan/done/<task>: a benchmark stopped halfway leaves a partial file, which
is not done); results.tgz is rewritten after every task to a temporary file and renamed. A trial
and a GPU call never share a --ckpt-dir: the first call marks it, and a call of the other mode is
refused.

Written under --out: results.tgz, every file the tasks wrote at its path in this repository
(`tar xzf OUT/results.tgz` from the repository root adds them), with results/plan/manifest.json
(every call: the tasks it ran, loaded, skipped or saw fail, estimated and measured seconds, the
kept weights' accuracies; the items' checks) and results/plan/run.log; manifest.json, the same
manifest, to read at once; and weights/<run>/weights.fp16.partNN, the parts of the weights kept in
this call, which go into checkpoints/reference/<run>/ beside the manifest results.tgz brought.

    --dry-run   the items, what is done, every task's estimate, what the next call runs and how many
                calls the known tasks take: no GPU, no torch
    --trial     a CPU check of this script end to end: kdlab's synthetic smoke data at 16 px, one epoch,
                seeds 42 and 43, sweeps of a few trials; the T4 item compares fp32 with the CPU's bf16
                autocast (a CPU has no fp16 path). Its output is never a result.
    --only      the items to work on, by name (default: all)
"""
from __future__ import annotations

import time

PROCESS_START = time.monotonic()   # the budget counts from here: the imports and data reading are in it

import argparse
import copy
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdlab.config import DEFAULT_SEED, LAB_RUNS, RUNS, TEACHER_RUN, make_config, run_id, run_of  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402
from kdlab.registry import METHODS  # noqa: E402
from kdlab.results import (EQUAL_TRAINING_TIME, KEPT_MANIFEST, KEPT_PART_PREFIX, REFERENCE_WEIGHTS,  # noqa: E402
                           TEACHER_PLUS_STUDENT_EPOCHS,
                           RunPaths, budget_matched_epochs, load_efficiency, load_seed_results, read_json)
from kdlab.stats import paired_difference, training_seed  # noqa: E402
from kdlab.sweep import SWEEP_FILE, expand_trials, failures, parse_grid  # noqa: E402

BASELINE = run_of("ce", "scratch")
LOGIT_KD, FEATURE_KD = run_of("kd_logits", "scratch"), run_of("kd_features", "scratch")
DKD, ATTENTION = run_of("dkd", "scratch"), run_of("attention", "scratch")
# Variants of the scratch baseline at seed 42 that choose the students' label smoothing.
LABEL_SMOOTHING_VARIANTS = {"label-smoothing-0.1": dict(label_smoothing=0.1),
                            "no-label-smoothing": dict(label_smoothing=0.0)}
ESTIMATES_FROM = REPO / "results" / "reference"   # the committed reference: seconds per epoch
PLAN_DIR = "results/plan"                          # the plan's manifest and log, in the repository
# Decoupled KD and attention transfer have not run on a GPU: estimated as the method whose
# networks and passes they share.
COST_OF = {"dkd": "kd_logits", "attention": "kd_features"}
EFFICIENCY_FIRST_GUESS_S = 30   # what the previous reference script reserved for the figures
RESERVE_S = 25                  # stopping a command (stop(): 10 s at most), then packing results.tgz
KEPT = REFERENCE_WEIGHTS.as_posix()   # kept weights in the repository: <KEPT>/<run>/ (kdlab.kept)
WEIGHTS_OUT = "weights"         # under --out: <run>/<part>, each part a file the device brings back
FP16_TOLERANCE = 0.0005         # the float16 copy's test accuracy within 0.05 points of the float32 weights
T4_TOLERANCE = 0.01             # fp16 and bf16 test accuracy within 1 point


@dataclass(frozen=True)
class Scale:
    """The sizes of a GPU plan, and of its CPU trial."""
    seeds: tuple[int, ...] = (42, 43, 44)
    lab: dict = field(default_factory=dict)   # overrides of every run
    teacher_epochs: int = make_config(TEACHER_RUN, weights="none").epochs
    smoke: bool = False                       # kdlab's synthetic data
    device: str = "cuda"
    t4_epochs: int = 3
    t4_precisions: tuple[str, ...] = ("fp16", "bf16")
    sweep_epochs: int = 10
    sweep_seeds: tuple[int, ...] = (42, 43)
    sweep_grid: tuple[str, ...] = ("temperature=1,2,4,8", "alpha=0.5,0.9,1.0")
    packing_seed: int = 44
    packing_grid: tuple[str, ...] = ("temperature=1,2,4,8", "alpha=0.5,0.9")
    cpus_per_trial: int = 2
    stronger_teacher_epochs: tuple[int, ...] = (60, 80)


GPU_PLAN = Scale()
TRIAL = Scale(seeds=(42, 43), lab=dict(epochs=1, limit_train=40, batch_size=20), teacher_epochs=1,
              smoke=True, device="cpu",
              t4_epochs=1, t4_precisions=("fp32", "bf16"), sweep_epochs=1, sweep_seeds=(42,),
              sweep_grid=("temperature=1,4",), packing_seed=43, packing_grid=("temperature=1,4",),
              cpus_per_trial=1, stronger_teacher_epochs=(2,))


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Training:
    """One run of the lab, train-or-load in <ckpt-dir>/<folder>, its results file copied to the
    repository folder `results`. Students distil the kept reference teacher (<KEPT>/teacher_resnet50).
    `keep`: the run's best weights come back as kept weights (<KEPT>/<run>/, kdlab.kept)."""
    run: str
    seed: int
    folder: str
    results: str
    overrides: dict = field(default_factory=dict)   # the Lab's: every run of the lab plus these
    teacher_epochs: int | None = None               # None: the reference teacher's
    precision: str | None = None                    # None: the lab's choice (auto)
    keep: bool = False

    @property
    def outputs(self) -> tuple[str, ...]:
        kept = (f"{KEPT}/{self.run}/{KEPT_MANIFEST}",) if self.keep else ()
        return (f"{self.results}/{run_id(self.run, self.seed)}_results.json", *kept)

    @property
    def needs_teacher(self) -> bool:
        return METHODS[RUNS[self.run].method].uses_teacher

    @property
    def epochs(self) -> int:
        return self.teacher_epochs if self.run == TEACHER_RUN else self.overrides["epochs"]

    @property
    def kind(self) -> str:
        return "teacher" if self.run == TEACHER_RUN else RUNS[self.run].method


@dataclass(frozen=True)
class Command:
    """A command line run from the repository root. `collect` copies the files it left under
    <ckpt-dir> (checkpoints excepted) into the repository: (file or folder under ckpt-dir, its
    path in the repository) pairs. `needs_teacher`: its argv names the kept reference teacher
    (--teacher-weights), which must exist first; `merge` a repository folder whose committed and new
    files are gathered in <ckpt-dir>/view first."""
    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    collect: tuple[tuple[str, str], ...] = ()
    needs_teacher: bool = False
    merge: str | None = None


@dataclass(frozen=True)
class Task:
    item: str
    name: str            # unique in the plan; the manifest's key
    work: Training | Command
    estimate: float      # seconds, without the teacher's
    # Done when every output exists and `complete(tree)` says so (a sweep with no failed trial, a
    # student distilled from the kept teacher); a command without one is done once the plan has
    # written its completion marker, after the command ended well (a benchmark stopped halfway
    # leaves a partial file, which is not done).
    complete: Callable[["Tree"], bool] | None = None

    @property
    def marker(self) -> str:
        return f"{PLAN_DIR}/done/{self.name}"


@dataclass
class Item:
    name: str
    tasks: list[Task]
    waiting: str | None = None                           # why it has no tasks yet
    check: Callable[["Tree"], dict] | None = None         # what its results say, for the manifest


# ----------------------------------------------------------------------------- where results are

@dataclass
class Tree:
    """The repository's results as this call sees them: the committed files, and over them the
    files this machine wrote (the staging folder that results.tgz packs)."""
    committed: Path
    staging: Path

    def find(self, path: str) -> Path | None:
        for root in (self.staging, self.committed):
            if (root / path).is_file():
                return root / path
        return None

    def seed_results(self, folder: str) -> dict[str, list[dict]]:
        """Every seed's results of every run in a repository folder, committed or new."""
        found: dict[tuple[str, int], dict] = {}
        for root in (self.committed, self.staging):     # the new files win
            if (root / folder).is_dir():
                for run, runs in load_seed_results(root / folder).items():
                    found.update({(run, training_seed(r)): r for r in runs})
        by_run: dict[str, list[dict]] = {}
        for (run, _), r in sorted(found.items(), key=lambda entry: (list(RUNS).index(entry[0][0]), entry[0][1])):
            by_run.setdefault(run, []).append(r)
        return by_run

    def results(self, folder: str, run: str, seed: int = DEFAULT_SEED) -> dict | None:
        return next((r for r in self.seed_results(folder).get(run, []) if training_seed(r) == seed), None)

    def kept(self, run: str) -> dict | None:
        """The manifest of a run's kept weights, new or committed; None if there are none."""
        path = self.find(f"{KEPT}/{run}/{KEPT_MANIFEST}")
        return read_json(path, "restore it from git.") if path else None

    def kept_folder(self, run: str) -> Path:
        """Where a run's kept weights are: committed, or written here (or to be written here)."""
        path = self.find(f"{KEPT}/{run}/{KEPT_MANIFEST}")
        return path.parent if path else self.staging / KEPT / run

    def merge(self, folder: str, into: Path) -> Path:
        """A real folder holding the committed and new files of `folder` (new ones win)."""
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        for root in (self.committed, self.staging):
            if (root / folder).is_dir():
                for path in (root / folder).iterdir():
                    if path.is_file():
                        shutil.copy(path, into / path.name)
        return into


# ----------------------------------------------------------------------------- estimates

class Rates:
    """Seconds per epoch of each kind of run, and per run on top of its epochs."""

    def __init__(self, reference: Path = ESTIMATES_FROM):
        per_epoch: dict[str, list[float]] = {}
        for runs in load_seed_results(reference).values():
            for r in runs:
                kind = "teacher" if r["run"] == TEACHER_RUN else RUNS[r["run"]].method
                per_epoch.setdefault(kind, []).append(r["wall_seconds"] / r["epochs"])
        self.per_epoch = {kind: sum(s) / len(s) for kind, s in per_epoch.items()}
        manifest = read_json(reference / "manifest.json", "restore it from git.")
        extra = {name: run["seconds"] - run["training_seconds"] for name, run in manifest["runs"].items()}
        students = [s for name, s in extra.items() if name != TEACHER_RUN]
        self.overhead = {"teacher": extra[TEACHER_RUN], "student": sum(students) / len(students)}
        self.gpu = manifest["gpu"]

    def epoch(self, kind: str) -> float:
        return self.per_epoch.get(kind) or self.per_epoch[COST_OF[kind]]

    def run(self, kind: str, epochs: int) -> float:
        return epochs * self.epoch(kind) + self.overhead["teacher" if kind == "teacher" else "student"]

    def measured(self, work: Training, results: dict, seconds: float) -> None:
        """A run this call trained: its kind's rates from now on are what it took here."""
        self.per_epoch[work.kind] = results["wall_seconds"] / results["epochs"]
        self.overhead["teacher" if work.kind == "teacher" else "student"] = max(0.0, seconds - results["wall_seconds"])

    def describe(self) -> str:
        rates = ", ".join(f"{kind} {s:.2f}" for kind, s in sorted(self.per_epoch.items()))
        return (f"{self.gpu}; seconds per epoch: {rates}; per run on top: {self.overhead['student']:.1f} "
                f"(the teacher's {self.overhead['teacher']:.1f})")


def sweep_wall_seconds(sweep: dict) -> float:
    started, finished = (datetime.datetime.fromisoformat(sweep[key]) for key in ("started", "finished"))
    return (finished - started).total_seconds()


def from_kept_teacher(path: str) -> Callable[[Tree], bool]:
    """A distilled run's results count only if its teacher is the kept reference teacher."""
    def complete(tree: Tree) -> bool:
        kept = tree.kept(TEACHER_RUN)
        results = read_json(tree.find(path), "delete it: its task runs again.")
        return kept is not None and (results.get("teacher") or {}).get("weights_sha256") == kept["tensors_sha256"]
    return complete


def sweep_complete(path: str) -> Callable[[Tree], bool]:
    def complete(tree: Tree) -> bool:
        sweep = read_json(tree.find(path), "delete it: the sweep's task runs again.")
        return bool(sweep.get("finished")) and not failures(sweep)
    return complete


# ----------------------------------------------------------------------------- the items

class PlanBuilder:
    """The items as the results found so far define them: built again after every task, so an
    item that waits for another's results (the recipe, the reference's times) starts once they exist."""

    def __init__(self, scale: Scale, tree: Tree, rates: Rates, ckpt: Path, data_dir: Path, gpu: str,
                 earlier_seconds: dict[str, float]):
        self.scale, self.tree, self.rates, self.ckpt, self.data_dir = scale, tree, rates, ckpt, data_dir
        self.gpu, self.earlier_seconds = gpu, earlier_seconds

    def task(self, item: str, name: str, work, estimate: float, complete=None) -> Task:
        full = f"{item}/{name}"
        return Task(item, full, work, max(estimate, self.earlier_seconds.get(full, 0.0)), complete)

    def training(self, item: str, name: str, work: Training, from_kept_teacher_only: bool = False) -> Task:
        """A run's task, with the scale's settings under its own and its recipe's epochs by default.
        `from_kept_teacher_only`: a distilled run's results are done only if the kept teacher taught it."""
        overrides = dict(self.scale.lab, **work.overrides)
        overrides.setdefault("epochs", make_config(work.run, weights="none").epochs)
        work = replace(work, overrides=overrides, teacher_epochs=work.teacher_epochs or self.scale.teacher_epochs)
        complete = from_kept_teacher(work.outputs[0]) if from_kept_teacher_only else None
        return self.task(item, name, work, self.rates.run(work.kind, work.epochs), complete)

    def items(self) -> list[Item]:
        """The plan as data: every item in priority order, each a list of tasks with their outputs,
        done check and estimate."""
        recipe = self.student_recipe()
        return [self.teacher(), self.reference(recipe), self.t4(recipe), self.dkd_at(recipe), self.efficiency(),
                self.budget_baselines(recipe), self.benchmark(), *self.sweeps(recipe),
                self.stronger_teacher(), self.recipe_lr(recipe), self.one_teacher(recipe)]

    def teacher(self) -> Item:
        """The reference teacher, trained once and kept: every student of the plan distils it."""
        work = Training(TEACHER_RUN, DEFAULT_SEED, "reference", "results/reference", keep=True)
        return Item("teacher", [self.training("teacher", TEACHER_RUN, work)], check=kept_check)

    # The students' recipe: the label smoothing its ablation chose on validation.
    def student_recipe(self) -> tuple[str, dict] | None:
        found = {v: self.tree.results(f"results/ablation-recipe/{v}", BASELINE) for v in LABEL_SMOOTHING_VARIANTS}
        if any(r is None for r in found.values()):
            return None
        chosen = max(found, key=lambda v: found[v]["best_val_acc"])
        return chosen, LABEL_SMOOTHING_VARIANTS[chosen]

    def reference(self, recipe) -> Item:
        tasks = [self.training("reference", f"ablation/{variant}",
                                Training(BASELINE, DEFAULT_SEED, f"ablation/{variant}",
                                         f"results/ablation-recipe/{variant}", overrides))
                  for variant, overrides in LABEL_SMOOTHING_VARIANTS.items()]
        if recipe is None:
            return Item("reference", tasks, waiting="the students wait for the label-smoothing ablation")
        chosen, overrides = recipe
        seeds = self.scale.seeds
        # The logit-KD question (baseline against logit KD, paired by seed) first; the ablation's
        # winner is the baseline's default seed, loaded from its folder.
        order = ([(BASELINE, DEFAULT_SEED), (LOGIT_KD, DEFAULT_SEED)]
                 + [(run, seed) for seed in seeds[1:] for run in (BASELINE, LOGIT_KD)]
                 + [(FEATURE_KD, seed) for seed in seeds])
        for run, seed in order:
            folder = f"ablation/{chosen}" if (run, seed) == (BASELINE, DEFAULT_SEED) else "reference"
            tasks.append(self.training("reference", run_id(run, seed),
                                       Training(run, seed, folder, "results/reference", overrides)))
        return Item("reference", tasks, check=lambda tree: paired_checks(tree, [LOGIT_KD, FEATURE_KD]))

    def t4(self, recipe) -> Item:
        if recipe is None:
            return Item("t4", [], waiting="waits for the students' recipe (reference)")
        tasks = [self.training("t4", precision, Training(
            LOGIT_KD, DEFAULT_SEED, f"precision/{precision}", f"results/ablation-precision/{precision}",
            dict(recipe[1], epochs=self.scale.t4_epochs), precision=precision), from_kept_teacher_only=True)
            for precision in self.scale.t4_precisions]
        return Item("t4", tasks, check=lambda tree: t4_check(tree, self.scale.t4_precisions))

    def dkd_at(self, recipe) -> Item:
        if recipe is None:
            return Item("dkd-at", [], waiting="waits for the students' recipe (reference)")
        tasks = [self.training("dkd-at", run_id(run, seed), Training(run, seed, "reference", "results/reference",
                                                                     recipe[1]), from_kept_teacher_only=True)
                 for seed in self.scale.seeds for run in (DKD, ATTENTION)]
        return Item("dkd-at", tasks, check=lambda tree: paired_checks(tree, [DKD, ATTENTION]))

    def efficiency(self) -> Item:
        runs = set(self.tree.seed_results("results/reference"))
        out = self.ckpt / "figures"
        argv = (sys.executable, "-m", "kdlab", "figures", "--results-dir", str(self.ckpt / "view" / "reference"),
                "--ckpt-dir", str(self.ckpt / "reference"), "--out", str(out), "--device", self.scale.device)

        def complete(tree: Tree) -> bool:
            measured = load_efficiency(tree.find("figures/efficiency.json").parent)
            return runs <= set(measured["runs"])

        tables = ("figures/efficiency.json", "figures/efficiency.md")   # the figures are the lead's to draw
        work = Command(argv, tables, tuple((path, path) for path in tables), merge="results/reference")
        return Item("efficiency", [self.task("efficiency", "efficiency.json", work, EFFICIENCY_FIRST_GUESS_S,
                                             complete)])

    def budget_baselines(self, recipe) -> Item:
        if recipe is None:
            return Item("budget-baselines", [], waiting="waits for the students' recipe (reference)")
        reference = self.tree.seed_results("results/reference")
        lacking = [run_id(run, seed) for run in (BASELINE, LOGIT_KD) for seed in self.scale.seeds
                   if seed not in {training_seed(r) for r in reference.get(run, [])}]
        if lacking or TEACHER_RUN not in reference:
            return Item("budget-baselines", [], waiting=f"waits for the reference's results "
                                                        f"({', '.join(lacking) or TEACHER_RUN})")
        epochs = budget_matched_epochs(reference)
        tasks = [self.training("budget-baselines", f"{variant}/{run_id(BASELINE, seed)}", Training(
            BASELINE, seed, f"ablation-budget/{variant}", f"results/ablation-budget/{variant}",
            dict(recipe[1], epochs=epochs[variant])))
            for variant in (EQUAL_TRAINING_TIME, TEACHER_PLUS_STUDENT_EPOCHS) for seed in self.scale.seeds]
        return Item("budget-baselines", tasks, check=lambda tree: budget_check(tree, epochs))

    def benchmark(self) -> Item:
        """The full benchmark (the speed levers on and off in the same run) and the six-run lab's wall time."""
        tiny = ("--tiny",) if self.scale.smoke else ()
        note = ("--note", "the GPU plan (scripts/reference_run.py)")
        full, lab_time = (f"benchmarks/results/{self.gpu}-{name}.json" for name in ("full-levers", "lab-time"))
        throughput = (sys.executable, "benchmarks/throughput.py", "--device", self.scale.device)
        # The longest committed full benchmark on the GPU of the estimates, or on any GPU.
        committed = [read_json(path, "restore it from git.") for path in (REPO / "benchmarks/results").glob("*.json")]
        committed = [b for b in committed if b.get("mode") == "full" and "wall_seconds" in b]
        took = max((b["wall_seconds"] for b in committed if b["device_name"] == self.rates.gpu),
                   default=max(b["wall_seconds"] for b in committed))
        # The lab's runs at their default settings, at the committed seconds per epoch of their kind.
        lab = sum(self.rates.run("teacher" if run == TEACHER_RUN else RUNS[run].method, make_config(run).epochs)
                  for run in LAB_RUNS)
        return Item("benchmark", [
            self.task("benchmark", "throughput-full", Command(
                (*throughput, *tiny, *(("--no-compile",) if self.scale.smoke else ()),
                 "--json", str(self.tree.staging / full), *note), (full,)), took),
            self.task("benchmark", "lab-time", Command(
                (*throughput, "--lab-time", *tiny, "--json", str(self.tree.staging / lab_time), *note), (lab_time,)),
                lab)])

    def sweep_command(self, name: str, runs: list[str], seeds, grid, gpus_per_trial: float, recipe) -> tuple:
        """A `kdlab sweep` on this machine's GPU, distilling the kept teacher, and its one-by-one estimate."""
        flags = dict(self.scale.lab, **recipe[1], epochs=self.scale.sweep_epochs,
                     teacher_epochs=self.scale.teacher_epochs, weights="none")
        argv = (sys.executable, "-m", "kdlab", "sweep", *runs, "--seeds", *map(str, seeds),
                *(arg for spec in grid for arg in ("--grid", spec)),
                *(arg for key, value in flags.items() for arg in (f"--{key.replace('_', '-')}", str(value))),
                *(("--smoke",) if self.scale.smoke else ()), "--device", "auto" if self.scale.device == "cuda" else "cpu",
                "--engine", "processes", "--gpus-per-trial", str(gpus_per_trial),
                "--cpus-per-trial", str(self.scale.cpus_per_trial), "--data-dir", str(self.data_dir),
                "--teacher-weights", str(self.tree.kept_folder(TEACHER_RUN)), "--out", str(self.ckpt / "sweeps" / name))
        output = f"results/{name}"
        trials = expand_trials(runs, list(seeds), parse_grid(list(grid)))
        one_by_one = sum(self.rates.run(RUNS[t.run].method, self.scale.sweep_epochs) for t in trials)
        work = Command(argv, (f"{output}/{SWEEP_FILE}",), ((f"sweeps/{name}", output),), needs_teacher=True)
        return work, one_by_one, sweep_complete(f"{output}/{SWEEP_FILE}")

    def sweeps(self, recipe) -> list[Item]:
        if recipe is None:
            return [Item(name, [], waiting="waits for the students' recipe (reference)")
                    for name in ("sweep-packing", "sweep")]
        packing_tasks = []
        for name, gpus in (("one-per-gpu", 1.0), ("four-per-gpu", 0.25)):
            work, seconds, complete = self.sweep_command(f"sweep-packing/{name}", [LOGIT_KD], [self.scale.packing_seed],
                                                         self.scale.packing_grid, gpus, recipe)
            packing_tasks.append(self.task("sweep-packing", name, work, seconds, complete))
        packing = Item("sweep-packing", packing_tasks, check=packing_check)
        gain = packing_check(self.tree).get("gain")
        if gain is None:   # its cost is its trials one by one divided by the gain: not known before
            return [packing, Item("sweep", [], waiting="waits for the packing gain (sweep-packing)")]
        work, seconds, complete = self.sweep_command("sweep-temperature-alpha", [BASELINE, LOGIT_KD],
                                                     self.scale.sweep_seeds, self.scale.sweep_grid, 0.25, recipe)
        return [packing, Item("sweep", [self.task("sweep", "temperature-alpha", work, seconds / gain, complete)])]

    def stronger_teacher(self) -> Item:
        tasks = [self.training("stronger-teacher", f"epochs-{epochs}", Training(
            TEACHER_RUN, DEFAULT_SEED, f"ablation-teacher/epochs-{epochs}", f"results/ablation-teacher/epochs-{epochs}",
            teacher_epochs=epochs)) for epochs in self.scale.stronger_teacher_epochs]
        return Item("stronger-teacher", tasks, check=teacher_check)

    def recipe_lr(self, recipe) -> Item:
        if recipe is None:
            return Item("recipe-lr", [], waiting="waits for the students' recipe (reference)")
        return Item("recipe-lr", [self.training("recipe-lr", "lr-0.2", Training(
            BASELINE, DEFAULT_SEED, "ablation/lr-0.2", "results/ablation-recipe/lr-0.2", dict(recipe[1], lr=0.2)))])

    def one_teacher(self, recipe) -> Item:
        """Logit KD and FitNets at every seed distilled again from the kept teacher, so that every
        distillation run of results/reference has one teacher; logit KD at the default seed is kept
        (the student a user deploys)."""
        if recipe is None:
            return Item("one-teacher", [], waiting="waits for the students' recipe (reference)")
        tasks = [self.training("one-teacher", run_id(run, seed), Training(
            run, seed, "one-teacher", "results/reference", recipe[1], keep=(run, seed) == (LOGIT_KD, DEFAULT_SEED)),
            from_kept_teacher_only=True)
            for run in (LOGIT_KD, FEATURE_KD) for seed in self.scale.seeds]
        return Item("one-teacher", tasks, check=one_teacher_check)


ITEMS = ("teacher", "reference", "t4", "dkd-at", "efficiency", "budget-baselines", "benchmark", "sweep-packing",
         "sweep", "stronger-teacher", "recipe-lr", "one-teacher")


# ----------------------------------------------------------------------------- what the results say

def paired_checks(tree: Tree, runs: list[str]) -> dict:
    """Each run against the baseline of the same seeds, over the seeds both have."""
    reference = tree.seed_results("results/reference")
    return {run: summary(paired_difference(reference[run], reference[BASELINE]))
            for run in runs if reference.get(run) and reference.get(BASELINE)}


def kept_check(tree: Tree) -> dict:
    """The kept teacher: its accuracy as trained and as kept in float16, and its identity."""
    kept = tree.kept(TEACHER_RUN)
    if kept is None:
        return {}
    return {key: kept.get(key) for key in ("test_acc", "test_acc_float32_here", "test_acc_float16",
                                           "float16_within_tolerance", "tensors_sha256", "bytes")}


def one_teacher_check(tree: Tree) -> dict:
    """The teachers of results/reference's distilled runs: one sha256 (the kept teacher's) once the
    re-distilled runs are in."""
    kept = tree.kept(TEACHER_RUN)
    teachers = {run_id(run, training_seed(r)): (r.get("teacher") or {}).get("weights_sha256")
                for run, runs in tree.seed_results("results/reference").items() for r in runs if r.get("teacher")}
    return dict(kept_teacher=kept and kept["tensors_sha256"], teachers=teachers,
                one_teacher=bool(kept) and set(teachers.values()) == {kept["tensors_sha256"]})


def summary(paired: dict) -> dict:
    return {key: paired[key] for key in ("seeds", "mean_difference", "ci_low", "ci_high", "excludes_zero")}


def t4_check(tree: Tree, precisions: tuple[str, ...]) -> dict:
    runs = {p: tree.results(f"results/ablation-precision/{p}", LOGIT_KD) for p in precisions}
    found = {p: r for p, r in runs.items() if r is not None}
    check = {p: dict(test_acc=r["test_acc"], precision=r.get("precision"),
                     finite=math.isfinite(r["test_loss"]) and all(
                         math.isfinite(value) for h in r["history"] for value in h["losses"].values()),
                     steps=r["epochs"] * (r["n_train"] // r["config"]["batch_size"]),
                     **loss_scaler(r["history"]))
             for p, r in found.items()}
    if len(found) == len(precisions):
        a, b = (found[p]["test_acc"] for p in precisions)
        check.update(difference=a - b, within_tolerance=abs(a - b) <= T4_TOLERANCE,
                     passed=all(c["finite"] for c in check.values()) and abs(a - b) <= T4_TOLERANCE)
    return check


def loss_scaler(history: list[dict]) -> dict:
    """The steps fp16's loss scaler skipped and its last scale; None for both without a scaler."""
    skipped = [h.get("skipped_steps") for h in history]
    if all(s is None for s in skipped):
        return dict(skipped_steps=None, loss_scale=None)
    return dict(skipped_steps=sum(s or 0 for s in skipped), loss_scale=history[-1].get("loss_scale"))


def budget_check(tree: Tree, epochs: dict[str, int]) -> dict:
    """Logit KD against each budget-matched baseline, paired by seed (the report's comparisons)."""
    kd = tree.seed_results("results/reference").get(LOGIT_KD, [])
    check = {}
    for variant, n in epochs.items():
        runs = tree.seed_results(f"results/ablation-budget/{variant}").get(BASELINE, [])
        check[variant] = dict(epochs=n, seeds=[training_seed(r) for r in runs])
        if runs and kd:
            check[variant]["logit_kd_minus_it"] = summary(paired_difference(kd, runs))
    return check


def packing_check(tree: Tree) -> dict:
    """Trials per hour of the same trials one per GPU and four per GPU, from each sweep.json."""
    rates = {}
    for name in ("one-per-gpu", "four-per-gpu"):
        path = tree.find(f"results/sweep-packing/{name}/{SWEEP_FILE}")
        sweep = read_json(path, "delete it: the sweep runs again.") if path else None
        if sweep and sweep.get("finished") and not failures(sweep):
            rates[name] = len(sweep["trials"]) * 3600 / max(sweep_wall_seconds(sweep), 1.0)
    check = {f"trials_per_hour_{name}": rate for name, rate in rates.items()}
    if len(rates) == 2:
        check["gain"] = rates["four-per-gpu"] / rates["one-per-gpu"]
    return check


def teacher_check(tree: Tree) -> dict:
    """The teachers of every schedule, ranked on validation (never on the test)."""
    reference = tree.results("results/reference", TEACHER_RUN)
    teachers = {} if reference is None else {f"epochs-{reference['epochs']} (reference)": reference}
    for folder in sorted(p.name for root in (tree.committed, tree.staging)
                         for p in (root / "results/ablation-teacher").glob("*") if p.is_dir()):
        teachers[folder] = tree.results(f"results/ablation-teacher/{folder}", TEACHER_RUN)
    found = {name: r for name, r in teachers.items() if r is not None}
    ranked = sorted(found, key=lambda name: -found[name]["best_val_acc"])
    return dict(ranked_on_validation=[dict(variant=name, best_val_acc=found[name]["best_val_acc"],
                                           test_acc=found[name]["test_acc"]) for name in ranked])


# ----------------------------------------------------------------------------- the run

class Plan:
    """The loop: the first task not done, not yet handled in this call, that fits the time left."""

    def __init__(self, args, scale: Scale):
        self.args, self.scale = args, scale
        self.ckpt = Path(args.ckpt_dir)
        self.staging = self.ckpt / "out"
        # A trial's smoke results must never pass for the checkout's, nor be paired with them.
        committed = args.committed or (self.ckpt / "nothing-committed" if scale.smoke else REPO)
        self.tree = Tree(Path(committed), self.staging)
        self.deadline = PROCESS_START + args.budget
        self.rates = Rates()
        self.manifest = self.load_manifest()
        self.handled: dict[str, dict] = {}
        self.teacher_failed: str | None = None
        self.labs: dict = {}
        self.log_file = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check_mode(self) -> None:
        """A trial's smoke files and a GPU call's results never share a folder: the first call marks it."""
        mode, marker = ("trial" if self.scale.smoke else "gpu"), self.ckpt / "plan-mode"
        if marker.is_file() and marker.read_text().strip() != mode:
            raise KdlabError(f"{self.ckpt} holds a {marker.read_text().strip()} call's files and this is a {mode} "
                             f"call; give another --ckpt-dir (or delete that folder).")
        self.ckpt.mkdir(parents=True, exist_ok=True)
        marker.write_text(mode)

    def load_manifest(self) -> dict:
        for root in (self.staging, self.tree.committed):
            path = root / PLAN_DIR / "manifest.json"
            if path.is_file():
                return read_json(path, "restore it from git, or delete it to start the plan's record again.")
        return dict(calls=[], checks={})

    def earlier_seconds(self) -> dict[str, float]:
        """The longest each task ran in an earlier call (one stopped by the budget included)."""
        took: dict[str, float] = {}
        for call in self.manifest["calls"]:
            for name, record in call.get("tasks", {}).items():
                if "seconds" in record:
                    took[name] = max(took.get(name, 0.0), record["seconds"])
        return took

    def builder(self, gpu: str) -> PlanBuilder:
        return PlanBuilder(self.scale, self.tree, self.rates, self.ckpt, Path(self.args.data_dir).resolve(), gpu,
                           self.earlier_seconds())

    def selected(self, items: list[Item]) -> list[Item]:
        return [item for item in items if not self.args.only or item.name in self.args.only]

    def done(self, task: Task) -> bool:
        if not all(self.tree.find(path) for path in task.work.outputs):
            return False
        if task.complete is not None:
            return task.complete(self.tree)
        return isinstance(task.work, Training) or self.tree.find(task.marker) is not None

    def teacher_first(self, task: Task, teacher_kept: bool) -> float:
        """Seconds of the reference teacher's training that must come before the task."""
        return self.rates.run("teacher", self.scale.teacher_epochs) if task.work.needs_teacher and not teacher_kept else 0.0

    def next_task(self, items: list[Item]) -> Task | None:
        return next((task for item in items for task in item.tasks
                     if task.name not in self.handled and not self.done(task)), None)

    # --- dry run

    def schedule(self, tasks: list[Task], teacher_kept: bool) -> tuple[list[Task], float]:
        """The tasks one call of --budget would run, in order, and the seconds they take; a task that
        needs the teacher while none is kept counts the teacher's training before it."""
        left, chosen = self.args.budget - RESERVE_S, []
        for task in tasks:
            need = task.estimate + self.teacher_first(task, teacher_kept)
            if need <= left:
                left -= need
                chosen.append(task)
                teacher_kept = teacher_kept or task.work.needs_teacher or task.name == f"teacher/{TEACHER_RUN}"
        return chosen, self.args.budget - RESERVE_S - left

    def print_dry_run(self) -> None:
        gpu = gpu_slug(self.rates.gpu) if not self.scale.smoke else "cpu"
        items = self.selected(self.builder(gpu).items())
        teacher_kept = self.tree.kept(TEACHER_RUN) is not None
        print(f"GPU plan{' (trial)' if self.scale.smoke else ''}: --budget {self.args.budget:.0f} s, counted from "
              f"the process start; done = committed under {self.tree.committed} or written under {self.staging}")
        print(f"estimates from {ESTIMATES_FROM.relative_to(REPO)}: {self.rates.describe()}")
        print(f"reference teacher kept ({KEPT}/{TEACHER_RUN}): "
              + ("yes, loaded by every student" if teacher_kept else
                 f"no: trained and kept before the first task that needs it "
                 f"({self.rates.run('teacher', self.scale.teacher_epochs):.0f} s)"))
        to_do = [task for item in items for task in item.tasks if not self.done(task)]
        chosen, seconds = self.schedule(to_do, teacher_kept)
        for item in items:
            print(f"\n{item.name}" + (f": {item.waiting}" if item.waiting else ""))
            for task in item.tasks:
                if task not in to_do:
                    print(f"  {task.name:78}        done")
                    continue
                verdict = "runs in the next call" if task in chosen else "a later call"
                print(f"  {task.name:78} {task.estimate:5.0f} s  {verdict}")
                if isinstance(task.work, Command):
                    print(f"      $ {shown(task.work.argv)}")
        print(f"\nthe next call (--budget {self.args.budget:.0f} s): {len(chosen)} task(s), about {seconds:.0f} s: "
              + ", ".join(task.name for task in chosen))
        print(self.calls_left(to_do, teacher_kept) + "".join(
            f"; {item.name} waits" for item in items if item.waiting))

    def calls_left(self, to_do: list[Task], teacher_kept: bool) -> str:
        """How many calls of --budget the tasks known now take, one after another."""
        calls, total = 0, sum(task.estimate for task in to_do)
        if not teacher_kept and any(task.work.needs_teacher for task in to_do):
            total += self.rates.run("teacher", self.scale.teacher_epochs)
        while to_do:
            chosen, _ = self.schedule(to_do, teacher_kept)
            if not chosen:
                names = ", ".join(task.name for task in to_do)
                return (f"calls left: {calls}, then {len(to_do)} task(s) longer than one call's budget: {names}")
            calls += 1
            teacher_kept = True
            to_do = [task for task in to_do if task not in chosen]
        return f"calls left for the tasks known now: {calls} (about {total:.0f} s of tasks)"

    # --- the run

    def log(self, line: str) -> None:
        self.log_file.write(line + "\n")
        self.log_file.flush()
        if " epoch " not in line or "test accuracy" in line:   # per-epoch lines: the log file only
            print(f"[{self.left():5.0f}s left] {line}", flush=True)

    def run(self) -> int:
        import torch

        self.check_mode()
        if not self.scale.smoke and not torch.cuda.is_available():
            raise KdlabError("the GPU plan needs a CUDA GPU and none is visible to PyTorch; on a CPU, --trial "
                             "checks this script end to end and --dry-run shows what it would do.")
        gpu_name = torch.cuda.get_device_name() if self.scale.device == "cuda" else "cpu"
        (self.staging / PLAN_DIR).mkdir(parents=True, exist_ok=True)
        Path(self.args.out).mkdir(parents=True, exist_ok=True)
        committed_log = self.tree.committed / PLAN_DIR / "run.log"
        log_path = self.staging / PLAN_DIR / "run.log"
        if not log_path.exists() and committed_log.is_file():
            shutil.copy(committed_log, log_path)
        self.log_file = open(log_path, "a")
        self.call = dict(command=" ".join(["python", "scripts/reference_run.py", *sys.argv[1:]]),
                         started=utc_now(), commit=os.environ.get("KDLAB_COMMIT"),
                         budget_seconds=self.args.budget, trial=self.scale.smoke,
                         gpu=gpu_name, estimates_from=self.rates.gpu, torch_version=str(torch.__version__),
                         python=sys.version.split()[0], tasks=self.handled)
        self.manifest["calls"].append(self.call)
        self.log(f"--- {self.call['command']} on {gpu_name}, {self.call['started']}")
        self.gpu = gpu_slug(gpu_name)
        while True:
            items = self.selected(self.builder(self.gpu).items())
            task = self.next_task(items)
            if task is None:
                break
            self.handle(task)
            if self.handled[task.name]["status"] != "skipped":   # a skip changes no result: nothing to pack
                self.record_check(task.item)
                self.save()
        self.call["finished"] = utc_now()
        self.save()
        failed = [name for name, record in self.handled.items() if record["status"] == "failed"]
        print(json.dumps(self.call, indent=1, default=str))
        print(f"results: {Path(self.args.out) / 'results.tgz'} (tar xzf it from the repository root)"
              + (f"; {len(failed)} task(s) failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    def record_check(self, name: str) -> None:
        """The item's check, from the results found now (an error in it is recorded, not raised)."""
        try:
            item = next(item for item in self.builder(self.gpu).items() if item.name == name)
            if item.check is not None:
                self.manifest["checks"][name] = item.check(self.tree)
        except Exception as err:   # a check never costs the GPU time that is left
            self.manifest["checks"][name] = dict(error=f"{type(err).__name__}: {err}"[:500])
            self.log(f"{name}: its check failed: {type(err).__name__}: {err}")

    def handle(self, task: Task) -> None:
        need = task.estimate + self.teacher_first(task, self.tree.kept(TEACHER_RUN) is not None)
        record = self.handled.setdefault(task.name, dict(estimate=round(task.estimate, 1)))
        if need > self.left() - RESERVE_S:
            record.update(status="skipped", reason=f"needs about {need:.0f}s, {self.left() - RESERVE_S:.0f}s left")
        elif task.work.needs_teacher and not self.teacher_kept():
            record.update(status="skipped", reason=f"no kept reference teacher: {self.teacher_failed}")
        elif task.estimate > self.left() - RESERVE_S:   # the teacher took longer than it was estimated to
            record.update(status="skipped", reason=f"needs about {task.estimate:.0f}s, "
                                                   f"{self.left() - RESERVE_S:.0f}s left after the teacher")
        else:
            record.update(self.execute(task.work))
            if record["status"] == "ran" and task.complete is None:
                self.mark_done(task)
        self.log(f"{task.name}: {record['status']}" + "".join(
            f", {key} {record[key]}" for key in ("reason", "error", "test_acc", "seconds") if key in record))

    def teacher_kept(self) -> bool:
        """The kept reference teacher: there already, or trained and kept now (its task handled here)."""
        if self.tree.kept(TEACHER_RUN) is None and self.teacher_failed is None:
            teacher = next(task for item in self.builder(self.gpu).items() for task in item.tasks
                           if task.name == f"teacher/{TEACHER_RUN}")
            self.handle(teacher)
            self.save()
            if self.tree.kept(TEACHER_RUN) is None:
                record = self.handled[teacher.name]
                self.teacher_failed = record.get("error") or record.get("reason") or record["status"]
        return self.tree.kept(TEACHER_RUN) is not None

    def execute(self, work: Training | Command) -> dict:
        begin = time.perf_counter()
        try:
            outcome = self.train(work) if isinstance(work, Training) else self.command(work)
        except Exception as err:   # one failed task (a drawing, a results file) does not end the others
            outcome = dict(status="failed", error=f"{type(err).__name__}: {err}"[:500])
        return dict(outcome, seconds=round(time.perf_counter() - begin, 1))

    def lab(self, folder: str, overrides: dict, teacher_epochs: int, precision: str | None,
            teacher_weights: Path | None):
        from kdlab.lab import Lab

        key = (folder, tuple(sorted(overrides.items())), teacher_epochs, precision, teacher_weights)
        if key not in self.labs:
            lab = Lab(self.ckpt / folder, self.args.data_dir, self.scale.device, smoke=self.scale.smoke,
                      progress=False, log=self.log, weights="none", teacher_epochs=teacher_epochs,
                      teacher_weights=teacher_weights, precision=precision or "auto", **overrides)
            if self.labs:
                lab.share_data_with(next(iter(self.labs.values())))
            self.labs[key] = lab
        return self.labs[key]

    def train(self, work: Training) -> dict:
        teacher_weights = self.tree.kept_folder(TEACHER_RUN) if work.needs_teacher else None
        lab = self.lab(work.folder, work.overrides, work.teacher_epochs, work.precision, teacher_weights)
        files = RunPaths(self.ckpt / work.folder, work.run, work.seed)
        finished_before = files.results.exists()   # trained by an earlier task (the ablation's winner)
        begin = time.perf_counter()
        trained = lab.run(work.run, seed=work.seed)
        seconds = time.perf_counter() - begin
        results, fresh = trained.results, trained.trained and not finished_before
        if fresh and work.precision is None:
            self.rates.measured(work, results, seconds)
        staged = self.staging / work.outputs[0]
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files.results, staged)
        outcome = dict(status="trained" if fresh else "loaded", test_acc=round(results["test_acc"], 4),
                       best_val_acc=round(results["best_val_acc"], 4), training_seconds=round(results["wall_seconds"], 1))
        if work.keep:
            outcome["kept"] = self.keep(work, lab, trained, staged)
        return outcome

    def keep(self, work: Training, lab, trained, staged: Path) -> dict:
        """The run's best weights kept as float16 parts (kdlab.kept): staged with their manifest, the
        parts also copied to --out/weights/<run>/ at once (each a file the device brings back), and the
        staged results file told where they are. The float16 copy is tested here, on this device."""
        from kdlab.kept import float32, half, keep_weights
        from kdlab.train import AUTOCAST_DTYPES, accuracy, predict_views

        cfg, results, state = lab.config(work.run, work.seed), trained.results, trained.model.state_dict()
        images, labels = lab.splits(cfg).test
        dtype, view = AUTOCAST_DTYPES[results["precision"]], "flip" if cfg.flip_tta else "single"
        acc_float32 = accuracy(predict_views(trained.model, images, cfg.image_size, dtype)[view], labels)
        rounded = copy.deepcopy(trained.model)
        rounded.load_state_dict(float32(half(state)))   # the float16 copy, as it loads
        acc_float16 = accuracy(predict_views(rounded, images, cfg.image_size, dtype)[view], labels)
        facts = dict(test_acc_float32_here=acc_float32, test_acc_float16=acc_float16,
                     float16_within_tolerance=abs(acc_float16 - acc_float32) <= FP16_TOLERANCE)
        folder = self.staging / KEPT / work.run
        manifest = keep_weights(state, cfg, folder, test_acc=results["test_acc"], **facts,
                                results_file=work.outputs[0], data=results["data"], trained_on=results["device_name"],
                                kept=utc_now(), commit=os.environ.get("KDLAB_COMMIT"))
        staged.write_text(json.dumps(dict(results, kept_weights=dict(
            folder=f"{KEPT}/{work.run}", tensors_sha256=manifest["tensors_sha256"], **facts)), indent=1))
        out = Path(self.args.out) / WEIGHTS_OUT / work.run
        out.mkdir(parents=True, exist_ok=True)
        for part in manifest["parts"]:
            shutil.copy(folder / part["name"], out / f"{part['name']}.tmp")
            os.replace(out / f"{part['name']}.tmp", out / part["name"])
        self.log(f"{work.run}: kept in {KEPT}/{work.run} ({len(manifest['parts'])} parts, {manifest['bytes']} bytes, "
                 f"sha256 {manifest['tensors_sha256'][:12]}); test accuracy {acc_float32:.4f} here, "
                 f"{acc_float16:.4f} in float16")
        return dict(facts, tensors_sha256=manifest["tensors_sha256"], parts=len(manifest["parts"]))

    def command(self, work: Command) -> dict:
        if work.merge:
            self.tree.merge(work.merge, self.ckpt / "view" / Path(work.merge).name)
        self.log(f"$ {shown(work.argv)}")
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        process = subprocess.Popen(work.argv, cwd=REPO, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)   # its own process group: stopped whole
        try:
            code = process.wait(timeout=max(1.0, self.left() - RESERVE_S))
        except subprocess.TimeoutExpired:
            stop(process)
            code = None
        for source, destination in work.collect:
            copy_results(self.ckpt / source, self.staging / destination)
        if code is None:
            return dict(status="failed", error="stopped: the budget ran out")
        if code != 0:
            return dict(status="failed", error=f"exit code {code} (its output is in {PLAN_DIR}/run.log)")
        return dict(status="ran")

    def mark_done(self, task: Task) -> None:
        marker = self.staging / task.marker
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(utc_now())

    def save(self) -> None:
        """The manifest, and results.tgz of everything staged but the kept weights' parts (they come
        back on their own): each written to a temporary file and renamed, so a kill at any point leaves
        the previous complete archive."""
        self.call["wall_seconds"] = round(time.monotonic() - PROCESS_START, 1)
        path = self.staging / PLAN_DIR / "manifest.json"
        path.write_text(json.dumps(self.manifest, indent=1, default=str))
        out = Path(self.args.out)
        shutil.copy(path, out / "manifest.json.tmp")
        os.replace(out / "manifest.json.tmp", out / "manifest.json")
        with tarfile.open(out / "results.tgz.tmp", "w:gz") as tar:
            for child in sorted(self.staging.iterdir()):
                tar.add(child, arcname=child.name,
                        filter=lambda member: None if Path(member.name).name.startswith(KEPT_PART_PREFIX) else member)
        os.replace(out / "results.tgz.tmp", out / "results.tgz")


def stop(process: subprocess.Popen) -> None:
    """End a command and every process it started (its process group): politely, then not."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def copy_results(source: Path, destination: Path) -> None:
    """What a command left in `source` (a file or a folder), checkpoints, locks and partial writes excepted."""
    if source.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, destination)
        return
    for path in source.rglob("*"):
        if path.is_file() and path.suffix not in (".pt", ".lock") and ".tmp" not in path.name:
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


def shown(argv: tuple[str, ...]) -> str:
    """A command line as a reader types it."""
    return " ".join("python" if arg == sys.executable else shlex.quote(arg) for arg in argv)


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', the prefix of the benchmark files measured on it."""
    return name.lower().replace("nvidia", "").strip().replace(" ", "-")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--ckpt-dir", help="checkpoints, and what this machine wrote (default: /tmp/kdlab-plan, "
                                           "with --trial /tmp/kdlab-plan-trial: never the same folder)")
    parser.add_argument("--out", help="where results.tgz and manifest.json go (needed unless --dry-run)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole call (default 540)")
    parser.add_argument("--committed", help="the checkout whose results count as done (default: this one; with "
                                            "--trial, none); an empty folder runs every item")
    parser.add_argument("--only", nargs="+", metavar="ITEM", help=f"items to work on: {', '.join(ITEMS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimates; run nothing")
    parser.add_argument("--trial", action="store_true", help="a tiny CPU check of this script (never results)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget) and args.budget > 0):
        raise KdlabError(f"--budget must be a number of seconds above 0, got {args.budget:g}; "
                         f"540 fits a 10-minute device call.")
    unknown = set(args.only or ()) - set(ITEMS)
    if unknown:
        raise KdlabError(f"no item {', '.join(sorted(unknown))} in the plan; its items: {', '.join(ITEMS)}")
    if not args.dry_run and not args.out:
        raise KdlabError("--out is needed to run the plan (results.tgz goes there); --dry-run needs none.")
    args.ckpt_dir = args.ckpt_dir or ("/tmp/kdlab-plan-trial" if args.trial else "/tmp/kdlab-plan")
    plan = Plan(args, TRIAL if args.trial else GPU_PLAN)
    if args.dry_run:
        plan.print_dry_run()
        return 0
    return plan.run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KdlabError as err:   # no GPU, a bad budget: one line, as the CLI says it
        print(f"reference_run: error: {err}", file=sys.stderr)
        sys.exit(2)
