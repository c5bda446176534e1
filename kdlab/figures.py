"""The lab's figures and efficiency table, made from results files alone.

Every chart reads the `<run>_results.json` files of a folder (the checkpoint folder, or a
results folder such as results/reference/): nothing downloads, nothing trains. Only the
efficiency table looks further, measured by kdlab.measure: at the size of each `<run>_best.pt`
on disk, and at the two architectures, counted and timed on this machine. Each figure says where its numbers came
from, and a smoke run's figure says in red that it is not a result.

The data section of the notebook adds two views that need the data itself: the class counts
of each split and a grid of sample images (`class_counts_table`, `save_sample_grid`).
"""
from __future__ import annotations

import base64
import json
import math
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from kdlab.config import CLASSES, NUM_CLASSES, RUNS, TEACHER_RUN, baseline_of, expected_runs, run_label
from kdlab.errors import KdlabError
from kdlab.findings import Findings
from kdlab.folders import writable_folder
from kdlab.latex import markdown_table
from kdlab.registry import METHODS
from kdlab.results import (BUDGETS, LOGIT_KD_FROM_SCRATCH, STEP_DESCRIPTIONS, agreement, best_distilled, best_student,
                           default_seed_results, distillation_temperature, load_budget_baselines, load_deploy,
                           load_efficiency, load_seed_results, softened, teacher_note)
from kdlab.stats import correct_images, difference_points, per_class_interval_text, summarise

ORIGINAL_LAB_LABEL = "original lab (reference)"   # beside kdlab.config.Run.original_lab_test_acc
# One colour per run, the same on every chart: matplotlib's ten-colour cycle, in the run table's order.
PALETTE = colormaps["tab10"].colors
# Line style, marker and colour of the loss terms a method logs (kdlab.registry), in its order with
# CE first, so that the terms of one run stay apart, in print too.
TERM_STYLES = (dict(linestyle="-", marker="o", color="0.15"), dict(linestyle="--", marker="s", color="#e6550d"),
               dict(linestyle=":", marker="^", color="#3182bd"), dict(linestyle="-.", marker="d", color="#756bb1"))
SMOKE_BANNER = "SMOKE RUN: synthetic data, not results"
DPI = 150


# ----------------------------------------------------------------------------- results

def source_line(results: list[dict], origin: str = "") -> str:
    """Where the numbers of a figure came from: the data, the training device, the folder."""
    data = "; ".join(sorted({r["data"] for r in results}))
    devices = ", ".join(sorted({r["device_name"] for r in results}))
    where = f" | results from {origin}" if origin else ""
    return f"data: {data} | trained on: {devices}{where}"


def format_config_table(configs) -> str:
    """The settings each run trains with (kdlab.config.RunConfig), as a markdown table."""
    rows = [[c.run, c.arch, c.weights, METHODS[c.method].name, c.epochs, c.image_size, c.batch_size, c.lr,
             ", ".join(f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in asdict(c.settings).items())
             or "-"] for c in configs]
    return markdown_table(["run", "arch", "start", "method", "epochs", "image px", "batch", "peak lr",
                           "method settings"], rows, "llllrrrrl")


def format_results_table(seeds: dict[str, list[dict]], findings: Findings | None = None) -> str:
    """The runs' accuracies and budgets as a markdown table, the original lab's figures beside them.

    `seeds`: every seed's results by run (kdlab.results.load_seed_results). Test accuracy is the
    mean and standard deviation over the seeds; each distillation run is compared with the
    cross-entropy run of the same start, paired by seed on the same test images (`findings`: the
    comparisons of `seeds`, if computed already). The other columns are those of the default seed
    (or the first one).
    """
    findings = findings or Findings(seeds)
    rows = []
    for run, runs in seeds.items():
        r, summary, d = runs[0], summarise(runs), findings.gain(run)
        spread = "" if summary["std"] is None else f" ± {summary['std']:.4f}"
        rows.append([run, "ImageNet" if r["weights"] == "imagenet" else "scratch", summary["n_seeds"],
                     f"{summary['mean']:.4f}{spread}", difference_points(d, "pts") if d else "",
                     f"{r['best_val_acc']:.4f} ({r['best_epoch']})", r["epochs"], f"{r['wall_seconds']:.0f}",
                     r["device_name"]])
    lines = [markdown_table(["run", "start", "seeds", "test acc, mean ± sd", "paired gain over its baseline [95% "
                             "interval]", "best val acc (epoch)", "epochs", "train time (s)", "trained on"],
                            rows, "llrrrrrrl")]
    lines += [f"| {run}, {ORIGINAL_LAB_LABEL} | ImageNet | | {acc:.4f} | | | | | |"
              for run, acc in original_lab_accuracies().items()]
    if note := teacher_note(seeds):
        lines.append(f"\n{note}")
    if any(r["smoke"] for runs in seeds.values() for r in runs):
        lines.append(f"\n{SMOKE_BANNER}")
    return "\n".join(lines)


EVALUATIONS = {"raw_single": "raw weights, one view", "raw_flip": "raw weights, flip TTA",
               "average_single": "weight average, one view", "average_flip": "weight average, flip TTA (the lab's)"}


def format_evaluation_table(seeds: dict[str, list[dict]]) -> str:
    """Test accuracy of each run under each evaluation (mean over its seeds): what the weight
    average and the flip buy. Raw weights: those after the last epoch."""
    rows = []
    for run, runs in seeds.items():
        runs = [r for r in runs if "test_acc_by_evaluation" in r]
        if runs:
            rows.append([run, len(runs), *(f"{sum(r['test_acc_by_evaluation'][key] for r in runs) / len(runs):.4f}"
                                           for key in EVALUATIONS)])
    return markdown_table(["run", "seeds", *EVALUATIONS.values()], rows, "lr" + "r" * len(EVALUATIONS))


def format_ablation_table(ablation: dict[str, dict]) -> str:
    """One row per ablation variant (a results file each): its settings and its accuracies."""
    rows = [[variant, f"{r['config']['label_smoothing']:g}", f"{r['config']['lr']:g}",
             f"{r['best_val_acc']:.4f} ({r['best_epoch']})", f"{r['test_acc']:.4f}",
             f"{r['test_acc_by_evaluation']['raw_single']:.4f}"] for variant, r in ablation.items()]
    return markdown_table(["variant", "label smoothing", "lr", "best val acc (epoch)", "test acc",
                           "test acc, raw weights, one view"], rows, "lrrrrr")


# ----------------------------------------------------------------------------- figure frame

def _figure(title: str, source: str, smoke: bool, size: tuple[float, float],
            nrows: int = 1, ncols: int = 1, missing: list[str] = (), width_ratios=None):
    """A figure drawn by Agg whatever the session's backend, with its title, its data source and
    the runs it lacks."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    # Bands of fixed height (inches) above the axes for the banner and the title, below them
    # for the missing runs and the source; the layout engine fits the axes in between.
    inch = 1 / size[1]
    banner, heading, footer, notice = 0.35 * smoke, 0.45, 0.25, 0.25 * bool(missing)
    top, bottom = 1 - (banner + heading) * inch, (footer + notice) * inch
    fig.get_layout_engine().set(rect=(0, bottom, 1, top - bottom))
    if smoke:
        fig.text(0.5, 1 - 0.05 * inch, SMOKE_BANNER, ha="center", va="top", color="red",
                 fontsize=13, weight="bold")
    fig.text(0.5, 1 - (banner + 0.08) * inch, title, ha="center", va="top", fontsize=12)
    fig.text(0.5, 0.05 * inch, source, ha="center", va="bottom", fontsize=6.5, color="0.35", wrap=True)
    if missing:
        fig.text(0.5, footer * inch, "missing runs (no results file): " + ", ".join(missing),
                 ha="center", va="bottom", fontsize=8, color="#b35900", wrap=True)
    return fig, fig.subplots(nrows, ncols, squeeze=False, width_ratios=width_ratios)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def run_colour(run: str):
    return PALETTE[list(RUNS).index(run) % len(PALETTE)]


def original_lab_accuracies() -> dict[str, float]:
    return {name: run.original_lab_test_acc for name, run in RUNS.items() if run.original_lab_test_acc is not None}


def _run_ticks(ax, runs: list[str], results: dict[str, dict]) -> None:
    """One tick per run on the x axis, its label broken before the start, the method and a bracket:
    eight runs side by side stay apart."""
    ax.set_xticks(range(len(runs)), [run_label(run, results).replace(" from ", "\nfrom ").replace(" + ", "\n+ ")
                                     .replace(" (", "\n(") for run in runs], fontsize=8)


# ----------------------------------------------------------------------------- training figures

def plot_validation_accuracy(results: dict[str, dict], seeds: dict[str, list[dict]], missing: list[str],
                             out_dir: Path, origin: str = "") -> Path:
    """comparaison_finale.png: validation accuracy per epoch, every run on one chart.

    A run with several seeds is drawn as the mean over its seeds, in a band from the lowest to
    the highest seed at each epoch.
    """
    fig, [[ax]] = _figure("Validation accuracy per epoch", source_line(list(results.values()), origin),
                          _smoke(results), (9, 5.5), missing=missing)
    for run, r in results.items():
        runs = [s for s in seeds[run] if len(s["history"]) == len(r["history"])]
        epochs = [h["epoch"] for h in r["history"]]
        curves = np.array([[100 * h["val_acc"] for h in s["history"]] for s in runs])
        label = run_label(run, results) + (f" (mean of {len(runs)} seeds, band: min-max)" if len(runs) > 1 else "")
        ax.plot(epochs, curves.mean(0), marker="o", markersize=3, color=run_colour(run), label=label)
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=run_colour(run), alpha=0.2, linewidth=0)
    ax.set(xlabel="epoch", ylabel=f"validation accuracy (%, {_count(results, 'n_val')} images)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "comparaison_finale.png")


def plot_test_accuracy(results: dict[str, dict], seeds: dict[str, list[dict]], missing: list[str],
                       out_dir: Path, origin: str = "", budget: dict[str, list[dict]] | None = None) -> Path:
    """comparison_test_accuracy.png: our test accuracy per run, the original lab's beside it, and the
    budget-matched baselines after the runs, where there are any.

    A run with several seeds: the bar is their mean, the error bar one standard deviation
    (ddof 1), and each seed a dot. `budget`: the baseline given logit KD's budget, by variant
    (kdlab.results.load_budget_baselines), drawn hatched in the baseline's colour.
    """
    reference = original_lab_accuracies()
    runs = [run for run in RUNS if run in results or run in reference]
    budget = budget or {}
    fig, [[ax]] = _figure("Test accuracy per run", source_line(list(results.values()), origin),
                          _smoke(results), (11, 6), missing=missing)
    width = 0.38
    shown = [100 * r["test_acc"] for run in runs for r in seeds.get(run, [])] + [
        100 * acc for acc in reference.values()] + [100 * r["test_acc"] for rs in budget.values() for r in rs]
    # Gains of a point or less are the question: the axis starts below the lowest bar, not at 0.
    bottom = max(0, 10 * math.floor((min(shown) - 5) / 10))
    for x, run in enumerate(runs):
        ours_x = x - width / 2 if run in reference else x
        if run in results:
            summary = summarise(seeds[run])
            mean, std = 100 * summary["mean"], summary["std"]
            bars = ax.bar(ours_x, mean, width, color=run_colour(run),
                          yerr=None if std is None else 100 * std, capsize=4)
            label = f"{mean:.2f}" if std is None else f"{mean:.2f}\n±{100 * std:.2f}\n({summary['n_seeds']} seeds)"
            ax.bar_label(bars, labels=[label], fontsize=7, padding=2)
            if summary["n_seeds"] > 1:
                ax.plot([ours_x] * summary["n_seeds"], [100 * r["test_acc"] for r in seeds[run]],
                        "o", color="black", markersize=3, zorder=3)
        else:
            ax.text(ours_x, bottom + 1, "missing" if run in missing else "not in these results", rotation=90,
                    ha="center", va="bottom", fontsize=8)
        if run in reference:
            bars = ax.bar(x + width / 2, 100 * reference[run], width, facecolor="white",
                          edgecolor=run_colour(run), hatch="//")
            ax.bar_label(bars, fmt="%.2f", fontsize=8, color="0.3")
    baseline = baseline_of(LOGIT_KD_FROM_SCRATCH)
    for x, (variant, variant_seeds) in enumerate(budget.items(), start=len(runs)):
        summary = summarise(variant_seeds)
        bars = ax.bar(x, 100 * summary["mean"], width, facecolor="white", edgecolor=run_colour(baseline),
                      hatch="..", yerr=None if summary["std"] is None else 100 * summary["std"], capsize=4)
        ax.bar_label(bars, labels=[f"{100 * summary['mean']:.2f}\n({summary['n_seeds']} seeds)"], fontsize=7,
                     padding=2)
        ax.plot([x] * summary["n_seeds"], [100 * r["test_acc"] for r in variant_seeds], "o", color="black",
                markersize=3, zorder=3)
    _run_ticks(ax, runs, results)
    if budget:
        ax.set_xticks(range(len(runs) + len(budget)), [t.get_text() for t in ax.get_xticklabels()] + [
            f"{run_label(baseline, results)}\n{runs_[0]['epochs']} epochs:\n{BUDGETS[variant].removeprefix('at ')}"
            for variant, runs_ in budget.items()], fontsize=8)
    ax.set(ylabel=f"test accuracy (%, {_count(results, 'n_test')} images; the axis starts at {bottom}%)",
           ylim=(bottom, max(shown) + (max(shown) - bottom) * 0.3))
    ax.legend(handles=[Patch(facecolor="0.5", label="this lab (results files): mean ± std over seeds, dots: seeds"),
                       Patch(facecolor="white", edgecolor="0.3", hatch="//", label=ORIGINAL_LAB_LABEL)],
              loc="upper right", fontsize=8)
    return _save(fig, out_dir / "comparison_test_accuracy.png")


def plot_training_losses(results: dict[str, dict], missing: list[str], out_dir: Path,
                         origin: str = "") -> Path:
    """training_losses.png: each loss term of each run, by the name its method logs."""
    ncols = min(3, len(results))
    nrows = math.ceil(len(results) / ncols)
    fig, axes = _figure("Training loss per epoch, each term as the loop sums it",
                        source_line(list(results.values()), origin), _smoke(results),
                        (4.2 * ncols + 1, 3.4 * nrows + 1), nrows, ncols, missing)
    for ax, (run, r) in zip(axes.flat, results.items()):
        epochs = [h["epoch"] for h in r["history"]]
        terms = sorted(r["history"][0]["losses"], key=lambda term: term != "ce")
        for term, style in zip(terms, TERM_STYLES):
            ax.plot(epochs, [h["losses"][term] for h in r["history"]], markersize=4, label=term, **style)
        if len(terms) > 1:
            ax.plot(epochs, [h["train_loss"] for h in r["history"]], color=run_colour(run),
                    linewidth=3, alpha=0.35, label="total")
        ax.set(title=run_label(run, results), xlabel="epoch", ylabel="loss (epoch mean)")
        ax.title.set_fontsize(9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=4)   # long enough to show each term's dashes
    for ax in list(axes.flat)[len(results):]:
        ax.set_axis_off()
    return _save(fig, out_dir / "training_losses.png")


def plot_run_curves(r: dict, out_dir: str | Path, origin: str = "") -> Path:
    """curves_<run>.png: loss and accuracy per epoch of one run, train and validation."""
    run, history = r["run"], r["history"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, [[loss_ax, acc_ax]] = _figure(f"{run_label(run, {run: r})}: test accuracy {100 * r['test_acc']:.2f}% "
                                       f"(best validation epoch {r['best_epoch']} of {r['epochs']})",
                                       source_line([r], origin), r["smoke"], (10, 4.2), 1, 2)
    epochs = [h["epoch"] for h in history]
    line = dict(marker="o", color=run_colour(run))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], **line, label="train (all terms)")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], **line, linestyle="--",
                 label="validation (cross-entropy)")
    loss_ax.set(xlabel="epoch", ylabel="loss (epoch mean)")
    acc_ax.plot(epochs, [100 * h["train_acc"] for h in history], **line, label="train (augmented batches)")
    acc_ax.plot(epochs, [100 * h["val_acc"] for h in history], **line, linestyle="--", label="validation")
    acc_ax.axhline(100 * r["test_acc"], color="0.3", linestyle=":", label="test (best-on-val weights)")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.axvline(r["best_epoch"], color="0.7", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir / f"curves_{run}.png")


# ----------------------------------------------------------------------------- predictions

def confusion_counts(predictions, labels) -> np.ndarray:
    """(true class, predicted class) -> number of test images."""
    pairs = np.asarray(labels) * NUM_CLASSES + np.asarray(predictions)
    return np.bincount(pairs, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def plot_confusion_matrix(r: dict, out_dir: Path, origin: str = "") -> Path:
    """confusion_matrix.png: share of each true class given to each predicted class."""
    counts = confusion_counts(r["test_predictions"], r["test_labels"])
    shares = 100 * counts / counts.sum(1, keepdims=True).clip(min=1)
    fig, [[ax]] = _figure(f"Confusion matrix of the best student, {run_label(r['run'], {r['run']: r})} "
                          f"(test accuracy {100 * r['test_acc']:.2f}%)",
                          source_line([r], origin), r["smoke"], (8.5, 7.5))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=100)
    for true, pred in np.ndindex(shares.shape):
        ax.text(pred, true, f"{shares[true, pred]:.0f}", ha="center", va="center", fontsize=7,
                color="white" if shares[true, pred] > 50 else "black")
    ax.set_xticks(range(NUM_CLASSES), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(NUM_CLASSES), CLASSES)
    ax.set(xlabel="predicted class", ylabel=f"true class ({len(r['test_labels'])} test images)")
    fig.colorbar(image, ax=ax, label="share of the true class (%)")
    return _save(fig, out_dir / "confusion_matrix.png")


def teacher_agreement(results: dict[str, dict]) -> dict[str, float]:
    """Share of test images on which each student predicts the teacher's class."""
    return {run: agreement(r, results[TEACHER_RUN]) for run, r in results.items() if run != TEACHER_RUN}


def plot_agreement(results: dict[str, dict], missing: list[str], out_dir: Path, origin: str = "") -> Path:
    """agreement.png: how often each student predicts what the teacher predicts."""
    agreement = teacher_agreement(results)
    fig, [[ax]] = _figure("Teacher-student agreement on the test set",
                          source_line(list(results.values()), origin), _smoke(results), (9, 5.5),
                          missing=missing)
    runs = list(agreement)
    bars = ax.bar(range(len(runs)), [100 * agreement[run] for run in runs], color=[run_colour(run) for run in runs])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    _run_ticks(ax, runs, results)
    ax.set(ylabel=f"same class as the teacher (% of {_count(results, 'n_test')} test images)",
           ylim=(0, 108))
    return _save(fig, out_dir / "agreement.png")


def plot_soft_targets(teacher: dict, temperature: float, out_dir: str | Path, origin: str = "") -> Path:
    """soft_targets.png: what the teacher knows, for the test images its results file keeps
    (kdlab.checkpoints.soft_target_examples): its class probabilities at T = 1 and at the lab's
    temperature, the soft targets a distilled student learns from."""
    if not (examples := teacher.get("soft_target_examples")):
        raise KdlabError(f"the teacher's results (seed {teacher['config']['seed']}) keep no soft-target examples "
                         f"(written by an older kdlab); train the teacher again with --retrain to record them.")
    fig, axes = _figure(f"What the teacher knows: its class probabilities at T = 1 and at T = {temperature:g}, "
                        f"the targets logit KD trains the student on",
                        source_line([teacher], origin), teacher["smoke"], (11, 1.9 * len(examples) + 1.2),
                        len(examples), 2, width_ratios=(1, 6))
    x = np.arange(NUM_CLASSES)
    width = 0.4
    for (image_ax, bars_ax), example in zip(axes, examples):
        image = np.frombuffer(base64.b64decode(example["image"]), dtype=np.uint8).reshape(3, 32, 32)
        image_ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        image_ax.set_axis_off()
        image_ax.set_title(f"test image {example['test_index']}\ntrue class: {CLASSES[example['label']]}",
                           fontsize=8)
        for offset, t, colour in ((-width / 2, 1.0, "0.7"), (width / 2, temperature, run_colour(TEACHER_RUN))):
            probabilities = 100 * softened(example["logits"], t)
            bars = bars_ax.bar(x + offset, probabilities, width, label=f"T = {t:g}", color=colour)
            bars_ax.bar_label(bars, labels=[f"{p:.0f}" if p >= 1 else "" for p in probabilities], fontsize=6)
        bars_ax.set(ylim=(0, 115), ylabel="probability (%)")
        bars_ax.set_xticks(x, CLASSES if example is examples[-1] else [""] * NUM_CLASSES, fontsize=8)
        bars_ax.grid(axis="y", alpha=0.3)
    axes[0, 1].legend(fontsize=8, loc="upper left", ncols=2)
    return _save(fig, writable_folder(out_dir, "--out folder") / "soft_targets.png")


def plot_per_class_accuracy(findings: Findings, out_dir: Path, origin: str = "") -> Path:
    """per_class_accuracy.png: the best distilled student against its baseline, class by class (mean
    over their shared seeds), and its gain per class, paired, with intervals that hold at 95% together
    (Findings.per_class)."""
    kd, base, by_class = findings.per_class
    seeds, results = findings.seeds, findings.results
    shared = set(by_class[0]["seeds"])
    labels = np.asarray(results[kd]["test_labels"])
    fig, axes = _figure(f"Per-class test accuracy: {run_label(kd, results)} against {run_label(base, results)}",
                        source_line([results[kd], results[base]], origin), _smoke(results), (11, 7.5), 2, 1)
    accuracy_ax, gain_ax = axes[:, 0]
    x = np.arange(NUM_CLASSES)
    width = 0.38
    for offset, run in ((-width / 2, base), (width / 2, kd)):
        per_seed = [[correct_images(r)[labels == c].mean() for c in range(NUM_CLASSES)]
                    for r in seeds[run] if r["config"]["seed"] in shared]
        means = 100 * np.mean(per_seed, axis=0)
        seeds_note = f"mean of {len(per_seed)} seeds" if len(per_seed) > 1 else f"seed {min(shared)}"
        bars = accuracy_ax.bar(x + offset, means, width, color=run_colour(run),
                               label=f"{run_label(run, results)} ({seeds_note})")
        accuracy_ax.bar_label(bars, fmt="%.1f", fontsize=7)
    # Gains of a point are the question: the axis starts below the lowest bar, not at 0.
    bottom = min(bar.get_height() for bar in accuracy_ax.patches)
    accuracy_ax.set(ylabel=f"test accuracy (%, {np.sum(labels == 0):,} images a class)",
                    ylim=(max(0, 10 * math.floor((bottom - 5) / 10)), 112))
    accuracy_ax.legend(fontsize=8, loc="upper center", ncols=2)
    gains = np.array([100 * d["mean_difference"] for d in by_class])
    spans = np.array([[100 * (d["mean_difference"] - d["ci_low"]), 100 * (d["ci_high"] - d["mean_difference"])]
                      for d in by_class]).T
    colours = [run_colour(kd) if d["excludes_zero"] else "0.6" for d in by_class]
    gain_ax.bar(x, gains, 0.6, color=colours, yerr=spans, capsize=4)
    gain_ax.axhline(0, color="0.2", linewidth=0.8)
    gain_ax.set(ylabel=f"gain (points), {per_class_interval_text(by_class)}",
                title="paired by seed on the same test images; grey: the interval includes zero")
    gain_ax.title.set_fontsize(9)
    for ax in (accuracy_ax, gain_ax):
        ax.set_xticks(x, CLASSES, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_dir / "per_class_accuracy.png")


# ----------------------------------------------------------------------------- efficiency

def format_efficiency_table(efficiency: dict) -> str:
    """efficiency.md, efficiency.json: per run, parameters, FLOPs per image (a
    multiply-add counts 2), checkpoint size, batch-1 latency, throughput and test accuracy, with the
    device and the date they were measured on; given a deploy.json, the batch-1 latency on its CPU of
    each deployed variant too."""
    cpu = efficiency.get("cpu")
    variants = cpu["variants"] if cpu else {}
    rows = [[run, f"{e['params'] / 1e6:.2f}", f"{e['flops_per_image'] / 1e9:.3f}", f"{e['checkpoint_mb']:.1f}",
             f"{e['latency_ms']:.2f}", f"{e['throughput_img_s']:.0f}", f"{e['test_acc']:.4f}",
             *(f"{e['cpu_latency_ms'][v]:.2f}" if "cpu_latency_ms" in e else "not measured" for v in variants)]
            for run, e in efficiency["runs"].items()]
    header = ["run", "params (M)", "GFLOPs / image", "checkpoint (MB)", "latency, batch 1 (ms)",
              f"throughput, batch {efficiency['timing']['throughput_batch']} (img/s)", "test acc",
              *(f"{label}, CPU (ms)" for label in variants.values())]
    lines = [markdown_table(header, rows, "l" + "r" * (len(header) - 1)),
             f"\nMeasured {efficiency['measured']} on {efficiency['device']}, {efficiency['image_size']} px inputs."
             + (f" Not measured there: {', '.join(efficiency['not_measured'])}."
                if efficiency.get("not_measured") else "")]
    if cpu:
        lines.append(f"CPU latency: {cpu['source']}, measured {cpu['measured']} on {cpu['model']}, "
                     f"{cpu['threads']} thread(s).")
    if efficiency["smoke"]:
        lines.append(SMOKE_BANNER)
    return "\n".join(lines)


def with_cpu_latency(efficiency: dict, deployment: dict, source: str) -> dict:
    """The efficiency table with each deployed run's batch-1 CPU latency per variant, from deploy.json."""
    if deployment["smoke"] and not efficiency["smoke"]:
        raise KdlabError(f"{source} measured smoke weights; their latencies are never shown beside results. "
                         f"Deploy the runs' own weights (`python -m kdlab deploy --ckpt-dir <their folder>`).")
    runs = {run: dict(e, cpu_latency_ms={v: m["latency_ms"] for v, m in deployment["runs"][run]["variants"].items()})
            if run in deployment["runs"] else e for run, e in efficiency["runs"].items()}
    cpu = dict(source=source, measured=deployment["measured"], model=deployment["cpu"]["model"],
               threads=deployment["cpu"]["threads"], variants=deployment["variants"])
    return dict(efficiency, runs=runs, cpu=cpu)


def plot_efficiency(efficiency: dict, results: dict[str, dict], missing: list[str], out_dir: Path,
                    origin: str = "") -> Path:
    """efficiency.png: test accuracy against three costs: parameters, FLOPs, latency."""
    source = f"{source_line(list(results.values()), origin)} | timed on {efficiency['device']}"
    fig, axes = _figure("Test accuracy against cost", source, efficiency["smoke"], (13, 4.6), 1, 3, missing)
    costs = [("params", 1e-6, "parameters (millions)"),
             ("flops_per_image", 1e-9, "GFLOPs per image (FlopCounterMode)"),
             ("latency_ms", 1, f"latency at batch 1 (ms, {efficiency['device']})")]
    for ax, (key, scale, label) in zip(axes[0], costs):
        for run, e in efficiency["runs"].items():
            ax.scatter(e[key] * scale, 100 * e["test_acc"], s=60, color=run_colour(run),
                       label=run_label(run, results), zorder=3)
        ax.set(xlabel=label, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out_dir / "efficiency.png")


# Marker of each way a run is deployed (kdlab.deploy.VARIANTS); the colour is the run's.
VARIANT_MARKERS = {"pytorch_fp32": "o", "onnxruntime_fp32": "s", "onnxruntime_int8": "^"}


def plot_deploy(deployment: dict, out_dir: str | Path) -> Path:
    """deploy.png: test accuracy against CPU latency at batch 1, every run in every deployed variant
    (PyTorch fp32, ONNX Runtime fp32 and int8), from deploy.json."""
    cpu = deployment["cpu"]
    source = (f"data: {deployment['data']} | measured {deployment['measured']} on {cpu['model']}, "
              f"{cpu['threads']} thread(s), int8 instructions: {', '.join(cpu['int8_instructions']) or 'none known'}")
    fig, [[ax]] = _figure("Deployed on a CPU: test accuracy against latency", source, deployment["smoke"], (8, 5))
    for run, measured in deployment["runs"].items():
        points = [(v["latency_ms"], 100 * v["test_acc"]) for v in measured["variants"].values()]
        ax.plot(*zip(*points), color=run_colour(run), alpha=0.4, zorder=2)
        for variant, v in measured["variants"].items():
            ax.scatter(v["latency_ms"], 100 * v["test_acc"], s=60, color=run_colour(run),
                       marker=VARIANT_MARKERS[variant], zorder=3)
    runs = [Patch(color=run_colour(run), label=run_label(run, deployment["runs"])) for run in deployment["runs"]]
    variants = [ax.scatter([], [], marker=VARIANT_MARKERS[v], color="0.3", label=label)
                for v, label in deployment["variants"].items()]
    ax.legend(handles=runs + variants, fontsize=7)
    ax.set(xscale="log", xlabel="latency at batch 1 (ms, log scale)", ylabel="test accuracy (%, one view)")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, Path(out_dir) / "deploy.png")


def format_deploy_table(deployment: dict) -> str:
    """deploy.json as a markdown table: each run in each variant, with the weights, the CPU and the
    ratio of each variant's batch-1 latency to the run's PyTorch fp32 latency."""
    rows = [[run, deployment["variants"][variant], f"{v['size_mb']:.1f}", f"{v['latency_ms']:.2f}",
             f"{measured['variants']['pytorch_fp32']['latency_ms'] / v['latency_ms']:.1f}x",
             f"{v['throughput_img_s']:.0f}", f"{v['test_acc']:.4f}", f"{100 * v['agreement_with_pytorch']:.2f}%"]
            for run, measured in deployment["runs"].items() for variant, v in measured["variants"].items()]
    lines = [markdown_table(["run", "variant", "size (MB)", "latency, batch 1 (ms)", "speed-up over PyTorch fp32",
                             "throughput, batch 64 (img/s)", "test acc, one view", "agrees with PyTorch"],
                            rows, "llrrrrrr")]
    cpu = deployment["cpu"]
    weights = "; ".join(f"{run}: {m['checkpoint']} (sha256 {m['sha256'][:12]})" for run, m in deployment["runs"].items())
    lines.append(f"\nMeasured {deployment['measured']} on {cpu['model']}, {cpu['threads']} thread(s), int8 "
                 f"instructions {', '.join(cpu['int8_instructions']) or 'none known'}; torch "
                 f"{deployment['software']['torch']}, onnxruntime {deployment['software']['onnxruntime']}; "
                 f"{deployment['data']}; weights: {weights}.")
    if deployment["smoke"]:
        lines.append(SMOKE_BANNER)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training speed

PATH_COLOURS = {"kdlab": "#1f77b4", "naive": "#bbbbbb"}


def plot_throughput(bench: dict, out_path: str | Path, origin: str = "") -> Path:
    """throughput.png: images/s of kdlab's path and of a typical notebook's, per step kind, and
    the share of the GPU's peak kdlab's reaches, from a benchmarks/throughput.py results file
    (`python -m kdlab.benchmark_tables RESULTS --plot PNG` draws it)."""
    rows = bench["rows"]
    peak = bench.get("peak_tflops")
    where = f" | from {origin}" if origin else ""
    source = (f"measured on {bench['device_name']}, torch {bench['torch_version']}, {bench['image_size']} px, "
              f"batch {bench['batch_size']}, synthetic images, random weights{where}")
    fig, axes = _figure("Training speed: kdlab's path against a typical notebook's, same device, same run",
                        source, False, (12, 4.8), 1, 2 if peak else 1)
    speed_ax = axes[0, 0]
    x = np.arange(len(rows))
    width = 0.38
    dtype = next((name for key, name in (("bfloat16", "bf16"), ("float16", "fp16")) if key in bench["kdlab_path"]),
                 "fp32")
    for offset, path, label in ((-width / 2, "kdlab", f"kdlab (data on the device, {dtype}, channels_last)"),
                                (width / 2, "naive", "naive (PIL DataLoader, 2 workers, fp32)")):
        speed_ax.bar(x + offset, [r[path]["images_per_s"] for r in rows], width, color=PATH_COLOURS[path],
                     label=label)
    for i, r in enumerate(rows):
        speed_ax.text(i - width / 2, r["kdlab"]["images_per_s"] * 1.08, f"{r['speedup']:.1f}x",
                      ha="center", va="bottom", fontsize=8, weight="bold")
    speed_ax.set_yscale("log")
    speeds = [r[path]["images_per_s"] for r in rows for path in PATH_COLOURS]
    speed_ax.set_ylim(min(speeds) / 4, max(speeds) * 3)   # room under the slowest bar, above the labels
    ticks = [textwrap.fill(STEP_DESCRIPTIONS.get(r["step"], r["step"]), 16) for r in rows]
    speed_ax.set(ylabel="images per second (log scale)", title="throughput (bold: kdlab's images/s over the naive path's)")
    speed_ax.grid(axis="y", alpha=0.3, which="both")
    speed_ax.legend(fontsize=8, loc="upper left")
    if peak:
        share_ax = axes[0, 1]
        bars = share_ax.bar(x, [100 * r["kdlab"]["peak_share"] for r in rows], 0.6, color=PATH_COLOURS["kdlab"])
        share_ax.bar_label(bars, fmt="%.1f", fontsize=8)
        share_ax.set(ylabel=f"% of the {peak:.0f} TFLOP/s dense bf16 peak",
                     title="model FLOPs utilisation of kdlab's path", ylim=(0, 100))
        share_ax.grid(axis="y", alpha=0.3)
    for ax in axes[0]:   # one panel, or two with the peak
        ax.set_xticks(x, ticks, fontsize=8)
        ax.title.set_fontsize(9)
    return _save(fig, Path(out_path))


# ----------------------------------------------------------------------------- sweeps

def plot_sweep(sweep_dir: str | Path, out_dir: str | Path) -> Path:
    """sweep.png: test accuracy against each swept setting (kdlab.sweep), one panel per setting.

    A line per run and per values of the other swept settings: a dot per seed, the mean over the
    seeds with one standard deviation. A run that does not read the setting (a baseline under a
    temperature) is a band across the panel: its mean ± one standard deviation. The caption
    names the nodes that trained the trials.
    """
    from kdlab.sweep import describe_nodes, load_sweep

    sweep, trials = load_sweep(sweep_dir)
    swept = list(sweep["grid"])
    by_trial = {i: r for i, (_, r) in enumerate(pair for runs in trials.values() for pair in runs)}
    if not swept or not by_trial:
        raise KdlabError(f"{sweep_dir} has no swept setting or no finished trial to draw; "
                         f"sweep with --grid KEY=V1,V2, and run it to the end.")
    fig, axes = _figure("Test accuracy against each swept setting",
                        f"{source_line(list(by_trial.values()), str(sweep_dir))} | {describe_nodes(sweep)}",
                        _smoke(by_trial), (6 * len(swept) + 1, 5), 1, len(swept))
    for ax, key in zip(axes[0], swept):
        values = sweep["grid"][key]
        # Numbers at their value; names (a hint layer) one after the other.
        positions = {v: i if isinstance(v, str) else v for i, v in enumerate(values)}
        for run, runs in trials.items():
            lines: dict[tuple, dict] = {}
            for settings, r in runs:
                others = tuple((k, v) for k, v in settings.items() if k != key)
                lines.setdefault(others, {}).setdefault(settings.get(key), []).append(r)
            for line_number, (others, by_value) in enumerate(lines.items()):
                label = run_label(run, {run: runs[0][1]}) + "".join(f", {k}={v}" for k, v in others)
                colour = run_colour(run)
                style = ["-", "--", ":", "-."][line_number % 4]
                if None in by_value:   # the run does not read this setting
                    summary = summarise(by_value[None])
                    spread = 100 * (summary["std"] or 0)
                    ax.axhline(100 * summary["mean"], color=colour, linestyle=style,
                               label=f"{label} (does not read {key}; band: ± 1 sd)")
                    ax.axhspan(100 * summary["mean"] - spread, 100 * summary["mean"] + spread,
                               color=colour, alpha=0.12, linewidth=0)
                    continue
                xs = [positions[v] for v in by_value]
                summaries = [summarise(by_value[v]) for v in by_value]
                ax.errorbar(xs, [100 * s["mean"] for s in summaries],
                            yerr=[100 * (s["std"] or 0) for s in summaries], color=colour, linestyle=style,
                            marker="s", capsize=4, label=f"{label} (mean ± 1 sd over seeds)")
                for x, v in zip(xs, by_value):
                    ax.plot([x] * len(by_value[v]), [100 * r["test_acc"] for r in by_value[v]], "o",
                            color=colour, markersize=3, alpha=0.6)
        ax.set_xticks([positions[v] for v in values], [str(v) for v in values])
        ax.set(xlabel=key, ylabel=f"test accuracy (%, {_count(by_trial, 'n_test')} images)",
               title=f"{len(sweep['seeds'])} seeds: {', '.join(map(str, sweep['seeds']))} (dots)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, writable_folder(out_dir, "--out folder") / "sweep.png")


# ----------------------------------------------------------------------------- all of them

def reuse_efficiency(folder: str | Path, results: dict[str, dict]) -> dict:
    """The efficiency table measured elsewhere (a GPU's efficiency.json in `folder`), with each
    run's test accuracy taken from `results`: cost does not change with the weights, accuracy does."""
    efficiency = load_efficiency(Path(folder))
    if efficiency is None:
        raise KdlabError(f"--efficiency-from {folder} holds no efficiency.json; give the folder of a "
                         f"figures run that measured one, or leave the option out to measure here.")
    # A run the device never measured is left out and named, never given another run's timing; the
    # CPU columns of a deploy.json come with --deploy alone, never from a reused table.
    runs = {run: dict({k: v for k, v in efficiency["runs"][run].items() if k != "cpu_latency_ms"},
                      test_acc=r["test_acc"]) for run, r in results.items() if run in efficiency["runs"]}
    not_measured = [run for run in results if run not in efficiency["runs"]]
    efficiency = {k: v for k, v in efficiency.items() if k != "cpu"}
    return dict(efficiency, runs=runs, not_measured=not_measured, reused_from=str(Path(folder) / "efficiency.json"))


def make_all_figures(results_dir: str | Path, out_dir: str | Path = "my_figures",
                     ckpt_dir: str | Path | None = None, device="cpu", log=print,
                     efficiency_from: str | Path | None = None, budget_dir: str | Path | None = None,
                     deploy: str | Path | None = None) -> dict:
    """Every figure and the efficiency table from the results files in `results_dir`.

    `ckpt_dir` (default: `results_dir`) is only read for the checkpoint sizes. A missing run
    leaves the other figures intact; it is named in the return value, the log and the charts.
    `budget_dir` (kdlab.results.BUDGET_DIR for the reference): the budget-matched baselines, drawn
    beside the runs' test accuracy. Returns {"files": [paths written], "missing_runs": [...],
    "skipped": {file: why}, "efficiency": the table, "budget_baselines": [the variants drawn]}.
    """
    if efficiency_from is None and isinstance(device, str):
        # Only measuring the efficiency needs torch: figures drawn from results files alone do not.
        from kdlab.lab import resolve_device
        device = resolve_device(device)
    seeds = load_seed_results(results_dir)
    results = default_seed_results(seeds)
    if not results:
        raise KdlabError(f"no <run>_results.json in {results_dir}. Train the runs first "
                         f"(`python -m kdlab run all --ckpt-dir {results_dir}`), or point to a folder "
                         f"that holds results files, such as results/reference.")
    missing = [run for run in expected_runs(results) if run not in results]
    budget = load_budget_baselines(budget_dir)
    out = writable_folder(out_dir, "--out folder")
    origin = str(results_dir)
    files = [plot_validation_accuracy(results, seeds, missing, out, origin),
             plot_test_accuracy(results, seeds, missing, out, origin, budget),
             plot_training_losses(results, missing, out, origin),
             *(plot_run_curves(r, out, origin) for r in results.values())]
    skipped = {}

    if TEACHER_RUN in results and len(results) > 1:
        files.append(plot_agreement(results, missing, out, origin))
    else:
        skipped["agreement.png"] = "needs the teacher's results and at least one student's"

    best = best_student(results)
    if best is None:
        skipped["confusion_matrix.png"] = "no student results"
    elif "test_labels" not in results[best]:
        skipped["confusion_matrix.png"] = (f"{best}_results.json has no test_labels (written by an "
                                           f"older kdlab); run `python -m kdlab run {best}` with "
                                           f"--retrain to record them")
    else:
        files.append(plot_confusion_matrix(results[best], out, origin))

    teacher = results.get(TEACHER_RUN)
    if teacher is None or not teacher.get("soft_target_examples"):
        skipped["soft_targets.png"] = ("needs the teacher's results file with its soft-target examples (a "
                                       "teacher trained by this kdlab records them)")
    else:
        files.append(plot_soft_targets(teacher, distillation_temperature(results), out, origin))

    distilled = best_distilled(results)
    if distilled is None:
        skipped["per_class_accuracy.png"] = "needs a distillation run and its baseline"
    elif not all("test_labels" in r for run in (distilled, baseline_of(distilled)) for r in seeds[run]):
        skipped["per_class_accuracy.png"] = f"{distilled} or its baseline has results without test_labels"
    else:
        files.append(plot_per_class_accuracy(Findings(seeds, budget), out, origin))

    if efficiency_from is not None:
        efficiency = reuse_efficiency(efficiency_from, results)
    else:
        from kdlab.measure import measure_efficiency
        efficiency = measure_efficiency(results, Path(ckpt_dir or results_dir), device, log)
    if deploy is not None:
        deployment = load_deploy(deploy)
        if deployment is None:
            raise KdlabError(f"--deploy {deploy} is not there; give the deploy.json that `python -m kdlab "
                             f"deploy` wrote, or leave --deploy out.")
        efficiency = with_cpu_latency(efficiency, deployment, str(deploy))
        files.append(plot_deploy(deployment, out))
    (out / "efficiency.json").write_text(json.dumps(efficiency, indent=1))
    table = format_efficiency_table(efficiency)
    (out / "efficiency.md").write_text(table + "\n")
    files += [out / "efficiency.json", out / "efficiency.md",
              plot_efficiency(efficiency, results, missing, out, origin)]

    log(table)
    log(f"wrote {len(files)} files to {out}")
    if missing:
        log(f"missing runs (no results file in {results_dir}): {', '.join(missing)}")
    for name, why in skipped.items():
        log(f"skipped {name}: {why}")
    return dict(files=files, missing_runs=missing, skipped=skipped, efficiency=efficiency,
                budget_baselines=list(budget))


# ----------------------------------------------------------------------------- the data

def class_counts_table(splits) -> str:
    """Images per class in each split (a kdlab.data.Splits), as a markdown table."""
    counts = {name: np.bincount(labels.cpu().numpy(), minlength=NUM_CLASSES).tolist()
              for name, (_, labels) in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    rows = [[name, *(counts[s][c] for s in counts)] for c, name in enumerate(CLASSES)]
    rows.append(["**total**", *(f"**{sum(counts[s])}**" for s in counts)])
    return markdown_table(["class", *counts], rows, "lrrr")


def save_sample_grid(splits, out_dir: str | Path, smoke: bool, per_class: int = 8) -> Path:
    """sample_images.png: the first `per_class` training images of each class, one row per class."""
    images, labels = splits.train[0].cpu().numpy(), splits.train[1].cpu().numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = _figure(f"Training images ({per_class} per class, 32 x 32 px)", f"data: {splits.source}",
                        smoke, (per_class * 0.9 + 1, NUM_CLASSES * 0.9 + 1), NUM_CLASSES, per_class)
    for c, name in enumerate(CLASSES):
        members = np.flatnonzero(labels == c)[:per_class]
        for k, ax in enumerate(axes[c]):
            if k < len(members):
                ax.imshow(images[members[k]].transpose(1, 2, 0), interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            ax.spines[:].set_visible(False)
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    return _save(fig, out_dir / "sample_images.png")


def _smoke(results: dict[str, dict]) -> bool:
    return any(r["smoke"] for r in results.values())


def _count(results: dict[str, dict], key: str) -> str:
    """The size of a split, or the sizes if runs disagree, with thousands separators."""
    return " / ".join(f"{n:,}" for n in sorted({r[key] for r in results.values()}))


# Every file the figures module writes, each described by the first paragraph of its function's
# docstring ("<file>: <what it shows>"), which docs/figures.md lists (kdlab.docs).
FIGURE_MAKERS = (plot_validation_accuracy, plot_test_accuracy, plot_training_losses, plot_run_curves,
                 plot_soft_targets, plot_per_class_accuracy, plot_confusion_matrix, plot_agreement,
                 plot_efficiency, format_efficiency_table, plot_deploy, plot_throughput, plot_sweep,
                 save_sample_grid)
