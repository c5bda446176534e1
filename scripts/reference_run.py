"""The from-scratch reference run on one GPU, within a fixed time budget (issue: results worth reading).

One process, the data read once, everything written under --out as soon as it exists (so a
late failure or the time limit keeps what finished):
  1. the teacher (ResNet50 from scratch, its recipe's epochs, training seed 42);
  2. the ablation that picks the students' label smoothing: the scratch baseline at seed 42
     with and without it, paired (same seed, so same initialisation, batches and augmentation);
     the variant with the better validation accuracy (never the test) is the recipe below.
     The weight average and flip TTA need no extra run: every run records its raw and
     single-view figures beside the lab's;
  3. the reference: the three scratch students (baseline, logit KD, feature KD) at seeds
     42, 43, 44, in an order that puts the baseline-against-logit-KD pairs first; the
     ablation's winner is the baseline's seed 42 (train-or-load loads it, nothing retrains);
  4. the old LR (0.2) as a last ablation row, if time is left;
  5. the figures, drawn from the reference's results on the same GPU.
A run whose estimated time no longer fits the budget is skipped and named in the manifest.

    python scripts/reference_run.py --data-dir data --out OUT --budget 550

Written under OUT: results.tgz (reference/ with the results files, manifest.json and run.log,
ablation/<variant>/ with theirs) and figures.tgz. Run again with the same --ckpt-dir, it loads
what finished and trains what was skipped, adding its call to the manifest. On a CPU, `--trial` shrinks everything
(32 px, 1,000 images, 1-2 epochs) to check the script end to end; its output is never a result.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdlab.config import DEFAULT_SEED, TEACHER_RUN, run_id  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402

BASELINE, LOGIT_KD, FEATURE_KD = "student_scratch_baseline", "student_scratch_kd_scores", "student_scratch_kd_features"
SEEDS = (42, 43, 44)
# Reference runs by priority: the logit-KD question (baseline against logit KD, paired by seed)
# first, feature KD after; seed 42 of the baseline comes from the ablation.
REFERENCE_ORDER = ([(LOGIT_KD, 42)] + [(run, seed) for seed in SEEDS[1:] for run in (BASELINE, LOGIT_KD)]
                   + [(FEATURE_KD, seed) for seed in SEEDS])
# Ablation variants of the scratch baseline at seed 42, as overrides of the recipe.
LABEL_SMOOTHING_VARIANTS = {"label-smoothing-0.1": dict(label_smoothing=0.1),
                            "no-label-smoothing": dict(label_smoothing=0.0)}
LATE_VARIANT = ("lr-0.2", dict(lr=0.2))   # the previous recipe's LR, run last if time is left
# Seconds per epoch on the H200 before anything is measured here (results/reference/manifest.json
# of the previous run, whose overhead margin covers validation and checkpoints); replaced by the
# measured figure of each kind as soon as one run of it has finished.
FIRST_GUESS_S_PER_EPOCH = {"resnet50": 5.0, "ce": 2.9, "kd_logits": 3.9, "kd_features": 4.0}
FIGURES_RESERVE_S = 30
TRIAL = dict(image_size=32, limit_train=1000, batch_size=100, epochs=1, lr=0.05)


class Budget:
    """Seconds left, and the measured seconds per epoch of each kind of run, to size what fits."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds
        self.per_epoch = dict(FIRST_GUESS_S_PER_EPOCH)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    @staticmethod
    def kind(cfg) -> str:
        return "resnet50" if cfg.arch == "resnet50" else cfg.method

    def estimate(self, cfg) -> float:
        return cfg.epochs * self.per_epoch[self.kind(cfg)]

    def measured(self, cfg, seconds: float) -> None:
        self.per_epoch[self.kind(cfg)] = seconds / cfg.epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--ckpt-dir", default="/tmp/kdlab-reference-ckpt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=550, help="seconds for the whole script")
    parser.add_argument("--trial", action="store_true", help="tiny CPU check of this script")
    args = parser.parse_args()

    import torch
    from kdlab.lab import Lab

    if not args.trial and not torch.cuda.is_available():
        raise KdlabError("the reference run needs a CUDA GPU and none is visible to PyTorch; on a CPU, "
                         "--trial checks this script end to end in a few minutes.")
    budget = Budget(args.budget)
    out, ckpt = Path(args.out), Path(args.ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = ckpt / "out"                      # what results.tgz packs, rebuilt after every run
    (staging / "reference").mkdir(parents=True, exist_ok=True)
    log_file = open(staging / "reference" / "run.log", "a")

    def log(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()
        if "epoch" not in line or "test accuracy" in line:    # per-epoch lines: the log file only
            print(f"[{budget.left():5.0f}s left] {line}", flush=True)

    # Run again with the same --ckpt-dir (a second call on the same machine), the script loads
    # what finished, trains what was skipped, and adds its call to the same manifest.
    manifest_path = staging / "reference" / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else dict(
        trial=args.trial, seeds=list(SEEDS),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        torch_version=str(torch.__version__), python=sys.version.split()[0], runs={}, ablation={}, calls=[])
    call = dict(command=" ".join(["python", "scripts/reference_run.py", *sys.argv[1:]]),
                started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                budget_seconds=args.budget, skipped=[], failed={})
    manifest["calls"].append(call)
    started = time.perf_counter()
    shrink = TRIAL if args.trial else {}

    def save() -> None:
        call["wall_seconds"] = time.perf_counter() - started
        manifest_path.write_text(json.dumps(manifest, indent=1))
        with tarfile.open(out / "results.tgz", "w:gz") as tar:
            tar.add(staging, arcname=".")

    labs: list[Lab] = []   # the first reads the data; the others share it

    def lab_for(folder: Path, **overrides) -> Lab:
        lab = Lab(folder, args.data_dir, "cpu" if args.trial else "cuda", progress=False, log=log,
                  weights="none", teacher_epochs=2 if args.trial else None, **dict(shrink, **overrides))
        if labs:
            lab.share_data_with(labs[0])
        labs.append(lab)
        return lab

    def train(lab: Lab, name: str, seed: int, record: dict, key: str) -> dict | None:
        """Train-or-load one run if it fits the budget; record its results or why it has none."""
        cfg = lab.config(name, seed)
        need = budget.estimate(cfg)
        if need > budget.left() - FIGURES_RESERVE_S:
            call["skipped"].append(f"{key}: needs about {need:.0f}s, {budget.left():.0f}s left")
            log(f"skipped {key}: needs about {need:.0f}s, {budget.left():.0f}s left")
            save()
            return None
        begin = time.perf_counter()
        try:
            trained = lab.run(name, seed=seed)
        except (KdlabError, RuntimeError) as err:   # one failed run does not end the others
            call["failed"][key] = str(err)[:500]
            log(f"failed {key}: {err}")
            save()
            return None
        seconds = time.perf_counter() - begin
        if trained.trained:
            budget.measured(cfg, seconds)
            record[key] = dict(test_acc=trained.results["test_acc"], best_val_acc=trained.results["best_val_acc"],
                               seconds=seconds, training_seconds=trained.results["wall_seconds"])
        save()
        return trained.results

    reference = lab_for(ckpt / "reference")
    teacher = train(reference, TEACHER_RUN, DEFAULT_SEED, manifest["runs"], TEACHER_RUN)

    def ablate(variant: str, overrides: dict) -> dict | None:
        folder = ckpt / "ablation" / variant
        results = train(lab_for(folder, **overrides), BASELINE, DEFAULT_SEED, manifest["ablation"], variant)
        if results is not None:
            (staging / "ablation" / variant).mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / f"{BASELINE}_results.json", staging / "ablation" / variant)
            save()
        return results

    ablation = {variant: ablate(variant, overrides) for variant, overrides in LABEL_SMOOTHING_VARIANTS.items()}
    finished = {variant: r for variant, r in ablation.items() if r is not None}
    chosen = max(finished, key=lambda v: finished[v]["best_val_acc"]) if finished else None
    manifest["chosen"] = dict(variant=chosen, rule="the higher best validation accuracy (weight average, flip TTA)",
                              overrides=LABEL_SMOOTHING_VARIANTS.get(chosen))
    scores = ", ".join(f"{v} val {r['best_val_acc']:.4f}" for v, r in finished.items())
    log(f"ablation: chosen {chosen} ({scores})")
    if chosen is not None:
        reference = lab_for(ckpt / "reference", **LABEL_SMOOTHING_VARIANTS[chosen])
        for suffix in ("best.pt", "results.json"):   # the winner is the reference baseline's seed 42
            shutil.copy(ckpt / "ablation" / chosen / f"{BASELINE}_{suffix}", ckpt / "reference")
        order = [(BASELINE, DEFAULT_SEED)] + REFERENCE_ORDER
        if teacher is not None:
            for name, seed in order:
                train(reference, name, seed, manifest["runs"], run_id(name, seed))
        for name, seed in [(TEACHER_RUN, DEFAULT_SEED)] + order:
            path = ckpt / "reference" / f"{run_id(name, seed)}_results.json"
            if path.exists():
                shutil.copy(path, staging / "reference")
        save()
        late_variant, late_overrides = LATE_VARIANT
        ablate(late_variant, dict(LABEL_SMOOTHING_VARIANTS[chosen], **late_overrides))

    # The figures, from the reference's results, with latency measured on this GPU.
    if budget.left() > 10:
        from kdlab.figures import make_all_figures
        figures = ckpt / "figures"
        try:
            make_all_figures(staging / "reference", figures, ckpt_dir=ckpt / "reference",
                             device="cpu" if args.trial else "cuda")
            with tarfile.open(out / "figures.tgz", "w:gz") as tar:
                tar.add(figures, arcname="figures")
        except (KdlabError, RuntimeError, OSError) as err:
            call["failed"]["figures"] = str(err)[:500]
    call["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save()
    print(json.dumps({k: manifest[k] for k in ("gpu", "chosen", "runs", "ablation")}, indent=1, default=str))
    print(json.dumps(call, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KdlabError as err:   # no GPU, no data: one line, as the CLI says it
        print(f"reference_run: error: {err}", file=sys.stderr)
        sys.exit(2)
