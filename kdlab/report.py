"""The lab report, generated from the results files: tables, numbers and sentences, then the PDF.

`python -m kdlab report` reads every `<run>_results.json` in the results folder (with its
manifest.json, and the figures folder's efficiency.json, when they exist) and writes
report/generated/*.tex. report/KD_LAB.tex inputs those files and types no result: every
number of its prose, and every comparison ("above", "below"), is a macro computed here, so
the text stays true whatever the runs gave. Then latexmk builds report/KD_LAB.pdf.

The runs it expects follow the results (kdlab.config.expected_runs); one without a results file
is named as missing, in a sentence and in the tables. Smoke results (synthetic data) and CPU runs
are refused unless --draft, and a draft says so on every page.

The template, report/KD_LAB.tex, is copied into the report folder, so a report can be built
anywhere (on Drive, beside the figures it shows).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kdlab.config import (CLASSES, DEFAULT_SEED, LAB_RUNS, RUNS, START_OF_WEIGHTS, STARTS, STUDENT_STEP,
                          TEACHER_RUN, TEACHER_STEP, config_dict, expected_runs, kd_pairs, make_config,
                          run_label, run_of)
from kdlab.errors import KdlabError
from kdlab.folders import writable_folder
from kdlab.latex import (acc_text, agreeing, compare, count, enumerate_text, minutes, num, pct, probability_text,
                         table, tex, times, tt)
from kdlab.registry import METHODS, setting_fields
from kdlab.findings import Findings
from kdlab.results import (DEFAULT_BENCHMARK, LOGIT_KD_FROM_SCRATCH, STEP_DESCRIPTIONS, agreement, default_seed_results,
                           distillation_temperature, load_benchmark, load_budget_baselines, load_deploy,
                           load_efficiency, load_manifest, load_seed_results, run_order, softened, teacher_note)
from kdlab.stats import per_class_interval_text, summarise, training_seed

# The report's template; `make_report` copies it into the report folder it is given.
TEMPLATE = Path(__file__).resolve().parents[1] / "report" / "KD_LAB.tex"
# TeX Live for the PDF, as Debian and Ubuntu (Colab) install it.
TEX_INSTALL = ("apt-get install -y --no-install-recommends texlive-latex-recommended texlive-latex-extra "
               "texlive-fonts-recommended lmodern latexmk")
# The figures KD_LAB.tex takes from the figures folder; the first two are always placed.
EXPECTED_FIGURES = ("comparaison_finale.png", "comparison_test_accuracy.png", "training_losses.png",
                    "soft_targets.png", "per_class_accuracy.png", "efficiency.png", "confusion_matrix.png",
                    "agreement.png")
# The benchmark's step kinds in a sentence (kdlab.results.STEP_DESCRIPTIONS: in a table).
STEP_PHRASES = {TEACHER_STEP: "the teacher's step", STUDENT_STEP: "the student's cross-entropy step",
                **{key: f"the {m.name} step" for key, m in METHODS.items() if m.uses_teacher}}
# Settings every run normally shares: one line under the config table, not a column each.
SHARED_SETTINGS = {"batch_size": "batch size", "momentum": "momentum (Nesterov)",
                   "warmup_epochs": "warm-up epochs", "image_size": "input px",
                   "split_seed": "split seed", "val_per_class": "validation images per class"}
CIFAR_PX = 32
# The recipe the pretrained runs fine-tune with (kdlab/config.py says why each value).
FINETUNE_RECIPE = make_config("student_pretrained_baseline")
# The stage map sizes of a CIFAR ResNet at 32 px, which the upsampled input reproduces.
CIFAR_RESNET_STAGES = (32, 16, 8, 4)
# The settings the prose states of each recipe, the teacher's, the students' and fine-tuning's: the
# macros Teacher<name>, Student<name> and Finetune<name>, each of that config key.
RECIPE_MACROS = {"Epochs": "epochs", "PeakLR": "lr", "WeightDecay": "weight_decay"}


# ----------------------------------------------------------------------------- the report's data

@dataclass
class Report:
    results: dict[str, dict]          # the results files of the default seed, by run
    seeds: dict[str, list[dict]]      # every seed's results files, by run
    expected: list[str]               # the runs the report should hold
    efficiency: dict | None           # efficiency.json, if the figures folder has one
    manifest: dict | None             # manifest.json of the results folder, if any
    benchmark: dict | None            # a benchmarks/throughput.py results file, if given and there
    benchmark_path: Path | None
    budget: dict[str, list[dict]]     # the budget-matched baselines by variant (kdlab.results.BUDGETS)
    budget_dir: Path | None
    results_dir: Path
    figures_dir: Path
    report_dir: Path
    figures_tex_path: str             # the figures folder as LaTeX, run from the report folder
    deployment: dict | None           # deploy.json of `python -m kdlab deploy`, if given and there
    deploy_path: Path | None

    @cached_property
    def findings(self) -> Findings:
        """The comparisons every sentence words, each computed once (kdlab.findings)."""
        return Findings(self.seeds, self.budget)

    @property
    def runs(self) -> list[str]:
        return sorted(set(self.results) | set(self.expected), key=run_order)

    @property
    def planned_weights(self) -> str:
        """The start of the runs not trained yet: ImageNet for the lab that fine-tunes from it,
        random weights for a lab without them (the reference), the teacher included."""
        fine_tuned = [run for run in self.expected if run != TEACHER_RUN and RUNS[run].start == "pretrained"]
        return "imagenet" if fine_tuned else "none"

    @property
    def missing(self) -> list[str]:
        return [run for run in self.runs if run not in self.results]

    @property
    def missing_figures(self) -> list[str]:
        return [name for name in EXPECTED_FIGURES if not (self.figures_dir / name).is_file()]

    def config(self, run: str) -> dict:
        """The stored config, or for a missing run the config the planned command would use."""
        if run in self.results:
            return self.results[run]["config"]
        return config_dict(make_config(run, weights=self.planned_weights))

    def measured(self, run: str) -> dict:
        return self.efficiency["runs"].get(run, {}) if self.efficiency else {}

    @property
    def training_seeds(self) -> list[int]:
        """Every training seed of the results, once (the macros and the planned command state them)."""
        return sorted({training_seed(r) for runs in self.seeds.values() for r in runs})

    def draft_reason(self) -> str | None:
        """Why these results are not the lab's results, or None when they are."""
        if any(r["smoke"] for r in self.results.values()):
            return "smoke run"
        if any(r["device"] == "cpu" for r in self.results.values()):
            return "CPU run"
        return None


def draft_text(reason: str) -> str:
    return f"DRAFT - {reason}, not results"


# ----------------------------------------------------------------------------- runs and comparisons in prose

def run_name(run: str, results: dict[str, dict]) -> str:
    """A run as the prose names it: its label, true to the weights its results record (a run
    without results by its recipe), never its file name."""
    return tex(run_label(run, results))


def runs_text(runs: list[str], results: dict[str, dict]) -> str:
    return enumerate_text([run_name(run, results) for run in runs])


def start_name(weights: str) -> str:
    """Initial weights as the report names starts everywhere: 'from ImageNet' or 'from scratch'."""
    return STARTS[START_OF_WEIGHTS[weights]]


def sentence_start(text: str) -> str:
    """`text` with its first letter capitalised, the rest as written ('From ImageNet', not 'From imagenet')."""
    return text[:1].upper() + text[1:]


def cannot_yet(rep: Report, what: str, runs) -> str:
    """That `what` waits for those of `runs` without a results file; "" when none lacks one, so
    that `cannot_yet(...) or <the sentence>` words the comparison once it can be made."""
    lacking = [run for run in runs if run not in rep.results]
    return (f"{what} cannot be measured yet: {runs_text(lacking, {})} {agreeing(len(lacking), 'has', 'have')} "
            f"no results file." if lacking else "")


def compared_pairs(rep: Report):
    """(start, method name, cross-entropy run, distilled run) for each distilled run the report
    has or expects, against the cross-entropy student of the same start (kdlab.config.kd_pairs)."""
    for base, kd in kd_pairs():
        if kd in rep.runs:
            yield STARTS[RUNS[kd].start], METHODS[RUNS[kd].method].name, base, kd


def seeds_text(rep: Report, run: str) -> str:
    """`run`'s test accuracy for the prose: '92.10%' for one seed, '92.10% (mean of 3 seeds, sd 0.12)'."""
    summary = summarise(rep.seeds[run])
    if summary["std"] is None:
        return acc_text(summary["mean"])
    return rf"{acc_text(summary['mean'])} (mean of {summary['n_seeds']} seeds, sd {pct(summary['std'])})"


def paired_text(rep: Report, better: str, other: str) -> str:
    """The paired difference of two runs on the same test images and seeds, with its 95% interval."""
    return difference_text(rep.findings.difference(better, other))


def difference_text(d: dict) -> str:
    """A paired difference (kdlab.stats.paired_difference) and its 95% interval, in words."""
    verdict = ("excludes zero: the difference is beyond what the seeds and the test sample explain"
               if d["excludes_zero"] else "includes zero: no evidence of a difference either way")
    return (rf"a paired difference of {100 * d['mean_difference']:+.2f} points ({count(len(d['seeds']), 'seed')} "
            rf"paired), whose 95\% interval [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}] (bootstrap over "
            rf"seeds and test images) {verdict}")


def setting(rep: Report, runs: list[str], key: str, fmt=num) -> str:
    """One config value for the prose: shared by `runs`, or a pointer to the config table."""
    values = list(dict.fromkeys(rep.config(run)[key] for run in runs))
    if len(values) == 1:
        return fmt(values[0])
    return r"per run (Table~\ref{tab:config})"


# ----------------------------------------------------------------------------- the abstract

def abstract_results(rep: Report) -> str:
    accs = enumerate_text([rf"{run_name(run, rep.results)} {seeds_text(rep, run)}" for run in rep.results])
    missing = (rf" Still missing: {runs_text(rep.missing, {})}." if rep.missing else "")
    best = rep.findings.best_student
    lead = (rf" The best student is {run_name(best, rep.results)}." if best else "")
    return rf"Test accuracies: {accs}.{lead}{missing}"


# ----------------------------------------------------------------------------- method

def soft_target_sentences(rep: Report) -> str:
    """What the teacher's softened outputs show, read from the examples its results file keeps."""
    if not (examples := rep.results.get(TEACHER_RUN, {}).get("soft_target_examples")):
        return ""
    temperature = distillation_temperature(rep.results)

    def runner_up(example):
        p = softened(example["logits"], temperature)
        p[example["label"]] = -1
        return int(p.argmax())
    example = max(examples, key=lambda e: softened(e["logits"], temperature)[runner_up(e)])
    other = runner_up(example)
    cold, warm = (softened(example["logits"], t)[other] for t in (1, temperature))
    return (rf"For the {CLASSES[example['label']]} of \figref{{soft_targets.png}}{{fig:soft-targets}}, the "
            rf"trained teacher gives the class {CLASSES[other]} a probability of {probability_text(cold)} at $T=1$ "
            rf"and {probability_text(warm)} at $T={num(temperature)}$: the similarity a one-hot label cannot carry.")


# ----------------------------------------------------------------------------- setup

def stage_sentence(size: int | None) -> str:
    """The map sizes the four ResNet stages see at the input size, against a CIFAR ResNet's."""
    if size is None:
        return r"The input size differs between runs (Table~\ref{tab:config})."
    # ImageNet stem: stride-2 conv and stride-2 max-pool (/4), then each stage after the first /2.
    stages = tuple(size // 4 // 2 ** i for i in range(4))
    maps = enumerate_text([str(n) for n in stages])
    cifar = r"a CIFAR ResNet (a $3\times3$ stride-1 stem and no pooling)"
    if stages == CIFAR_RESNET_STAGES:
        return rf"At {size}~px the four stages see maps of {maps}~px, the sizes {cifar} sees at {CIFAR_PX}~px."
    return (rf"At {size}~px the four stages see maps of {maps}~px, where {cifar} sees "
            rf"{enumerate_text([str(n) for n in CIFAR_RESNET_STAGES])}~px at {CIFAR_PX}~px.")


def distinct(rep: Report, key: str) -> str:
    """The values of `key` in the results files, each once, in the runs' order: 'NVIDIA H200'."""
    return "; ".join(tex(v) for v in dict.fromkeys(str(r[key]) for r in rep.results.values()))


def split_sizes(rep: Report) -> tuple[str, str, str]:
    """Training, validation and test images, as the results files record them."""
    sizes = {(r["n_train"], r["n_val"], r["n_test"]) for r in rep.results.values()}
    if len(sizes) == 1:
        return tuple(f"{n:,}" for n in sizes.pop())
    return (r"(differs between runs)",) * 3


def distillation_settings(cfg: dict) -> str:
    """The method's settings (kdlab.registry), each by its symbol: '$T$ 4, $\\alpha$ 0.9'."""
    def value(v):
        return tt(", ".join(v)) if isinstance(v, (list, tuple)) else tt(v) if isinstance(v, str) else num(v)
    return ", ".join(f"{f.metadata['symbol']} {value(cfg[f.name])}" for f in setting_fields(cfg["method"])) or "--"


def shared_setting(rep: Report, key: str) -> str:
    """The value most runs use, then the runs that differ: '512 (ResNet50 teacher: 256)'."""
    values = {run: rep.config(run)[key] for run in rep.runs}
    common = Counter(values.values()).most_common(1)[0][0]
    others = [f"{run_name(run, rep.results)}: {num(value)}" for run, value in values.items() if value != common]
    return num(common) + (f" ({'; '.join(others)})" if others else "")


def config_table(rep: Report) -> str:
    rows = []
    for run in rep.runs:
        cfg = rep.config(run)
        mark = "" if run in rep.results else r"\textsuperscript{$\dagger$}"
        rows.append(rf"{tt(run)}{mark} & {cfg['arch']} & {tex(METHODS[cfg['method']].name)} & "
                    rf"{start_name(cfg['weights'])} & {cfg['epochs']} & {num(cfg['lr'])} & {num(cfg['weight_decay'])} & "
                    rf"{distillation_settings(cfg)} \\")
    shared = "; ".join(f"{label} {shared_setting(rep, key)}" for key, label in SHARED_SETTINGS.items())
    planned = (r" $\dagger$: no results file yet; the settings the planned command "
               r"(Section~\ref{sec:reproduce}) would use, from \texttt{kdlab.config}."
               if rep.missing else "")
    caption = (rf"Settings of each run, as stored in its results file. Start: the initial weights, "
               rf"ImageNet's or random. Peak LR and weight decay of SGD. Distillation: "
               rf"temperature $T$ and weight $\alpha$ of logit KD (Eq.~\ref{{eq:kd}}), stage and "
               rf"weight $\lambda_{{\mathrm{{hint}}}}$ of the hint (Eq.~\ref{{eq:hint}}). Shared: {shared}."
               rf"{planned}")
    return table("tab:config", caption, "llllrrrl", [
        r"Run & Network & Method & Start & Epochs & Peak & Weight & Distillation \\",
        r" & & & & & LR & decay & \\"], rows)


# ----------------------------------------------------------------------------- results

def provenance(rep: Report) -> str:
    """Where the numbers come from: the paragraph at the head of the results section."""
    results = list(rep.results.values())

    def per_run(key, name=tex):
        values = {r["run"]: name(r[key]) for r in results}
        if len(set(values.values())) == 1 and len(values) > 1:
            return f"{next(iter(values.values()))} for every run"
        return "; ".join(f"{run_name(run, rep.results)} {value}" for run, value in values.items())

    finished = sorted(r["finished"] for r in results)
    parts = [
        rf"\textbf{{Provenance.}} Every result of this report is read from the "
        rf"{len(results)} results files in {tt(rep.results_dir)} "
        rf"({runs_text(list(rep.results), rep.results)}), which the training runs wrote.",
        rf"Trained on: {distinct(rep, 'device_name')}, with torch {distinct(rep, 'torch_version')}.",
        "Data: {}; {} training, {} validation and {} test images.".format(distinct(rep, "data"), *split_sizes(rep)),
        f"Start: {per_run('weights', start_name)}. Epochs: {per_run('epochs')}.",
        rf"Finished (UTC): {tex(finished[0][:16].replace('T', ' '))}"
        + (rf" to {tex(finished[-1][:16].replace('T', ' '))}" if len(finished) > 1 else "")
        + rf"; training time of all runs together {minutes(sum(r['wall_seconds'] for r in results))} min.",
    ]
    if rep.manifest:
        # What the file holds, not a dump of it: a reader wants the wall time, not its decimals.
        wall = rep.manifest.get("wall_seconds")
        parts.append(rf"The run's {tt('manifest.json')} also records the command line"
                     + (r" (Section~\ref{sec:reproduce})" if manifest_commands(rep.manifest) else "")
                     + ", the Python and library versions"
                     + (rf" and the wall time of the whole run, {minutes(wall)} min" if isinstance(wall, (int, float)) else "")
                     + ".")
    if rep.efficiency:
        parts.append(f"FLOPs and latency come from {efficiency_source(rep)}")
    reason = rep.draft_reason()
    if reason:
        why = ("synthetic data, random weights and a tiny budget: a check of the pipeline"
               if reason == "smoke run" else "trained on the CPU, not on the GPU the lab is set up for")
        parts.append(rf"\textbf{{{tex(draft_text(reason))}:}} these files come from a {reason} "
                     rf"({why}); none of their numbers is a result of the lab.")
    return " ".join(parts)


def missing_runs_sentence(rep: Report) -> str:
    if not rep.missing:
        return rf"Every expected run has its results file in {tt(rep.results_dir)}."
    n = len(rep.missing)
    return (rf"\textbf{{Missing runs:}} {runs_text(rep.missing, {})} {agreeing(n, 'has', 'have')} no results file in "
            rf"{tt(rep.results_dir)}; the tables mark {agreeing(n, 'it', 'them')} "
            rf"and the comparisons that need {agreeing(n, 'it', 'them')} say so.")


def missing_figures_sentence(rep: Report) -> str:
    missing = rep.missing_figures
    if not missing:
        return rf"All {len(EXPECTED_FIGURES)} figures are in {tt(rep.figures_dir)}."
    return (rf"\textbf{{Missing figures:}} {enumerate_text([tt(name) for name in missing])} "
            rf"{agreeing(len(missing), 'is', 'are')} not in {tt(rep.figures_dir)}; "
            rf"the figures module makes them from the results files.")


def efficiency_source(rep: Report) -> str:
    """Where the efficiency table was measured: 'figures/efficiency.json, measured on cuda at 128 px.'"""
    eff = rep.efficiency
    return (f"{tt(rep.figures_dir / 'efficiency.json')}, measured on {tex(eff.get('device', 'an unnamed device'))} "
            f"at {tex(eff.get('image_size', '?'))} px.")


def results_table(rep: Report) -> str:
    rows = []
    for run in rep.runs:
        if run not in rep.results:
            rows.append(rf"{tt(run)} & \multicolumn{{7}}{{c}}{{\textit{{missing: no results file}}}} \\")
            continue
        r, m, summary = rep.results[run], rep.measured(run), summarise(rep.seeds[run])
        test_acc = pct(summary["mean"]) + ("" if summary["std"] is None
                                           else rf" $\pm$ {pct(summary['std'])} ({summary['n_seeds']})")
        flops = f"{m['flops_per_image'] / 1e9:.2f}" if "flops_per_image" in m else "--"
        latency = f"{m['latency_ms']:.2f}" if "latency_ms" in m else "--"
        rows.append(rf"{tt(run)} & {r['epochs']} & {pct(r['best_val_acc'])} ({r['best_epoch']}) & "
                    rf"{test_acc} & {r['parameters'] / 1e6:.2f} & {flops} & {latency} & "
                    rf"{minutes(r['wall_seconds'])} \\")
    where = (f"FLOPs per image and latency from {efficiency_source(rep)}" if rep.efficiency
             else f"FLOPs and latency: -- (no {tt('efficiency.json')} in {tt(rep.figures_dir)}; "
                  f"the figures module writes it).")
    caption = (rf"Every run. Validation accuracy: the best epoch's (that epoch in brackets), whose weights "
               rf"are kept; test accuracy: those weights, once, on the test set; for a run trained with "
               rf"several seeds, the mean $\pm$ the standard deviation over its seeds (their number in "
               rf"brackets), the other columns being those of seed {DEFAULT_SEED}. Parameters: the "
               rf"deployed network (a regressor used only in training is not counted). Train: wall time of "
               rf"all epochs, validation included. {where} Source: {tt(rep.results_dir)}.")
    return table("tab:results", caption, "lrrrrrrr", [
        r"Run & Epochs & Val.\ acc. & Test acc. & Params & GFLOPs & Latency & Train \\",
        r" & & \% (epoch) & \% & (M) & & (ms) & (min) \\"], rows)


def best_epoch_sentence(rep: Report) -> str:
    last = [run for run, r in rep.results.items() if r["best_epoch"] == r["epochs"]]
    earlier = [run for run in rep.results if run not in last]
    out = ([rf"{runs_text(last, rep.results)} {agreeing(len(last), 'was', 'were')} best on validation "
            rf"at {agreeing(len(last), 'its', 'their')} last epoch, as a cosine schedule "
            rf"that ends at zero makes likely."] if last else [])
    if earlier:
        out.append("Peaked before the end: " + enumerate_text(
            [rf"{run_name(run, rep.results)} (epoch {rep.results[run]['best_epoch']} of {rep.results[run]['epochs']})"
             for run in earlier]) + ".")
    return " ".join(out)


def speed_table(rep: Report) -> str:
    """Images/s of kdlab's path and the naive one per step kind, from the benchmark file."""
    bench = rep.benchmark
    if bench is None:
        return ""
    rows = []
    for row in bench["rows"]:
        k, n = row["kdlab"], row["naive"]
        share = f"{100 * k['peak_share']:.1f}" if k.get("peak_share") else "--"
        rows.append(rf"{tex(STEP_DESCRIPTIONS.get(row['step'], row['step']))} & {k['images_per_s']:,.0f} & "
                    rf"{n['images_per_s']:,.0f} & {row['speedup']:.1f} & {k['tflops']:.3g} & {share} \\")
    caption = (rf"Training speed on {tex(bench['device_name'])} (torch {tex(bench['torch_version'])}), "
               rf"{bench['image_size']}~px, batch {bench['batch_size']}, synthetic images and random weights "
               rf"(a step's cost depends on shapes only). kdlab: the package's own loader and step "
               rf"functions; naive: per-image PIL transforms in a two-worker DataLoader, fp32. "
               rf"TFLOP/s: model FLOPs per second (a training step: forward and backward of the trained "
               rf"network and forward of a teacher; evaluation: forward only); peak: the device's dense "
               rf"bf16/fp16 peak (-- where unknown, as on a CPU). Source: {tt(rep.benchmark_path)}.")
    return table("tab:speed", caption, "lrrrrr", [
        r"Step & kdlab & naive & Speed-up & TFLOP/s & Peak \\",
        r" & (images/s) & (images/s) & ($\times$) & (kdlab) & (\%) \\"], rows)


def speed_sentences(rep: Report) -> str:
    bench = rep.benchmark
    if bench is None:
        where = tt(rep.benchmark_path) if rep.benchmark_path else "no file given"
        return rf"Training speed: not measured for this report (no benchmark file: {where})."
    train = [r for r in bench["rows"] if r["step"] != "evaluation"]
    evaluation = [r for r in bench["rows"] if r["step"] == "evaluation"]
    low, high = min(train, key=lambda r: r["speedup"]), max(train, key=lambda r: r["speedup"])
    text = (rf"On the {tex(bench['device_name'])}, kdlab's training steps process from {low['speedup']:.1f} "
            rf"times ({STEP_PHRASES.get(low['step'], tex(low['step']))}) to {high['speedup']:.1f} times "
            rf"({STEP_PHRASES.get(high['step'], tex(high['step']))}) as many images per second as the naive "
            rf"path measured in the same run")
    text += (rf", and evaluation {evaluation[0]['speedup']:.1f} times (Table~\ref{{tab:speed}})."
             if evaluation else r" (Table~\ref{tab:speed}).")
    shares = [r["kdlab"]["peak_share"] for r in bench["rows"] if r["kdlab"].get("peak_share")]
    if shares:
        text += (rf" Training steps and evaluation use {100 * min(shares):.1f}\% to {100 * max(shares):.1f}\% "
                 rf"of the GPU's dense bf16/fp16 peak.")
    return text


# ----------------------------------------------------------------------------- discussion: what KD bought

def kd_gain_sentences(rep: Report) -> str:
    return " ".join(cannot_yet(rep, f"The gain of {name} {start}", (base, kd))
                    or rf"{sentence_start(start)}, {name} ({run_name(kd, rep.results)}) reached "
                       rf"{seeds_text(rep, kd)} test accuracy against {seeds_text(rep, base)} for the "
                       rf"cross-entropy student: {difference_text(rep.findings.gain(kd))}."
                    for start, name, base, kd in compared_pairs(rep))


def evaluation_sentences(rep: Report) -> str:
    """What the weight average and the flip bought, over every run and seed of the results folder."""
    rows = [r["test_acc_by_evaluation"] for runs in rep.seeds.values() for r in runs
            if "test_acc_by_evaluation" in r]
    if not rows:
        return (r"The results files hold no per-evaluation figures yet (written by an older kdlab), "
                r"so what the weight average and the flip buy is not measured here.")
    gain = {key: sum(row[key] - row["raw_single"] for row in rows) / len(rows)
            for key in ("raw_flip", "average_single", "average_flip")}
    wins = sum(row["average_flip"] > row["raw_single"] for row in rows)
    return (rf"Over the {len(rows)} trained runs and seeds of this report, against the raw weights "
            rf"of the last epoch on one view, the flip alone changed test accuracy by "
            rf"{100 * gain['raw_flip']:+.2f} points on average, the weight average alone by "
            rf"{100 * gain['average_single']:+.2f}, and both together by {100 * gain['average_flip']:+.2f} "
            rf"(higher in {wins} of {len(rows)} runs).")


def kd_cost_sentences(rep: Report) -> str:
    out = []
    for start, name, base, kd in compared_pairs(rep):
        if waiting := cannot_yet(rep, f"The training cost of {name} {start}", (base, kd)):
            out.append(waiting)
            continue
        b, k = rep.results[base], rep.results[kd]
        per_epoch_b, per_epoch_k = b["wall_seconds"] / b["epochs"], k["wall_seconds"] / k["epochs"]
        extra = (rf", and trains {k['extra_training_parameters']:,} regressor parameters "
                 rf"besides the student" if k["extra_training_parameters"] else "")
        out.append(rf"An epoch of {name} {start} took {per_epoch_k:.1f} s against {per_epoch_b:.1f} s for "
                   rf"cross-entropy alone ({per_epoch_k / per_epoch_b:.2f} times as long){extra}.")
    t = rep.results.get(TEACHER_RUN)
    out.append(cannot_yet(rep, "The teacher's training cost", [TEACHER_RUN])
               or rf"The teacher those runs need cost {minutes(t['wall_seconds'])} min of "
                  rf"training ({count(t['epochs'], 'epoch')}), once for all of them.")
    return " ".join(out)


def budget_sentences(rep: Report) -> str:
    """Logit KD from scratch against its baseline at each budget: equal epochs, equal training time,
    equal total epochs with the teacher's (kdlab.findings.Findings.budgets)."""
    if not rep.findings.compares_budgets:
        return ""
    measured = [c for c in rep.findings.budgets if c["difference"] is not None]
    pending = rep.findings.verdict.pending
    out = ["Given the baseline the same budget, " + run_name(LOGIT_KD_FROM_SCRATCH, rep.results) + " against it: "
           + "; ".join(rf"{c['label']} (the baseline trained {count(c['epochs'], 'epoch')}), "
                       rf"{difference_text(c['difference'])}" for c in measured) + "."]
    if pending:
        where = tt(rep.budget_dir) if rep.budget_dir else r"no folder given (\texttt{-{}-budget-baselines})"
        out.append(rf"{sentence_start(enumerate_text(pending))}: pending, the budget-matched baselines have "
                   rf"no results yet ({where}; the GPU plan trains them).")
    return " ".join(out)


def distillation_verdict(rep: Report) -> str:
    """The lab's conclusion on logit KD from scratch (kdlab.findings.Verdict), in words."""
    if not rep.findings.compares_budgets:
        return ""
    v = rep.findings.verdict
    parts = []
    for phrase, labels in (("beats {}", v.wins), ("is level with {} within the noise", v.ties),
                           ("loses to {}", v.losses)):
        if labels:   # the baseline named first, then "it"
            parts.append(f"{phrase.format('it' if parts else 'its baseline')} {enumerate_text(labels)}")
    text = rf"Logit KD from scratch {'; it '.join(parts)}."
    if v.conclusion == "pending":   # no gain to explain: the budgets can only say more of the same
        return text + rf" The baseline has not been trained yet {enumerate_text(v.pending)}."
    if v.conclusion == "open":
        return text + (r" Whether that gain is what the teacher knows or the compute it adds is still open: "
                       rf"the baseline has not been trained yet {enumerate_text(v.pending)}.")
    if v.conclusion == "every budget":
        return text + teacher_compute_sentence(v.compute)
    if v.conclusion == "the compute":
        return text + (rf" The gain at equal epochs does not hold {enumerate_text(v.matched)}: "
                       r"it goes with the compute.")
    return text   # no gain, or mixed: the sentence above is the conclusion


def teacher_compute_sentence(compute: dict | None) -> str:
    """Whether the longest budget-matched baseline (logit KD beat them all) trained as long as the
    teacher and the distilled student together (kdlab.findings.Findings.teacher_compute)."""
    if compute is None:
        return r" The gain holds at every budget compared; the teacher's training time is not in the results."
    teacher_s, kd_s, given = compute["teacher_seconds"], compute["kd_seconds"], compute["longest_seconds"]
    if given >= teacher_s + kd_s:
        return (rf" The gain survives the teacher's compute: {compute['longest']}, the baseline trained "
                rf"{given:.0f}~s, no less than the teacher's {teacher_s:.0f}~s and the distilled student's "
                rf"{kd_s:.0f}~s together.")
    return (rf" The gain holds at every budget compared, but none gave the baseline the teacher's training "
            rf"time too: the longest, {compute['longest']}, trained {given:.0f}~s, against the teacher's "
            rf"{teacher_s:.0f}~s and the distilled student's {kd_s:.0f}~s. Whether the gain survives the "
            rf"teacher's compute is not measured.")


def per_class_sentences(rep: Report) -> str:
    """Which classes the best distilled student gains on against its baseline, paired per class."""
    if rep.findings.per_class is None:
        return ""
    kd, base, by_class = rep.findings.per_class
    order = sorted(range(len(CLASSES)), key=lambda c: by_class[c]["mean_difference"])
    helped = [CLASSES[c] for c in order if by_class[c]["excludes_zero"] and by_class[c]["mean_difference"] > 0]
    hurt = [CLASSES[c] for c in order if by_class[c]["excludes_zero"] and by_class[c]["mean_difference"] < 0]

    def gain(c):
        d = by_class[c]
        return (rf"{CLASSES[c]} ({100 * d['mean_difference']:+.2f} points, "
                rf"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}])")
    n_images = len(rep.seeds[kd][0]["test_labels"]) // len(CLASSES)
    text = (rf"Class by class (\figref{{per_class_accuracy.png}}{{fig:per-class}}), {run_name(kd, rep.results)} "
            rf"against {run_name(base, rep.results)} gains most on {gain(order[-1])} and least on "
            rf"{gain(order[0])}; with about {count(n_images, 'test image')} a class, the interval of a class is "
            rf"wide, and more so for ten classes compared at once: {tex(per_class_interval_text(by_class))}. ")
    text += (rf"The gain's interval excludes zero for {enumerate_text(helped)}" if helped
             else r"No class's gain has an interval that excludes zero")
    text += ("." if not hurt else rf", and the loss's for {enumerate_text(hurt)}." if helped
             else rf"; the loss's does for {enumerate_text(hurt)}.")
    return text


# ----------------------------------------------------------------------------- discussion: the other questions

def logits_vs_features_sentences(rep: Report) -> str:
    pairs = [(start, run_of("kd_logits", start), run_of("kd_features", start)) for start in STARTS]
    return " ".join(cannot_yet(rep, f"Logits against features {STARTS[start]}", (logits, features))
                    or rf"{sentence_start(STARTS[start])}, logit KD at {seeds_text(rep, logits)} against "
                       rf"feature KD at {seeds_text(rep, features)}: {paired_text(rep, logits, features)}."
                    for start, logits, features in pairs
                    if {logits, features} <= set(rep.runs))   # the comparisons this lab makes


def pretrained_vs_scratch_sentences(rep: Report) -> str:
    pretrained = [r for r in rep.results.values() if r["weights"] == "imagenet"]
    if not pretrained:
        return (rf"No run of these results files started from ImageNet weights, so the question is "
                rf"left open by numbers here: it needs the runs that fine-tune from ImageNet "
                rf"(\texttt{{student\_pretrained\_*}}), trained where the ImageNet weights can be downloaded.")
    pairs = [(m.name, run_of(key, "scratch"), run_of(key, "pretrained")) for key, m in METHODS.items()]
    return " ".join(cannot_yet(rep, f"ImageNet against scratch for {name}", (s_run, p_run))
                    or rf"With {name}, the student {STARTS['pretrained']} reached {seeds_text(rep, p_run)} in "
                       rf"{count(rep.results[p_run]['epochs'], 'epoch')}, against {seeds_text(rep, s_run)} in "
                       rf"{count(rep.results[s_run]['epochs'], 'epoch')} {STARTS['scratch']}: "
                       rf"{paired_text(rep, p_run, s_run)}."
                    for name, s_run, p_run in pairs
                    if {s_run, p_run} <= set(rep.runs))   # the comparisons this lab makes


def student_vs_teacher_sentences(rep: Report) -> str:
    best = rep.findings.best_student
    # Without a student every missing run is waited for, the teacher first (kdlab.results.run_order).
    waiting = cannot_yet(rep, "How close the students come to the teacher", [TEACHER_RUN] if best else rep.missing)
    if waiting:
        return waiting
    s, t = rep.results[best], rep.results[TEACHER_RUN]
    out = [rf"The best student, {run_name(best, rep.results)} at {seeds_text(rep, best)}, against its "
           rf"teacher at {seeds_text(rep, TEACHER_RUN)}: {difference_text(rep.findings.teacher_gap)}. It has "
           rf"{times(t['parameters'], s['parameters'], 'fewer', 'more')} parameters "
           rf"({s['parameters'] / 1e6:.2f} M against {t['parameters'] / 1e6:.2f} M)."]
    ms, mt = rep.measured(best), rep.measured(TEACHER_RUN)
    if "flops_per_image" in ms and "flops_per_image" in mt:
        out.append(rf"It needs {times(mt['flops_per_image'], ms['flops_per_image'], 'fewer', 'more')} "
                   rf"FLOPs per image.")
    if "latency_ms" in ms and "latency_ms" in mt:
        out.append(rf"On {tex(rep.efficiency.get('device', 'the measuring device'))} its latency "
                   rf"is {ms['latency_ms']:.2f} ms against the teacher's {mt['latency_ms']:.2f} ms "
                   rf"({times(mt['latency_ms'], ms['latency_ms'], 'faster', 'slower')}).")
    elif rep.efficiency is None:
        out.append(r"FLOPs and latency are not compared here: the figures folder has no "
                   r"\texttt{efficiency.json} yet.")
    return " ".join(out)


def agreement_sentences(rep: Report) -> str:
    what = "The students' agreement with the teacher"
    if TEACHER_RUN not in rep.results:
        return cannot_yet(rep, what, [TEACHER_RUN])
    t = rep.results[TEACHER_RUN]
    students = [run for run in rep.results if run != TEACHER_RUN
                and len(rep.results[run]["test_predictions"]) == len(t["test_predictions"])]
    if not students:
        return cannot_yet(rep, what, [run for run in rep.missing if run != TEACHER_RUN])
    shares = {run: agreement(rep.results[run], t) for run in students}
    out = ["On the test set, the students predict the same class as the teacher for "
           + enumerate_text([rf"{acc_text(share)} of the images ({run_name(run, rep.results)})"
                             for run, share in shares.items()]) + "."]
    out += [rf"{sentence_start(start)}, the agreement of {name} with the teacher is "
            rf"{compare(shares[kd], shares[base])} the cross-entropy student's."
            for start, name, base, kd in compared_pairs(rep) if base in shares and kd in shares]
    return " ".join(out)


# ----------------------------------------------------------------------------- deploying the student

def deploy_table(rep: Report) -> str:
    """Each deployed run in each variant, from deploy.json; nothing without one."""
    deployment = rep.deployment
    if deployment is None:
        return ""
    rows = [rf"{tt(run)} & {tex(deployment['variants'][variant])} & {v['size_mb']:.1f} & {v['latency_ms']:.2f} & "
            rf"{v['throughput_img_s']:,.0f} & {pct(v['test_acc'])} & {pct(v['agreement_with_pytorch'])} \\"
            for run, measured in deployment["runs"].items() for variant, v in measured["variants"].items()]
    cpu = deployment["cpu"]
    caption = (rf"Each run deployed on a CPU ({tex(cpu['model'])}, {count(cpu['threads'], 'thread')}, int8 "
               rf"instructions: {tex(', '.join(cpu['int8_instructions']) or 'none known')}): its weights in "
               rf"PyTorch (fp32, eager), exported to ONNX and run by ONNX Runtime in fp32, and quantized to int8 "
               rf"by ONNX Runtime (static, per-channel weights, QDQ, calibrated on training images). Latency: "
               rf"the median at batch 1; throughput: at batch {deployment['timing']['throughput_batch']}; test "
               rf"accuracy: one view of each of the {deployment['n_test']:,} test images; agreement: with the "
               rf"PyTorch model's predictions. Source: {tt(rep.deploy_path)}, measured "
               rf"{tex(deployment['measured'][:10])}.")
    return table("tab:deploy", caption, "llrrrrr", [
        r"Run & Variant & Size & Latency & Throughput & Test acc. & Agreement \\",
        r" & & (MB) & (ms) & (images/s) & \% & \% \\"], rows)


def deploy_sentences(rep: Report) -> str:
    """The deployed student's speed-up and accuracy change, and the teacher-to-int8-student latency ratio."""
    deployment = rep.deployment
    if deployment is None:
        where = f"{tt(rep.deploy_path)} is not there" if rep.deploy_path else "none given"
        return (rf"Deployment on a CPU: not measured for this report (its {tt('deploy.json')}: {where}); "
                rf"\texttt{{python -m kdlab deploy}} measures it.")
    # The best student if deploy.json measured it, else its first.
    students = [run for run in deployment["runs"] if run != TEACHER_RUN]
    student = rep.findings.best_student if rep.findings.best_student in students else next(iter(students), None)
    if student is None:
        return rf"Deployment on a CPU: {tt(rep.deploy_path)} measured no student."
    variants = deployment["runs"][student]["variants"]
    eager, fp32, int8 = (variants[v] for v in ("pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"))
    cpu = deployment["cpu"]
    out = [rf"On {tex(cpu['model'])} with {count(cpu['threads'], 'thread')}, {run_name(student, rep.results)} "
           rf"answers one image in {eager['latency_ms']:.2f}~ms in PyTorch, {fp32['latency_ms']:.2f}~ms in ONNX "
           rf"Runtime ({times(eager['latency_ms'], fp32['latency_ms'], 'faster', 'slower')}) and "
           rf"{int8['latency_ms']:.2f}~ms in int8 ({times(fp32['latency_ms'], int8['latency_ms'], 'faster', 'slower')} "
           rf"than in fp32; Table~\ref{{tab:deploy}}).",
           rf"In int8 its test accuracy is {acc_text(int8['test_acc'])}, {compare(int8['test_acc'], fp32['test_acc'])} "
           rf"the fp32 model's {acc_text(fp32['test_acc'])} (one view per image), and it predicts the PyTorch "
           rf"model's class on {pct(int8['agreement_with_pytorch'])}\% of the test images."]
    if TEACHER_RUN in deployment["runs"]:
        teacher = deployment["runs"][TEACHER_RUN]["variants"]["pytorch_fp32"]
        out.append(rf"The teacher in PyTorch takes {teacher['latency_ms']:.2f}~ms: the int8 student answers "
                   rf"{times(teacher['latency_ms'], int8['latency_ms'], 'faster', 'slower')}.")
    return " ".join(out)


def check_deployment(rep: Report) -> None:
    """deploy.json measured the weights of these results, and smoke weights only for a draft."""
    deployment = rep.deployment
    if deployment is None:
        return
    if deployment["smoke"] and not rep.draft_reason():
        raise KdlabError(f"{rep.deploy_path} measured smoke weights, which are never results; deploy the "
                         f"runs' own weights (`python -m kdlab deploy --ckpt-dir <their folder> --out <folder>`) "
                         f"and pass its deploy.json with --deploy.")
    other = [run for run, measured in deployment["runs"].items()
             if run in rep.results and measured.get("results_test_acc") != rep.results[run]["test_acc"]]
    if other:
        raise KdlabError(f"{rep.deploy_path} measured other weights of {', '.join(other)} than those of the "
                         f"results in {rep.results_dir} (their test accuracies differ); deploy the weights of "
                         f"these results, or pass their own --deploy.")


# ----------------------------------------------------------------------------- how to reproduce

def manifest_commands(manifest: dict) -> list[str]:
    """The command lines that made the results, from their manifest: its `command`, the reference
    script's lab step, or each call of the reference script, in order."""
    calls = manifest.get("calls")
    commands = ([manifest.get("command") or manifest.get("steps", {}).get("lab", {}).get("command")]
                + [call.get("command") for call in (calls if isinstance(calls, list) else []) if isinstance(call, dict)])
    # the interpreter's path on that machine is the user's `python`
    return [re.sub(r"^\S*python3?\b", "python", c) for c in commands if isinstance(c, str)]


def typed_command(command: str, results_dir: Path) -> str:
    """`command` as a user types it in the repository root: a path of the machine that ran it
    (absolute: a RAM disk, an output folder) becomes a placeholder named by its option
    (`--out OUT`), and the results go to the folder this report reads."""
    command = re.sub(r"--results-dir[ =]\S+", f"--results-dir {results_dir}", command)
    return re.sub(r"--(?!results-dir\b)([\w-]+)[ =]/\S*", lambda m: f"--{m[1]} {m[1].replace('-', '_').upper()}",
                  command)


def folder_option(rep: Report) -> str:
    """--ckpt-dir for a checkpoint folder (the runs' `_best.pt` beside their results), else --results-dir."""
    return f"--{'ckpt' if any(rep.results_dir.glob('*_best.pt')) else 'results'}-dir {rep.results_dir}"


def planned_command(rep: Report) -> str:
    """The `run` command that trains the report's runs, at the seeds it has results for."""
    runs = ["all"] if set(rep.runs) == set(LAB_RUNS) else rep.runs
    weights = " --weights none" if rep.planned_weights == "none" and TEACHER_RUN in rep.runs else ""
    seed = f" --seed {' '.join(map(str, rep.training_seeds))}" if rep.training_seeds != [DEFAULT_SEED] else ""
    return f"python -m kdlab run {' '.join(runs)}{weights}{seed} {folder_option(rep)}"


def reproduce_block(rep: Report) -> str:
    """The commands of the results, the figures and this report, as a verbatim block typed in the
    repository root: the run's own command line (from its manifest) or the one that trains them."""
    recorded = manifest_commands(rep.manifest) if rep.manifest else []
    commands = ([("# the runs, as their manifest.json records the " + agreeing(len(recorded), "command", "commands"),
                  typed_command(command, rep.results_dir)) for command in recorded]
                or [("# the runs (a finished run is loaded, an interrupted one resumes)", planned_command(rep))])
    budget = f" --budget-baselines {rep.budget_dir}" if rep.budget_dir else ""
    commands += [("# the figures, from the results files",
                 f"python -m kdlab figures {folder_option(rep)} --out {rep.figures_dir}{budget}"),
                ("# this report", f"python -m kdlab report --results {rep.results_dir} --figures {rep.figures_dir} "
                                  f"--report-dir {rep.report_dir}{budget}"
                                  + (" --draft" if rep.draft_reason() else ""))]
    lines, said = [], None
    for comment, line in commands:
        if comment != said:   # once above the commands it covers
            lines.append(comment)
            said = comment
        # Shell continuation lines, so that a long command fits the page and still runs pasted.
        lines.append(" \\\n    ".join(textwrap.wrap(line, 72, break_long_words=False, break_on_hyphens=False)))
    return "\n".join([r"\begin{verbatim}", *lines, r"\end{verbatim}", ""])


# ----------------------------------------------------------------------------- macros

def macros(rep: Report) -> dict[str, str]:
    """Every value the prose of KD_LAB.tex uses, by macro name (letters only)."""
    students = [run for run in rep.runs if run != TEACHER_RUN]
    # The prose states the two original methods' settings: those of the runs reported, or else
    # the settings the table's scratch run of the method would use.
    logit_runs, feature_runs = ([run for run in rep.runs if rep.config(run)["method"] == method]
                                or [run_of(method, "scratch")] for method in ("kd_logits", "kd_features"))
    image_sizes = {rep.config(run)["image_size"] for run in rep.runs}
    size = image_sizes.pop() if len(image_sizes) == 1 else None
    reason = rep.draft_reason()
    feature_results = [rep.results[r] for r in feature_runs if r in rep.results]
    return {
        "DraftText": tex(draft_text(reason)) if reason else "",
        "TeacherSentence": tex(teacher_note(rep.seeds) or "Every distilled student learned from the one teacher."),
        "ReportStatus": (f"{len(rep.missing)} of {len(rep.expected)} runs missing" if rep.missing else
                         "results of " + tex(rep.results_dir)),
        "ReportDate": tex(max(r["finished"] for r in rep.results.values())[:10]),
        "FiguresDir": rep.figures_tex_path,
        "FiguresDirText": tt(rep.figures_dir),
        "ImageSize": rf"{size}~px" if size else r"a size set per run (Table~\ref{tab:config})",
        "StageSentence": stage_sentence(size),
        "ResolutionCost": (r"a number of pixels that differs between runs (Table~\ref{tab:config})"
                           if size is None else
                           rf"{(size / CIFAR_PX) ** 2:g} times the pixels of a native {CIFAR_PX}~px input"
                           if size > CIFAR_PX else rf"no more pixels than a native {CIFAR_PX}~px input"),
        "BatchSize": setting(rep, rep.runs, "batch_size"),
        "Momentum": setting(rep, rep.runs, "momentum"),
        "WarmupEpochs": setting(rep, rep.runs, "warmup_epochs"),
        "SplitSeed": setting(rep, rep.runs, "split_seed"),
        "TrainingSeeds": enumerate_text([str(seed) for seed in rep.training_seeds]),
        "EmaDecay": setting(rep, rep.runs, "ema_decay"),
        "StudentLabelSmoothing": setting(rep, students, "label_smoothing"),
        "TeacherLabelSmoothing": setting(rep, [TEACHER_RUN], "label_smoothing"),
        "EvaluationViews": setting(rep, rep.runs, "flip_tta", fmt=lambda flip: (
            "the mean of the logits of the image and of its mirror image (flip test-time augmentation)"
            if flip else "the image alone")),
        "EvaluationSentences": evaluation_sentences(rep),
        "ValPerClass": setting(rep, rep.runs, "val_per_class"),
        **dict(zip(("NTrain", "NVal", "NTest"), split_sizes(rep))),
        **{f"Teacher{name}": setting(rep, [TEACHER_RUN], key) for name, key in RECIPE_MACROS.items()},
        "TeacherStart": ("random weights" if rep.config(TEACHER_RUN)["weights"] == "none"
                         else "ImageNet weights"),
        **{f"Finetune{name}": num(getattr(FINETUNE_RECIPE, key)) for name, key in RECIPE_MACROS.items()},
        **{f"Student{name}": setting(rep, students, key) for name, key in RECIPE_MACROS.items()},
        "Temperature": setting(rep, logit_runs, "temperature"),
        "Alpha": setting(rep, logit_runs, "alpha"),
        "HintLayer": setting(rep, feature_runs, "hint_layer", fmt=tt),
        "HintWeight": setting(rep, feature_runs, "hint_weight"),
        "RegressorParams": (f"{feature_results[0]['extra_training_parameters']:,} parameters"
                            if feature_results else "its size is known once a feature-KD run has finished"),
        "TrainingDevice": distinct(rep, "device_name"),
        "TorchVersion": distinct(rep, "torch_version"),
        "DataSource": distinct(rep, "data"),
        "MissingRunsSentence": missing_runs_sentence(rep),
        "MissingFiguresSentence": missing_figures_sentence(rep),
        "AbstractResults": abstract_results(rep),
        "KDGainSentences": kd_gain_sentences(rep),
        "KDCostSentences": kd_cost_sentences(rep),
        "BudgetSentences": budget_sentences(rep),
        "DistillationVerdict": distillation_verdict(rep),
        "LogitsVsFeaturesSentences": logits_vs_features_sentences(rep),
        "PretrainedVsScratchSentences": pretrained_vs_scratch_sentences(rep),
        "StudentVsTeacherSentences": student_vs_teacher_sentences(rep),
        "AgreementSentences": agreement_sentences(rep),
        "PerClassSentences": per_class_sentences(rep),
        "SoftTargetSentences": soft_target_sentences(rep),
        "BestEpochSentence": best_epoch_sentence(rep),
        "SpeedSentences": speed_sentences(rep),
        "DeploySentences": deploy_sentences(rep),
    }


def macros_tex(rep: Report) -> str:
    lines = ["% Generated by `python -m kdlab report`; do not edit. Input in KD_LAB.tex's preamble.",
             r"\newif\ifDraft"]
    for name, value in macros(rep).items():
        if not re.fullmatch("[A-Za-z]+", name):
            raise ValueError(f"macro name {name!r} must be letters only")
        lines.append(rf"\newcommand{{\{name}}}{{{value}}}")
    if rep.draft_reason():
        # Every page, over the text: a draft cannot be mistaken for the lab's results.
        lines += [r"\Drafttrue", r"\usepackage{draftwatermark}", r"\SetWatermarkText{\DraftText}",
                  r"\SetWatermarkScale{0.45}", r"\SetWatermarkLightness{0.85}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- writing and building

def figures_path_for_latex(figures_dir: Path, report_dir: Path) -> str:
    path = Path(os.path.relpath(figures_dir.resolve(), report_dir.resolve())).as_posix()
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", path):
        raise KdlabError(f"the figures folder {figures_dir} has characters LaTeX cannot take in a "
                         f"file name (spaces, accents, symbols); move or link it to a plain path "
                         f"and pass that with --figures.")
    return path


def collect(results_dir, figures_dir, report_dir, expected=None, benchmark=None, budget_dir=None,
            deploy=None) -> Report:
    """What the report reads; `expected`: the runs it expects (default: kdlab.config.expected_runs);
    `budget_dir`: the budget-matched baselines of the results (kdlab.results.BUDGET_DIR for the reference)."""
    results_dir, figures_dir, report_dir = Path(results_dir), Path(figures_dir), Path(report_dir)
    benchmark, budget_dir, deploy = (Path(path) if path else None for path in (benchmark, budget_dir, deploy))
    if unknown := [run for run in expected or () if run not in RUNS]:
        raise KdlabError(f"unknown run {', '.join(unknown)}; valid runs: {', '.join(RUNS)}")
    if not results_dir.is_dir():
        raise KdlabError(f"--results {results_dir} is not a folder; give the folder of the runs' "
                         f"<run>_results.json files (a checkpoint folder holds them).")
    seeds = load_seed_results(results_dir)
    if not seeds:
        raise KdlabError(f"{results_dir} holds no <run>_results.json, so there is nothing to report; "
                         f"train the runs first (`python -m kdlab run all --ckpt-dir {results_dir}`), or "
                         f"give --results the folder that holds them.")
    results = default_seed_results(seeds)
    expected = list(expected) if expected else expected_runs(results)
    return Report(results, seeds, expected, load_efficiency(figures_dir), load_manifest(results_dir),
                  load_benchmark(benchmark), benchmark, load_budget_baselines(budget_dir), budget_dir, results_dir,
                  figures_dir, report_dir, figures_path_for_latex(figures_dir, report_dir), load_deploy(deploy), deploy)


def write_generated(rep: Report, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"macros.tex": macros_tex(rep), "results_table.tex": results_table(rep),
             "config_table.tex": config_table(rep), "provenance.tex": provenance(rep) + "\n",
             "reproduce.tex": reproduce_block(rep), "speed_table.tex": speed_table(rep),
             "deploy_table.tex": deploy_table(rep)}
    for name, text in files.items():
        (out_dir / name).write_text(text)
    return [out_dir / name for name in files]


def build_pdf(report_dir: Path) -> float:
    """latexmk -pdf on KD_LAB.tex in `report_dir`; returns the seconds it took."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "-file-line-error",
         "KD_LAB.tex"], cwd=report_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stdout.splitlines()
                  if line.startswith("!") or re.match(r"\S+\.tex:\d+:", line)]
        detail = errors[0] if errors else (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise KdlabError(f"latexmk could not build {report_dir / 'KD_LAB.pdf'} ({detail}); the "
                         f"whole log is {report_dir / 'KD_LAB.log'}.")
    return time.perf_counter() - start


def place_template(report_dir: Path) -> None:
    """KD_LAB.tex in `report_dir` (made if missing), the template's current text."""
    if not TEMPLATE.is_file():
        raise KdlabError(f"the report's template {TEMPLATE} is missing from kdlab's folder; restore it "
                         f"(`git checkout report/KD_LAB.tex` in the repository) and run again.")
    writable_folder(report_dir, "--report-dir")
    if (report_dir / TEMPLATE.name).resolve() != TEMPLATE:
        shutil.copyfile(TEMPLATE, report_dir / TEMPLATE.name)


def make_report(results_dir="results/reference", figures_dir="figures", report_dir="my_report",
                expected=None, draft=False, pdf=True, pdf_required=False,
                benchmark=DEFAULT_BENCHMARK, budget_dir=None, deploy=None, log=print) -> Report:
    """Write report_dir/generated/*.tex from the results (`collect`), then the PDF if latexmk is here."""
    rep = collect(results_dir, figures_dir, report_dir, expected, benchmark, budget_dir, deploy)
    reason = rep.draft_reason()
    if reason and not draft:
        which = [run for run, r in rep.results.items()
                 if r["smoke"] or (reason == "CPU run" and r["device"] == "cpu")]
        raise KdlabError(f"the results of {', '.join(which)} in {rep.results_dir} come from a "
                         f"{reason}, not the lab's results. Point --results at a real run's folder, "
                         f"or pass --draft for a draft that says so on every page.")
    check_deployment(rep)
    place_template(rep.report_dir)
    written = write_generated(rep, rep.report_dir / "generated")
    log(f"wrote {', '.join(str(p) for p in written)}")
    log(f"{len(rep.results)} results file(s) in {rep.results_dir}"
        + (f"; missing runs: {', '.join(rep.missing)}" if rep.missing else "")
        + (f"; missing figures: {', '.join(rep.missing_figures)}" if rep.missing_figures else "")
        + (f"; {draft_text(reason)}" if reason else ""))
    if not pdf:
        return rep
    if shutil.which("latexmk") is None:
        message = (f"latexmk is not installed, so the PDF was not built (the generated .tex is "
                   f"written). Install it with: {TEX_INSTALL}")
        if pdf_required:
            raise KdlabError(message)
        log(f"kdlab: note: {message}")
        return rep
    seconds = build_pdf(rep.report_dir)
    log(f"built {rep.report_dir / 'KD_LAB.pdf'} in {seconds:.1f}s")
    return rep
