"""The from-scratch reference run on one GPU, within a fixed time budget (issue: reference run).

Runs, in order, each writing under --out as it finishes (so a late failure keeps the rest):
  1. the throughput benchmark (benchmarks/throughput.py, no torch.compile), whose kdlab
     images/s per step kind tell how many epochs fit the budget;
  2. the lab's from-scratch runs (kdlab.config.SCRATCH_RUNS: teacher_resnet50 --weights none,
     and every student_scratch_* run) at the default resolution, with
     the default epochs (teacher 30, students 20) or, if the measured throughput says they do
     not fit, proportionally fewer (recorded in the manifest);
  3. the figures, made from the results on the same GPU (as figures.tgz);
  4. manifest.json: GPU, torch version, data copy, weights, date, wall times, command lines.

    python scripts/reference_run.py --data-dir data --out OUT --budget 540

On a CPU, `--trial` shrinks everything (32 px, 1,000 images, 1-2 epochs) to check the script
end to end before spending GPU time; its output is never a result.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from estimate_lab_time import TRAIN_IMAGES  # noqa: E402
from kdlab.config import SCRATCH_RUNS as RUNS  # noqa: E402
from kdlab.config import TEACHER_RUN, make_config, step_kind  # noqa: E402
from kdlab.data import NUM_CLASSES  # noqa: E402
from kdlab.registry import METHODS  # noqa: E402
from kdlab.report import load_benchmark  # noqa: E402

# Checkpoint writes, validation and model set-up on top of the training steps: a margin, measured
# as about 1 s per epoch on the CPU trial and kept generous.
EPOCH_OVERHEAD_S = 1.5


def run(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, float]:
    """Run `cmd`, appending its output to the log; returns (exit code, seconds)."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(1, timeout)).returncode
        except subprocess.TimeoutExpired:
            code = 124
    print(f"[{time.strftime('%H:%M:%S')}] exit {code} after {time.perf_counter() - start:.0f}s: "
          f"{' '.join(cmd[:4])} ...", flush=True)
    return code, time.perf_counter() - start


def choose_epochs(benchmark_json: Path, budget_s: float) -> dict:
    """Epochs for teacher and students that fit `budget_s`, from the measured images/s."""
    rows = {r["step"]: r["kdlab"]["images_per_s"] for r in load_benchmark(benchmark_json)["rows"]}
    # A method newer than the benchmark file is costed at the slowest distillation step it measured.
    slowest_kd = min(rate for kind, rate in rows.items() if kind in METHODS)
    # The scratch recipe of kdlab.config: its default epochs and its split.
    configs = {run: make_config(run, weights="none") for run in RUNS}
    eval_s = configs[TEACHER_RUN].val_per_class * NUM_CLASSES / rows["evaluation"]
    per_epoch = {run: TRAIN_IMAGES / rows.get(step_kind(cfg), slowest_kd) + eval_s + EPOCH_OVERHEAD_S
                 for run, cfg in configs.items()}
    full = sum(cfg.epochs * per_epoch[run] for run, cfg in configs.items())
    scale = min(1.0, budget_s / full)
    student_epochs = next(cfg.epochs for run, cfg in configs.items() if run != TEACHER_RUN)
    return dict(teacher=max(4, math.floor(configs[TEACHER_RUN].epochs * scale)),
                student=max(3, math.floor(student_epochs * scale)),
                scale=scale, estimated_seconds_at_default=full, seconds_per_epoch=per_epoch,
                images_per_s=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--ckpt-dir", default="/tmp/kdlab-reference-ckpt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole script")
    parser.add_argument("--trial", action="store_true", help="tiny CPU check of this script")
    args = parser.parse_args()

    started = time.perf_counter()
    deadline = started + args.budget
    out = Path(args.out)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    log_path = out / "run.log"
    py = sys.executable
    manifest = dict(command=" ".join([Path(py).name, *sys.argv]),
                    started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    trial=args.trial, budget_seconds=args.budget, runs=RUNS, steps={})

    def save_manifest():
        manifest["wall_seconds"] = time.perf_counter() - started
        (out / "reference" / "manifest.json").write_text(json.dumps(manifest, indent=1))

    import torch
    manifest.update(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
                    torch_version=str(torch.__version__), python=sys.version.split()[0])

    # 1. The benchmark: also the throughput that sizes the lab.
    bench_json = out / "benchmark.json"
    bench_cmd = [py, "benchmarks/throughput.py", "--device", "cuda" if not args.trial else "cpu",
                 "--no-compile", "--json", str(bench_json), "--note", "reference-run machine"]
    if args.trial:
        bench_cmd.append("--tiny")
    code, seconds = run(bench_cmd, log_path, timeout=min(170, deadline - time.perf_counter() - 300))
    manifest["steps"]["benchmark"] = dict(command=" ".join(bench_cmd), exit=code, seconds=seconds)
    save_manifest()

    # 2. The lab, sized to what is left (figures and the manifest need about a minute).
    lab_budget = deadline - time.perf_counter() - 75
    try:
        epochs = choose_epochs(bench_json, lab_budget)
    except (OSError, KeyError, ValueError, ZeroDivisionError) as err:
        # No throughput measured: a conservative guess rather than no run at all.
        epochs = dict(teacher=12, student=8, scale=None, error=f"benchmark unreadable: {err}")
    if args.trial:
        epochs.update(teacher=2, student=1)
    manifest["epochs"] = epochs
    lab_cmd = [py, "-m", "kdlab", "run", *RUNS, "--weights", "none", "--data-dir", args.data_dir,
               "--ckpt-dir", args.ckpt_dir, "--results-dir", str(out / "reference"),
               "--epochs", str(epochs["student"]), "--teacher-epochs", str(epochs["teacher"])]
    if args.trial:
        lab_cmd += ["--image-size", "32", "--limit-train", "1000", "--batch-size", "100"]
    code, seconds = run(lab_cmd, log_path, timeout=deadline - time.perf_counter() - 45)
    manifest["steps"]["lab"] = dict(command=" ".join(lab_cmd), exit=code, seconds=seconds)
    manifest["data"] = {}
    for name in RUNS:
        path = out / "reference" / f"{name}_results.json"
        if path.exists():
            r = json.loads(path.read_text())
            manifest["data"] = r["data"]
            manifest.setdefault("run_seconds", {})[name] = r["wall_seconds"]
            manifest.setdefault("test_acc", {})[name] = r["test_acc"]
            manifest.setdefault("weights", {})[name] = r["weights"]
    save_manifest()

    # 3. Figures from those results, with latency measured on this GPU.
    # The device tool returns at most 8 files: the figures travel as one archive.
    figures_dir = Path(tempfile.mkdtemp(prefix="kdlab-figures-"))
    fig_cmd = [py, "-m", "kdlab", "figures", "--results-dir", str(out / "reference"),
               "--ckpt-dir", args.ckpt_dir, "--out", str(figures_dir)]
    code, seconds = run(fig_cmd, log_path, timeout=deadline - time.perf_counter() - 5)
    manifest["steps"]["figures"] = dict(command=" ".join(fig_cmd), exit=code, seconds=seconds)
    with tarfile.open(out / "figures.tgz", "w:gz") as tar:
        tar.add(figures_dir, arcname="figures")
    manifest["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save_manifest()
    print(json.dumps({k: manifest.get(k) for k in ("gpu", "epochs", "test_acc", "run_seconds", "wall_seconds")},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
