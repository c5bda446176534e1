"""The files a run leaves in its checkpoint folder, reading its results files and the efficiency
and benchmark files, and the comparisons of runs that figures and report share.

No torch here: `python -m kdlab status` and `report` only look at files, and start at once.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdlab.config import (DEFAULT_SEED, EVALUATION_STEP, LEGACY_STEP_NAMES, RUNS, STUDENT_STEP, TEACHER_RUN,
                          TEACHER_STEP, baseline_of, run_id, run_of)
from kdlab.errors import KdlabError
from kdlab.latex import agreeing, count, enumerate_text
from kdlab.registry import METHODS
from kdlab.stats import check_no_duplicates, training_seed

# Where runs are saved unless --ckpt-dir says otherwise. Smoke runs (random weights, synthetic
# data) have their own folder: their checkpoints must never block or pass for real ones.
CKPT_DIR = Path("checkpoints")
SMOKE_CKPT_DIR = CKPT_DIR / "smoke"
# Weights kept in the repository (kdlab.kept): <REFERENCE_WEIGHTS>/<run>/, a manifest and float16 parts.
REFERENCE_WEIGHTS = CKPT_DIR / "reference"
KEPT_MANIFEST = "manifest.json"
KEPT_PART_PREFIX = "weights.fp16.part"

# What every <run>_results.json holds (kdlab.checkpoints writes it when a run finishes).
RESULT_KEYS = ("run", "test_acc", "best_val_acc", "best_epoch", "epochs", "config", "weights", "smoke",
               "data", "n_train", "n_val", "n_test", "parameters", "extra_training_parameters",
               "test_predictions", "device", "device_name", "torch_version", "wall_seconds", "finished")
# <run>[_seed<N>]_{best.pt,last.pt,results.json}; a run name may itself contain underscores.
RUN_FILE = re.compile(r"(?P<run>.+?)(?:_seed(?P<seed>\d+))?_(?:best\.pt|last\.pt|results\.json)")


def run_file(suffix: str) -> property:
    """A file of RunPaths: the run's stem (kdlab.config.run_id) and `suffix`, in its checkpoint folder."""
    return property(lambda paths: paths.ckpt_dir / f"{paths.stem}{suffix}")


@dataclass
class RunPaths:
    """The names of a run's files in a checkpoint folder (kdlab.checkpoints says what each holds)."""
    ckpt_dir: Path
    run: str
    seed: int = DEFAULT_SEED
    best = run_file("_best.pt")
    last = run_file("_last.pt")
    results = run_file("_results.json")
    lock_file = run_file(".lock")

    @property
    def stem(self) -> str:
        return run_id(self.run, self.seed)


def default_ckpt_dir(smoke: bool) -> Path:
    return SMOKE_CKPT_DIR if smoke else CKPT_DIR


def seeds_in(ckpt_dir: str | Path, run: str) -> list[int]:
    """The training seeds of `run` that have any file in `ckpt_dir`, the default seed first."""
    matches = (RUN_FILE.fullmatch(path.name) for path in Path(ckpt_dir).glob(f"{run}_*"))
    seeds = {int(match["seed"] or DEFAULT_SEED) for match in matches if match and match["run"] == run}
    return sorted(seeds, key=lambda seed: (seed != DEFAULT_SEED, seed))


def run_status(ckpt_dir: str | Path, run: str, seed: int = DEFAULT_SEED) -> str:
    paths = RunPaths(Path(ckpt_dir), run, seed)
    if paths.best.exists():
        # The zip's directory is at its end: a truncated copy (an interrupted sync) has none.
        # Reading it costs a few bytes; checking every checksum is left to loading.
        return "trained" if zipfile.is_zipfile(paths.best) else "damaged"
    return "resumable" if paths.last.exists() else "missing"


def read_json(path: Path, what: str):
    """The JSON in `path`; if it cannot be read, an error that ends with `what` to do."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KdlabError(f"{path} is not readable JSON ({err}); {what}") from None


def read_kept_manifest(folder: Path) -> dict:
    """The manifest of a folder of kept weights (kdlab.kept), or an error that says what is wrong."""
    path = Path(folder) / KEPT_MANIFEST
    if not path.is_file():
        raise KdlabError(f"{folder} holds no kept weights ({KEPT_MANIFEST} is missing): give the folder of a "
                         f"run's kept weights, such as {REFERENCE_WEIGHTS / TEACHER_RUN} (checkpoints/README.md).")
    return read_json(path, "restore it from git.")


def run_order(run: str) -> tuple[int, str]:
    names = list(RUNS)
    return (names.index(run) if run in names else len(names), run)


def read_results_file(path: Path, run: str, seed: int = DEFAULT_SEED) -> dict:
    """One run's results file, checked; a damaged or foreign one stops with what to do about it."""
    seed_flag = "" if seed == DEFAULT_SEED else f" --seed {seed}"
    again = (f"copy it again from where it came from, or, in the run's checkpoint folder, delete it and "
             f"run `python -m kdlab run {run}{seed_flag} --ckpt-dir <that folder>`: a finished run "
             f"writes it again from its checkpoint.")
    r = read_json(path, again)
    lacking = [k for k in RESULT_KEYS if k not in r] if isinstance(r, dict) else list(RESULT_KEYS)
    if not lacking and not isinstance(r["config"], dict):
        lacking = ["a config"]
    if lacking:
        raise KdlabError(f"{path} is not a kdlab results file (it lacks {', '.join(lacking)}); {again}")
    if (r["run"], training_seed(r)) != (run, seed):
        held = run_id(r["run"], training_seed(r))
        raise KdlabError(f"{path} holds the results of {held!r}; rename it {held}_results.json or delete it.")
    return r


def load_results(results_dir: str | Path) -> dict[str, dict]:
    """The default seed's results of every run in `results_dir` (load_seed_results), in the lab's order."""
    return default_seed_results(load_seed_results(results_dir))


def default_seed_results(seeds: dict[str, list[dict]]) -> dict[str, dict]:
    """From every seed's results by run, the default seed's (the original lab's file names)."""
    return {run: r for run, runs in seeds.items() for r in runs if training_seed(r) == DEFAULT_SEED}


def load_seed_results(results_dir: str | Path) -> dict[str, list[dict]]:
    """Every seed's results of every run in `results_dir`: {run: [results, by seed]}, in the lab's order.

    A run and seed found twice (`<run>_results.json` beside `<run>_seed42_results.json`, say) with
    different settings is refused, naming both files: two different runs are never averaged.
    """
    paths = sorted(Path(results_dir).glob("*_results.json"))
    matched = [(path, m) for path in paths if (m := RUN_FILE.fullmatch(path.name)) and m["run"] in RUNS]
    entries = [(path, read_results_file(path, m["run"], int(m["seed"] or DEFAULT_SEED))) for path, m in matched]
    by_run: dict[str, list[dict]] = {}
    for _, r in sorted(check_no_duplicates(entries), key=lambda e: (run_order(e[1]["run"]), training_seed(e[1]))):
        by_run.setdefault(r["run"], []).append(r)
    return by_run


def load_seed_ablation(ablation_dir: str | Path) -> dict[str, list[dict]]:
    """An ablation's results: one folder per variant, each holding one run's results files, one
    per training seed ({variant: [results, by seed]})."""
    variants = {}
    for folder in sorted(p for p in Path(ablation_dir).iterdir() if p.is_dir()):
        runs = load_seed_results(folder)
        if len(runs) != 1:
            raise KdlabError(f"{folder} must hold the results files of one run, found {len(runs)} runs "
                             f"({', '.join(runs) or 'none'}).")
        variants[folder.name] = next(iter(runs.values()))
    return variants


def load_ablation(ablation_dir: str | Path) -> dict[str, dict]:
    """An ablation's results at the default seed: {variant: results} (load_seed_ablation's view)."""
    variants = {}
    for variant, runs in load_seed_ablation(ablation_dir).items():
        default = [r for r in runs if training_seed(r) == DEFAULT_SEED]
        if not default:
            raise KdlabError(f"{Path(ablation_dir) / variant} has no results file of the default seed "
                             f"{DEFAULT_SEED} (seeds {', '.join(str(training_seed(r)) for r in runs)}).")
        variants[variant] = default[0]
    return variants


# ----------------------------------------------------------------------------- efficiency and benchmark files

# The GPU benchmark the report's speed section reads (benchmarks/README.md says how it was run).
DEFAULT_BENCHMARK = "benchmarks/results/h200-full-compile.json"
# The benchmark's step kinds (kdlab.config.step_runs), as the report's table and the chart name them.
STEP_DESCRIPTIONS = {TEACHER_STEP: "teacher step (ResNet50, CE)", STUDENT_STEP: "student step (ResNet18, CE)",
                     **{key: f"{m.name} step (+ ResNet50 forward)" for key, m in METHODS.items() if m.uses_teacher},
                     EVALUATION_STEP: "evaluation (ResNet18 forward)"}


def load_manifest(results_dir: Path) -> dict | None:
    path = results_dir / "manifest.json"
    if not path.exists():
        return None
    manifest = read_json(path, "write it again, or delete it.")
    if not isinstance(manifest, dict):
        raise KdlabError(f"{path} must hold one JSON object (key: value); write it again, or delete it.")
    return manifest


def load_efficiency(figures_dir: Path) -> dict | None:
    """efficiency.json of the figures module: device, image_size, measured (date), runs {run: {...}}; or None."""
    path = figures_dir / "efficiency.json"
    if not path.exists():
        return None
    what = "make it again with the figures module, or delete it."
    eff = read_json(path, what)
    if not (isinstance(eff, dict) and isinstance(eff.get("runs"), dict)
            and all(isinstance(row, dict) for row in eff["runs"].values())):
        raise KdlabError(f"{path} does not have efficiency.json's layout (device, image_size, "
                         f"runs: one dict per run); {what}")
    return eff


def load_benchmark(path: Path | None) -> dict | None:
    """A results file of benchmarks/throughput.py (device_name, rows: one per step kind); or None."""
    if path is None or not path.exists():
        return None
    what = "run benchmarks/throughput.py again, or pass another --benchmark."
    bench = read_json(path, what)
    paths = ("kdlab", "naive")
    if not (isinstance(bench, dict) and {"device_name", "torch_version", "image_size", "batch_size"} <= set(bench)
            and bench.get("rows") and all(
                isinstance(row, dict) and {"step", "speedup", *paths} <= set(row)
                and all(isinstance(row[p], dict) and {"images_per_s", "tflops"} <= set(row[p]) for p in paths)
                for row in bench["rows"])):
        raise KdlabError(f"{path} does not have a benchmark file's layout (device_name, torch_version, "
                         f"image_size, batch_size; rows: step, speedup, kdlab and naive with images_per_s "
                         f"and tflops); {what}")
    for row in bench["rows"]:
        row["step"] = LEGACY_STEP_NAMES.get(row["step"], row["step"])
    return bench


DEPLOY_VARIANT_KEYS = {"size_mb", "latency_ms", "throughput_img_s", "test_acc", "agreement_with_pytorch"}


def load_deploy(path: str | Path | None) -> dict | None:
    """deploy.json of `python -m kdlab deploy` (smoke, cpu, variants, runs: {run: {variants: {...}}}); or None."""
    if path is None or not Path(path).exists():
        return None
    what = "run `python -m kdlab deploy` again, or pass another deploy.json."
    deployment = read_json(Path(path), what)
    if not (isinstance(deployment, dict) and {"smoke", "cpu", "variants", "runs"} <= set(deployment)
            and isinstance(deployment["runs"], dict) and all(
                isinstance(run, dict) and isinstance(run.get("variants"), dict)
                and set(run["variants"]) == set(deployment["variants"])
                and all(DEPLOY_VARIANT_KEYS <= set(v) for v in run["variants"].values())
                for run in deployment["runs"].values())):
        raise KdlabError(f"{path} does not have deploy.json's layout (smoke, cpu, variants; runs: each with "
                         f"its variants' {', '.join(sorted(DEPLOY_VARIANT_KEYS))}); {what}")
    return deployment


# ----------------------------------------------------------------------------- comparisons of runs

def best_student(results: dict[str, dict]) -> str | None:
    """The student with the highest test accuracy, or None without students."""
    students = [run for run in results if run != TEACHER_RUN]
    return max(students, key=lambda run: results[run]["test_acc"], default=None)


def teachers_of(seeds: dict[str, list[dict]]) -> list[dict]:
    """The teachers the distilled runs of a results folder learned from, told apart by their weights'
    sha256 (results files written before it was recorded: by the teacher's test accuracy): each with
    its test accuracy, whether it is the teacher whose results the folder holds, and its runs."""
    teacher = (seeds.get(TEACHER_RUN) or [{}])[0]
    folders_teacher = (teacher.get("kept_weights") or {}).get("tensors_sha256") or teacher.get("weights_sha256")
    groups: dict[tuple, dict] = {}
    for run, runs in seeds.items():
        for r in runs:
            if not r.get("teacher"):
                continue
            sha, test_acc = r["teacher"].get("weights_sha256"), r["teacher"]["test_acc"]
            in_folder = sha == folders_teacher if sha else test_acc == teacher.get("test_acc")
            group = groups.setdefault((sha, None if sha else test_acc), dict(
                sha256=sha, test_acc=test_acc, in_folder=in_folder, runs={}))
            group["runs"].setdefault(run, []).append(training_seed(r))
    return list(groups.values())


def teacher_note(seeds: dict[str, list[dict]]) -> str | None:
    """A sentence that names the teachers when the distilled runs of a folder learned from more than
    one, or from another than the teacher whose results the folder holds; None otherwise."""
    found = teachers_of(seeds)
    if not found or (len(found) == 1 and found[0]["in_folder"]):
        return None

    def named(group: dict) -> str:
        runs = [f"{RUNS[run].label if run in RUNS else run} ({agreeing(len(s), 'seed', 'seeds')} "
                f"{', '.join(map(str, sorted(s)))})" for run, s in group["runs"].items()]
        who = ("the teacher in these results" if group["in_folder"] else
               "another teacher" if group["sha256"] else "an earlier teacher whose weights were not kept")
        sha = f", sha256 {group['sha256'][:8]}" if group["sha256"] else ""
        return f"{enumerate_text(runs)} from {who} (test accuracy {group['test_acc']:.4f}{sha})"
    return (f"The distilled runs learned from {count(len(found), 'teacher')}, so a comparison "
            f"across these groups compares teachers as well as methods: " + "; ".join(map(named, found)) + ".")


def best_distilled(results: dict[str, dict]) -> str | None:
    """The distillation run with the highest test accuracy among those whose baseline has results."""
    distilled = [run for run in results if (base := baseline_of(run)) is not None and base in results]
    return max(distilled, key=lambda run: results[run]["test_acc"], default=None)


def distillation_temperature(results: dict[str, dict]) -> float:
    """The temperature the lab distils at: its logit-KD runs' (the first found), else the method's default."""
    run = next((r for r in results.values() if r["config"]["method"] == "kd_logits"), None)
    return run["config"]["temperature"] if run else METHODS["kd_logits"].settings().temperature


def softened(logits, temperature: float) -> np.ndarray:
    """The softmax of `logits` at `temperature`: p_i = exp(z_i / T) / sum_j exp(z_j / T)."""
    z = np.asarray(logits, dtype=float) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def agreement(a: dict, b: dict) -> float:
    """Share of test images on which two runs predict the same class."""
    pa, pb = a["test_predictions"], b["test_predictions"]
    return sum(x == y for x, y in zip(pa, pb)) / len(pa)


# The budget-matched baselines (issue 23): the scratch baseline given logit KD's training budget,
# each a variant of an ablation folder (results/ablation-budget/<variant>/, a results file per seed).
EQUAL_TRAINING_TIME, TEACHER_PLUS_STUDENT_EPOCHS = "equal-training-time", "teacher-plus-student-epochs"
# The distilled run the budgets, their comparisons and the verdict (kdlab.findings) are about.
LOGIT_KD_FROM_SCRATCH = run_of("kd_logits", "scratch")


def mean_seconds(results: list[dict]) -> float:
    """The mean training time (the training loop's wall_seconds) of a run over its seeds."""
    return sum(r["wall_seconds"] for r in results) / len(results)


def budget_matched_epochs(reference: dict[str, list[dict]]) -> dict[str, int]:
    """The baseline's epochs in each budget-matched variant, from a reference's results
    ({run: [results, by seed]}: load_seed_results). With logit KD from scratch and its baseline:

    - equal-training-time: as many baseline epochs as fit in logit KD's measured training time,
      floor(mean over seeds of logit KD's wall_seconds / mean over seeds of the baseline's
      wall_seconds per epoch). wall_seconds is the training loop's, validation included, so the
      teacher's forward passes are counted and its own training is not;
    - teacher-plus-student-epochs: the epochs of the teacher plus logit KD's epochs, the images the
      distilled student's pipeline trained on, teacher included.
    """
    kd = LOGIT_KD_FROM_SCRATCH
    baseline = baseline_of(kd)
    missing = [run for run in (TEACHER_RUN, baseline, kd) if not reference.get(run)]
    if missing:
        raise KdlabError(f"the budget-matched epochs need the results of {', '.join(missing)} in the "
                         f"reference; train them first (scripts/reference_run.py does).")
    baseline_per_epoch = sum(r["wall_seconds"] / r["epochs"] for r in reference[baseline]) / len(reference[baseline])
    teacher = next((r for r in reference[TEACHER_RUN] if training_seed(r) == DEFAULT_SEED), reference[TEACHER_RUN][0])
    return {EQUAL_TRAINING_TIME: int(mean_seconds(reference[kd]) / baseline_per_epoch),
            TEACHER_PLUS_STUDENT_EPOCHS: teacher["epochs"] + reference[kd][0]["epochs"]}


# The budgets logit KD from scratch is compared with its baseline at, as the report and the docs name
# them: the reference's own (both 20 epochs), then the budget-matched variants of the baseline.
EQUAL_EPOCHS = "equal-epochs"
BUDGETS = {EQUAL_EPOCHS: "at equal epochs", EQUAL_TRAINING_TIME: "at equal training time",
           TEACHER_PLUS_STUDENT_EPOCHS: "at equal total epochs, the teacher's included"}
BUDGET_DIR = "results/ablation-budget"   # beside results/reference, as the GPU plan writes it


def load_budget_baselines(folder: str | Path | None) -> dict[str, list[dict]]:
    """The budget-matched baselines in `folder` (load_seed_ablation), or none if it is not there."""
    return load_seed_ablation(folder) if folder is not None and Path(folder).is_dir() else {}
