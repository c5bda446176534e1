"""The GPU plan: every lent GPU minute through one command (issues 18 and 23).

The standing rule: a session lent a GPU runs this before anything else, whatever its issue
(README "Reproduce the reference" says how the data gets there):

    KDLAB_COMMIT=<commit> python3 scripts/reference_run.py --data-dir data --ckpt-dir /dev/shm/kd --out $OUT --budget 540

(KDLAB_COMMIT names the commit sent, which a copy without .git cannot tell: the manifest and the
benchmark files record it.) It works through the items below in priority order within --budget
seconds. An item is a list of tasks, each a run of the lab or a command line, with the files it
writes in this repository and its estimated seconds. A task whose files are committed (under
--committed, by default this checkout) or were written by an earlier call with the same
--ckpt-dir is done and skipped, so consecutive sessions continue the plan instead of repeating it. A task whose estimate does not
fit the time left is skipped and named in the manifest; the next one that fits runs.

  reference         the teacher (ResNet50 from scratch, 40 epochs, seed 42); the label-smoothing
                    ablation that picks the students' recipe on validation (results/ablation-recipe/);
                    the scratch baseline, logit KD and feature KD at seeds 42, 43, 44 (results/reference/)
  t4                a Colab T4's path: logit KD from scratch, 3 epochs, seed 42 (the same batches), at
                    fp16 with a loss scaler and at bf16 (results/ablation-precision/<precision>/);
                    checked: both finite, test accuracy within 1 point, the scaler's skipped steps
  dkd-at            decoupled KD and attention transfer from scratch at seeds 42-44, distilled from the
                    reference teacher (results/reference/), each paired with the baseline of its seed
  efficiency        the efficiency table measured on the GPU for every run of results/reference/
                    (figures/efficiency.json: the figures are then redrawn anywhere with
                    `python -m kdlab figures --efficiency-from figures`)
  budget-baselines  the baseline given logit KD's budget (issue 23), seeds 42-44: as many epochs as fit
                    in logit KD's training time, and the teacher's plus the student's epochs
                    (results/ablation-budget/<variant>/; kdlab.results.budget_matched_epochs)
  benchmark         benchmarks/throughput.py in full on the GPU, the speed levers on and off in the same
                    run (benchmarks/results/<gpu>-full-levers.json), and the six-run lab's wall time at its
                    default settings (--lab-time: benchmarks/results/<gpu>-lab-time.json)
  sweep-packing     the same 8 logit-KD trials (seed 44, temperature 1, 2, 4, 8 x alpha 0.5, 0.9; 10
                    epochs) one per GPU, then four per GPU: the packing gain in trials per hour
                    (results/sweep-packing/)
  sweep             temperature x alpha: the baseline and 24 logit-KD trials at seeds 42, 43, 10 epochs,
                    four per GPU (results/sweep-temperature-alpha/)
  stronger-teacher  the teacher at 60 and 80 epochs, ranked on validation beside the 40-epoch one
                    (results/ablation-teacher/epochs-<N>/); augmentation waits for a switch in kdlab.data
  recipe-lr         the previous recipe's LR (0.2) as the last row of the recipe ablation

The sweeps run `python -m kdlab sweep --engine processes`: the GPU machine has no Ray, and the
processes engine packs trials on a GPU as Ray's `--gpus-per-trial 0.25` does.

The reference teacher's checkpoint is not committed (94 MB, more than a call brings back), so a
machine without it retrains it (seed 42, the same recipe) before the first task that needs it,
and that task's estimate includes it; tasks that need no teacher never wait for it. The manifest
records the retrained teacher's accuracy beside the committed one's; while the checkout has no
figures/soft_targets.png, the plan draws it from this teacher (its results file, which keeps the
logits of the figure's test images, comes back in results/plan/teacher/).

Estimates: the seconds per epoch of each step kind and per run on top (test, checkpoints), from
the committed reference's results files and manifest (results/reference/), each replaced by what
this call measures once a run of its kind has trained. Decoupled KD is estimated as logit KD,
attention transfer as feature KD (the same networks and passes; their losses cost little beside
them). The benchmark costs what the longest committed full benchmark on this GPU took, the
lab's wall time its six runs at those rates, the efficiency table what the previous script
reserved for the figures (30 s); a packed sweep costs its trials one after another, divided by
the packing gain once sweep-packing has measured it. A task that ran before in the plan
(stopped by the budget, say) is estimated at no less than it took.

Written under --out: results.tgz, every file the tasks wrote at its path in this repository
(`tar xzf OUT/results.tgz` from the repository root adds them), with results/plan/manifest.json
(every call: the tasks it ran, loaded, skipped or saw fail, estimated and measured seconds, the
retrained teacher; the items' checks) and results/plan/run.log; and manifest.json, the same
manifest, to read at once.

    --dry-run   the items, what is done, every task's estimate and what fits --budget: no GPU, no torch
    --trial     a CPU check of this script end to end: kdlab's synthetic smoke data at 32 px, one epoch,
                seeds 42 and 43, sweeps of a few trials; the T4 item compares fp32 with the CPU's bf16
                autocast (a CPU has no fp16 path). Its output is never a result.
    --only      the items to work on, by name (default: all)
"""
from __future__ import annotations

import argparse
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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdlab.config import DEFAULT_SEED, LAB_RUNS, RUNS, TEACHER_RUN, make_config, run_id, run_of  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402
from kdlab.registry import METHODS  # noqa: E402
from kdlab.results import (EQUAL_TRAINING_TIME, TEACHER_PLUS_STUDENT_EPOCHS, RunPaths, agreement,  # noqa: E402
                           budget_matched_epochs, load_efficiency, load_seed_results, read_json)
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
RESERVE_S = 15                  # packing results.tgz and the manifest after the last task
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
TRIAL = Scale(seeds=(42, 43), lab=dict(image_size=32, epochs=1, limit_train=100, batch_size=50), teacher_epochs=1,
              smoke=True, device="cpu",
              t4_epochs=1, t4_precisions=("fp32", "bf16"), sweep_epochs=1, sweep_seeds=(42,),
              sweep_grid=("temperature=1,4",), packing_seed=43, packing_grid=("temperature=1,4",),
              cpus_per_trial=1, stronger_teacher_epochs=(2,))


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Training:
    """One run of the lab, train-or-load in <ckpt-dir>/<folder>, its results file copied to the
    repository folder `results`. Students distil the reference teacher (<ckpt-dir>/reference)."""
    run: str
    seed: int
    folder: str
    results: str
    overrides: dict = field(default_factory=dict)   # the Lab's: every run of the lab plus these
    teacher_epochs: int | None = None               # None: the reference teacher's
    precision: str | None = None                    # None: the lab's choice (auto)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (f"{self.results}/{run_id(self.run, self.seed)}_results.json",)

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
    path in the repository) pairs.
    `teacher_into` is a folder under <ckpt-dir> that gets a copy of the reference teacher first;
    `merge` a repository folder whose committed and new files are gathered in <ckpt-dir>/view first."""
    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    collect: tuple[tuple[str, str], ...] = ()
    teacher_into: str | None = None
    merge: str | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_into is not None


@dataclass(frozen=True)
class Task:
    item: str
    name: str            # unique in the plan; the manifest's key
    work: Training | Command
    estimate: float      # seconds, without the teacher's
    # Done when every output exists; `complete(tree)` may ask more (a sweep with no failed trial).
    complete: Callable[["Tree"], bool] | None = None


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

    def training(self, item: str, name: str, work: Training) -> Task:
        """A run's task, with the scale's settings under its own and its recipe's epochs by default."""
        overrides = dict(self.scale.lab, **work.overrides)
        overrides.setdefault("epochs", make_config(work.run, weights="none").epochs)
        work = replace(work, overrides=overrides, teacher_epochs=work.teacher_epochs or self.scale.teacher_epochs)
        return self.task(item, name, work, self.rates.run(work.kind, work.epochs))

    def items(self) -> list[Item]:
        recipe = self.student_recipe()
        return [self.reference(recipe), self.t4(recipe), self.dkd_at(recipe), self.efficiency(),
                self.budget_baselines(recipe), self.benchmark(), *self.sweeps(recipe),
                self.stronger_teacher(), self.recipe_lr(recipe)]

    # The students' recipe: the label smoothing its ablation chose on validation.
    def student_recipe(self) -> tuple[str, dict] | None:
        found = {v: self.tree.results(f"results/ablation-recipe/{v}", BASELINE) for v in LABEL_SMOOTHING_VARIANTS}
        if any(r is None for r in found.values()):
            return None
        chosen = max(found, key=lambda v: found[v]["best_val_acc"])
        return chosen, LABEL_SMOOTHING_VARIANTS[chosen]

    def reference(self, recipe) -> Item:
        tasks = [self.training("reference", TEACHER_RUN, Training(TEACHER_RUN, DEFAULT_SEED, "reference",
                                                                  "results/reference"))]
        tasks += [self.training("reference", f"ablation/{variant}",
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
            dict(recipe[1], epochs=self.scale.t4_epochs), precision=precision))
            for precision in self.scale.t4_precisions]
        return Item("t4", tasks, check=lambda tree: t4_check(tree, self.scale.t4_precisions))

    def dkd_at(self, recipe) -> Item:
        if recipe is None:
            return Item("dkd-at", [], waiting="waits for the students' recipe (reference)")
        tasks = [self.training("dkd-at", run_id(run, seed), Training(run, seed, "reference", "results/reference",
                                                                     recipe[1]))
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
        """A `kdlab sweep` on this machine's GPU, its teacher copied in, and its estimate."""
        flags = dict(self.scale.lab, **recipe[1], epochs=self.scale.sweep_epochs,
                     teacher_epochs=self.scale.teacher_epochs, weights="none")
        argv = (sys.executable, "-m", "kdlab", "sweep", *runs, "--seeds", *map(str, seeds),
                *(arg for spec in grid for arg in ("--grid", spec)),
                *(arg for key, value in flags.items() for arg in (f"--{key.replace('_', '-')}", str(value))),
                *(("--smoke",) if self.scale.smoke else ()), "--device", "auto" if self.scale.device == "cuda" else "cpu",
                "--engine", "processes", "--gpus-per-trial", str(gpus_per_trial),
                "--cpus-per-trial", str(self.scale.cpus_per_trial), "--data-dir", str(self.data_dir),
                "--out", str(self.ckpt / "sweeps" / name))
        output = f"results/{name}"
        trials = expand_trials(runs, list(seeds), parse_grid(list(grid)))
        one_by_one = sum(self.rates.run(RUNS[t.run].method, self.scale.sweep_epochs) for t in trials)
        work = Command(argv, (f"{output}/{SWEEP_FILE}",), ((f"sweeps/{name}", output),),
                       teacher_into=f"sweeps/{name}/teacher")
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
        gain = packing_check(self.tree).get("gain") or 1.0
        work, seconds, complete = self.sweep_command("sweep-temperature-alpha", [BASELINE, LOGIT_KD],
                                                     self.scale.sweep_seeds, self.scale.sweep_grid, 0.25, recipe)
        return [Item("sweep-packing", packing_tasks, check=packing_check),
                Item("sweep", [self.task("sweep", "temperature-alpha", work, seconds / gain, complete)])]

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


ITEMS = ("reference", "t4", "dkd-at", "efficiency", "budget-baselines", "benchmark", "sweep-packing", "sweep",
         "stronger-teacher", "recipe-lr")


# ----------------------------------------------------------------------------- what the results say

def paired_checks(tree: Tree, runs: list[str]) -> dict:
    """Each run against the baseline of the same seeds, over the seeds both have."""
    reference = tree.seed_results("results/reference")
    return {run: summary(paired_difference(reference[run], reference[BASELINE]))
            for run in runs if reference.get(run) and reference.get(BASELINE)}


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
        self.deadline = time.perf_counter() + args.budget
        self.rates = Rates()
        self.manifest = self.load_manifest()
        self.handled: dict[str, dict] = {}
        self.teacher_here = RunPaths(self.ckpt / "reference", TEACHER_RUN).best.exists()
        self.teacher_failed: str | None = None
        self.labs: dict = {}
        self.log_file = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

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
        return task.complete is None or task.complete(self.tree)

    def teacher_first(self, task: Task, teacher_here: bool) -> float:
        """Seconds of the reference teacher's training that must come before the task."""
        return self.rates.run("teacher", self.scale.teacher_epochs) if task.work.needs_teacher and not teacher_here else 0.0

    def next_task(self, items: list[Item]) -> Task | None:
        return next((task for item in items for task in item.tasks
                     if task.name not in self.handled and not self.done(task)), None)

    # --- dry run

    def print_dry_run(self) -> None:
        gpu = gpu_slug(self.rates.gpu) if not self.scale.smoke else "cpu"
        items = self.selected(self.builder(gpu).items())
        print(f"GPU plan{' (trial)' if self.scale.smoke else ''}: --budget {self.args.budget:.0f} s; done = "
              f"committed under {self.tree.committed} or written under {self.staging}")
        print(f"estimates from {ESTIMATES_FROM.relative_to(REPO)}: {self.rates.describe()}")
        print(f"reference teacher on this machine: {'yes' if self.teacher_here else 'no'} "
              f"(retrained before the first task that needs it: "
              f"{self.rates.run('teacher', self.scale.teacher_epochs):.0f} s)")
        left, teacher_here, planned = self.args.budget - RESERVE_S, self.teacher_here, 0
        for item in items:
            print(f"\n{item.name}" + (f": {item.waiting}" if item.waiting else ""))
            for task in item.tasks:
                if self.done(task):
                    print(f"  {task.name:78}        done")
                    continue
                teacher = self.teacher_first(task, teacher_here)
                if task.estimate + teacher <= left:
                    left -= task.estimate + teacher
                    planned += 1
                    teacher_here = teacher_here or task.work.needs_teacher
                    verdict = f"fits, {left:.0f} s left after it"
                else:
                    verdict = "does not fit what is left"
                with_teacher = f" (+ {teacher:.0f} s: the teacher first)" if teacher else ""
                print(f"  {task.name:78} {task.estimate:5.0f} s  to do{with_teacher}: {verdict}")
                if isinstance(task.work, Command):
                    print(f"      $ {shown(task.work.argv)}")
        print(f"\nwithin --budget {self.args.budget:.0f} s: {planned} task(s) would run, about "
              f"{self.args.budget - RESERVE_S - left:.0f} s")

    # --- the run

    def log(self, line: str) -> None:
        self.log_file.write(line + "\n")
        self.log_file.flush()
        if " epoch " not in line or "test accuracy" in line:   # per-epoch lines: the log file only
            print(f"[{self.left():5.0f}s left] {line}", flush=True)

    def run(self) -> int:
        import torch

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
        self.started = time.perf_counter()
        self.log(f"--- {self.call['command']} on {gpu_name}, {self.call['started']}")
        builder = self.builder(gpu_slug(gpu_name))
        while True:
            items = self.selected(builder.items())
            task = self.next_task(items)
            if task is None:
                break
            self.handle(task)
            item = next(item for item in items if item.name == task.item)
            self.record_check(builder, item.name)
            self.save()
        self.call["finished"] = utc_now()
        self.save()
        failed = [name for name, record in self.handled.items() if record["status"] == "failed"]
        print(json.dumps(self.call, indent=1, default=str))
        print(f"results: {Path(self.args.out) / 'results.tgz'} (tar xzf it from the repository root)"
              + (f"; {len(failed)} task(s) failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    def record_check(self, builder: PlanBuilder, name: str) -> None:
        """The item's check, from the results found now (an error in it is recorded, not raised)."""
        item = next(item for item in builder.items() if item.name == name)
        if item.check is not None:
            try:
                self.manifest["checks"][name] = item.check(self.tree)
            except Exception as err:   # a check never costs the GPU time that is left
                self.manifest["checks"][name] = dict(error=f"{type(err).__name__}: {err}"[:500])
                self.log(f"{name}: its check failed: {type(err).__name__}: {err}")

    def handle(self, task: Task) -> None:
        need, left = task.estimate + self.teacher_first(task, self.teacher_here), self.left() - RESERVE_S
        record = self.handled.setdefault(task.name, dict(estimate=round(task.estimate, 1)))
        if need > left:
            record.update(status="skipped", reason=f"needs about {need:.0f}s, {left:.0f}s left")
        else:
            if task.work.needs_teacher and not self.teacher_here and not self.teacher_failed:
                self.train_reference_teacher()
            if task.work.needs_teacher and self.teacher_failed:
                record.update(status="skipped", reason=f"the reference teacher failed: {self.teacher_failed}")
            else:
                record.update(self.execute(task.work))
        self.log(f"{task.name}: {record['status']}" + "".join(
            f", {key} {record[key]}" for key in ("reason", "error", "test_acc", "seconds") if key in record))

    def execute(self, work: Training | Command) -> dict:
        begin = time.perf_counter()
        try:
            outcome = self.train(work) if isinstance(work, Training) else self.command(work)
        except (KdlabError, RuntimeError, OSError) as err:   # one failed task does not end the others
            outcome = dict(status="failed", error=str(err)[:500])
        return dict(outcome, seconds=round(time.perf_counter() - begin, 1))

    def lab(self, folder: str, overrides: dict, teacher_epochs: int, precision: str | None, teacher_dir: str | None):
        from kdlab.lab import Lab

        key = (folder, tuple(sorted(overrides.items())), teacher_epochs, precision, teacher_dir)
        if key not in self.labs:
            lab = Lab(self.ckpt / folder, self.args.data_dir, self.scale.device, smoke=self.scale.smoke,
                      progress=False, log=self.log, weights="none", teacher_epochs=teacher_epochs,
                      teacher_dir=None if teacher_dir is None else self.ckpt / teacher_dir,
                      precision=precision or "auto", **overrides)
            if self.labs:
                lab.share_data_with(next(iter(self.labs.values())))
            self.labs[key] = lab
        return self.labs[key]

    def train(self, work: Training) -> dict:
        lab = self.lab(work.folder, work.overrides, work.teacher_epochs, work.precision,
                       "reference" if work.needs_teacher else None)
        files = RunPaths(self.ckpt / work.folder, work.run, work.seed)
        finished_before = files.results.exists()   # trained by an earlier task (the ablation's winner)
        begin = time.perf_counter()
        trained = lab.run(work.run, seed=work.seed)
        seconds = time.perf_counter() - begin
        results, fresh = trained.results, trained.trained and not finished_before
        if fresh and work.precision is None:
            self.rates.measured(work, results, seconds)
        if work.folder == "reference" and work.run == TEACHER_RUN:
            self.teacher_here = True
        (self.staging / work.results).mkdir(parents=True, exist_ok=True)
        shutil.copy(files.results, self.staging / work.results)
        return dict(status="trained" if fresh else "loaded", test_acc=round(results["test_acc"], 4),
                    best_val_acc=round(results["best_val_acc"], 4), training_seconds=round(results["wall_seconds"], 1))

    def train_reference_teacher(self) -> None:
        """The reference teacher on this machine, for the students that distil it; its results
        are compared with the committed teacher's, never written over them."""
        lab = self.lab("reference", dict(self.scale.lab), self.scale.teacher_epochs, None, None)
        begin = time.perf_counter()
        try:
            results = lab.run(TEACHER_RUN).results
        except (KdlabError, RuntimeError, OSError) as err:
            self.teacher_failed = str(err)[:500]
            self.call["teacher"] = dict(status="failed", error=self.teacher_failed)
            return
        self.teacher_here = True
        teacher = dict(status="retrained", seconds=round(time.perf_counter() - begin, 1),
                       test_acc=results["test_acc"], best_val_acc=results["best_val_acc"])
        committed = self.tree.results("results/reference", TEACHER_RUN)
        if committed is not None and committed["test_labels"] == results["test_labels"]:
            teacher.update(committed_test_acc=committed["test_acc"],
                           agreement_with_committed=round(agreement(results, committed), 4))
        self.call["teacher"] = teacher
        self.log(f"reference teacher retrained: {json.dumps(teacher)}")
        self.draw_soft_targets(results)

    def draw_soft_targets(self, teacher: dict) -> None:
        """figures/soft_targets.png, what the teacher knows, from the teacher retrained here while the
        checkout has none: the committed teacher's results file predates the test images' logits it
        is drawn from (kdlab.checkpoints.soft_target_examples). Its results file comes back beside it,
        in results/plan/teacher/, and the figure says where it came from."""
        if self.tree.find("figures/soft_targets.png") is not None:
            return
        from kdlab.figures import plot_soft_targets
        from kdlab.results import default_seed_results, distillation_temperature

        folder = self.staging / PLAN_DIR / "teacher"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{TEACHER_RUN}_results.json").write_text(json.dumps(teacher))
        temperature = distillation_temperature(default_seed_results(self.tree.seed_results("results/reference")))
        plot_soft_targets(teacher, temperature, self.staging / "figures",
                          origin=f"{PLAN_DIR}/teacher, the reference teacher retrained by the GPU plan (same recipe, seed)")

    def command(self, work: Command) -> dict:
        if work.teacher_into:
            into = self.ckpt / work.teacher_into
            into.mkdir(parents=True, exist_ok=True)
            teacher = RunPaths(self.ckpt / "reference", TEACHER_RUN)
            for path in (teacher.best, teacher.results):
                shutil.copy(path, into / path.name)
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

    def save(self) -> None:
        self.call["wall_seconds"] = round(time.perf_counter() - self.started, 1)
        path = self.staging / PLAN_DIR / "manifest.json"
        path.write_text(json.dumps(self.manifest, indent=1, default=str))
        out = Path(self.args.out)
        shutil.copy(path, out / "manifest.json")
        with tarfile.open(out / "results.tgz", "w:gz") as tar:
            for child in sorted(self.staging.iterdir()):
                tar.add(child, arcname=child.name)


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
    parser.add_argument("--ckpt-dir", default="/tmp/kdlab-plan", help="checkpoints, and what this machine wrote")
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
