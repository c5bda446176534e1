"""The generated blocks of README.md and docs/*.md: tables that state what the code or the results say.

A block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; `python -m
kdlab.docs` rewrites every block of every page from its source (kdlab.config, kdlab.registry, the CLI
parser, the figures module's docstrings, the committed results files), and `--check` only says
which blocks differ. tests/test_docs.py fails on any stale block, so no table restates the code
by hand. A maintainer's tool, not a subcommand of `python -m kdlab`: this module reads the CLI's
parser, and the CLI never imports it.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

from kdlab import benchmark_tables, figures
from kdlab.config import ARCH_NAMES, LAB_RUNS, RUNS, STARTS, TEACHER_RUN, kd_pairs, make_config, run_label
from kdlab.errors import KdlabError
from kdlab.findings import Findings
from kdlab.lab_time import time_table
from kdlab.latex import count, markdown_table
from kdlab.registry import METHODS, setting_fields
from kdlab.results import (BUDGET_DIR, budget_matched_epochs, load_ablation, load_benchmark, load_budget_baselines,
                           load_deploy, load_seed_results, read_json, teacher_note)
from kdlab.stats import difference_points

REPO = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
BLOCK = re.compile(r"<!-- generated:(?P<name>[\w-]+) -->\n(?P<body>(?:.*?\n)?)<!-- /generated:(?P=name) -->", re.S)


def pages(root: Path = REPO) -> list[Path]:
    return [path for pattern in PAGES for path in sorted(root.glob(pattern))]


def cell(value) -> str:
    """A config value as a table cell: `0.4`, `5e-05`, `layer1+layer2`, `yes`/`no`."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- the recipe

# Why each default is what it is; the values come from kdlab.config (whose comments say more).
RECIPE_REASONS = {
    "epochs": "fine-tuning: pretrained features need few epochs; from scratch: the teacher trains longer, "
              "to be worth distilling",
    "lr": "peak of a linear warm-up then a cosine to zero; fine-tuning at an eighth of the scratch rate, "
          "so large steps do not wash out the ImageNet features (scratch: results/ablation-lr-resolution)",
    "weight_decay": "light when fine-tuning (decay pulls weights away from their pretrained values); the "
                    "usual CIFAR decay from scratch",
    "batch_size": "fills a modern GPU at 128 px; the learning rates are set for it",
    "momentum": "SGD with Nesterov momentum, the standard for ResNets on CIFAR",
    "warmup_epochs": "shields pretrained features and BatchNorm statistics from the first large steps",
    "image_size": "CIFAR's 32 px upsampled on the GPU, so the four stages of torchvision's ImageNet ResNets "
                  "see 32/16/8/4 px maps (docs/recipe.md)",
    "label_smoothing": "off for the students: the paired ablation chose it on validation "
                       "(results/ablation-recipe); never on the teacher, whose smoothed outputs distil worse",
    "ema_decay": "a weight average (EMA, BatchNorm statistics included), updated every step; validation, "
                 "the best epoch and the test use it",
    "flip_tta": "each image evaluated as the mean of its own and its mirror's logits",
    "val_per_class": "the 5,000-image validation split picks each run's best epoch; the test is used once",
    "seed": "training seed: initialisation, batch order, augmentation (`--seed`)",
    "split_seed": "the 45k/5k split, the same whatever the training seed",
}


def recipe_table() -> str:
    """Every default of the four recipes (teacher and students, from ImageNet and from scratch)."""
    student = {start: next(run for run in LAB_RUNS if run != TEACHER_RUN and RUNS[run].start == start)
               for start in STARTS}
    columns = [(f"{who}, {STARTS[start]}", make_config(run, weights=None if start == "pretrained" else "none"))
               for start in STARTS for who, run in (("teacher", TEACHER_RUN), ("students", student[start]))]
    rows = [[f"`{name}`", *(cell(getattr(cfg, name)) for _, cfg in columns), RECIPE_REASONS[name]]
            for name in RECIPE_REASONS]
    return markdown_table(["setting", *(title for title, _ in columns), "why"], rows, "lrrrrl")


# ----------------------------------------------------------------------------- runs and methods

def runs_table() -> str:
    rows = [[f"`{name}`", ARCH_NAMES[run.arch], STARTS[run.start], METHODS[run.method].name,
             "yes" if run.in_lab else "no", "" if run.original_lab_test_acc is None else f"{run.original_lab_test_acc:.4f}"]
            for name, run in RUNS.items()]
    return markdown_table(["run (checkpoint `<run>_best.pt`)", "network", "start", "method", "in `run all`",
                  "original lab's test accuracy"], rows, "llllll")


def methods_table() -> str:
    rows = [[f"`{key}`", m.name, m.description, ", ".join(f"`{t}`" for t in m.loss_terms)] for key, m in METHODS.items()]
    return markdown_table(["key", "method", "what it matches", "loss terms it logs"], rows)


def settings_table() -> str:
    rows = [[METHODS[key].name, f"`--{f.name.replace('_', '-')}`", cell(f.default), f.metadata["help"]]
            for key in METHODS for f in setting_fields(key)]
    return markdown_table(["method", "setting", "default", "meaning"], rows, "llrl")


# ----------------------------------------------------------------------------- the command line

def cli_reference() -> str:
    """Every subcommand of `python -m kdlab`, its options, their defaults and help."""
    from kdlab.cli import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    out = []
    for name, sub in commands.choices.items():
        rows = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
            default = ("" if action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []
                       else cell(action.default) if not isinstance(action.default, list)
                       else " ".join(map(str, action.default)))
            rows.append([flag, f"`{default}`" if default else "", action.help or ""])
        out += [f"`python -m kdlab {name}`: {helps[name]}", "",
                markdown_table(["option", "default", "what it does"], rows), ""]
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------- figures

def figures_table() -> str:
    """Each file the figures module writes, as the docstring of the function that draws it says."""
    rows = []
    for function in figures.FIGURE_MAKERS:
        first = function.__doc__.split("\n\n")[0]
        files, what = (" ".join(first.split())).split(": ", 1)
        rows.append([", ".join(f"`{file}`" for file in files.split(", ")), what, f"`{function.__name__}`"])
    return markdown_table(["file", "what it shows", "drawn by (`kdlab.figures`)"], rows)


# ----------------------------------------------------------------------------- results

RESULTS = REPO / "results"
REFERENCE = RESULTS / "reference"


@functools.cache
def reference_findings():
    """The reference's comparisons (kdlab.findings), computed once for every block that words them."""
    return Findings(load_seed_results(REFERENCE), load_budget_baselines(REPO / BUDGET_DIR))


def difference_words(d: dict) -> str:
    """A paired difference (kdlab.stats.paired_difference) and its interval, in the README's words."""
    verdict = "excludes zero" if d["excludes_zero"] else "includes zero: no evidence either way"
    return f"{difference_points(d)} over {count(len(d['seeds']), 'paired seed')}; the interval {verdict}"


def findings_list(found) -> str:
    """What the reference says, in words (a kdlab.findings.Findings): each distillation run against
    the baseline of the same seeds, logit KD from scratch against the budget-matched baselines, and
    the best student against its teacher."""
    results = found.results
    lines = [f"- **{run_label(kd, results)}** against {run_label(base, results)}: {difference_words(found.gain(kd))}."
             for base, kd in kd_pairs() if found.gain(kd)]
    if found.compares_budgets:
        for c in found.budgets[1:]:   # after equal epochs, the gain above
            d = c["difference"]
            lines.append(f"- **Logit KD from scratch against the baseline {c['label']}**"
                         + (f" (the baseline trained {c['epochs']} epochs): {difference_words(d)}." if d else
                            ": pending, the GPU plan has not trained that baseline yet."))
    if note := teacher_note(found.seeds):
        lines.append(f"- **Teachers**: {note}")
    if found.teacher_gap:
        lines.append(f"- **The best student, {run_label(found.best_student, results)}**, against its teacher: "
                     f"{difference_words(found.teacher_gap)}.")
    return "\n".join(lines)


def variants_table(folder: Path) -> str:
    """A folder of one-run variants, `<variant>_<run>_results.json` each: their settings and accuracies."""
    rows = []
    for path in sorted(folder.glob("*_results.json")):
        r = read_json(path, "copy it again from the run that wrote it.")
        rows.append([path.name.removesuffix(f"_{r['run']}_results.json"), cell(r["config"]["lr"]),
                     r["config"]["image_size"], r["epochs"], f"{r['best_val_acc']:.4f} ({r['best_epoch']})",
                     f"{r['test_acc']:.4f}"])
    return markdown_table(["variant", "peak lr", "input px", "epochs", "best val acc (epoch)", "test acc"], rows,
                          "lrrrrr")


def budget_epochs() -> str:
    """The epochs of the budget-matched baselines, as kdlab.results.budget_matched_epochs computes them."""
    epochs = budget_matched_epochs(load_seed_results(REFERENCE))
    return "\n".join(f"- `{variant}`: {n} epochs" for variant, n in epochs.items())


def benchmark_block(name: str) -> str:
    """The tables of a committed benchmarks/throughput.py results file (kdlab.benchmark_tables)."""
    path = REPO / "benchmarks" / "results" / f"{name.removeprefix('benchmark-')}.json"
    return benchmark_tables.markdown(load_benchmark(path), path.relative_to(REPO).as_posix())


BENCHMARK_BLOCKS = ("benchmark-h200-full-compile", "benchmark-cpu-quick")
# The reference weights deployed on this repository's development CPU (python -m kdlab deploy --kept).
DEPLOY_REFERENCE = "results/deploy/deploy.json"


GENERATORS = {"lab-time": time_table, "recipe": recipe_table, "runs": runs_table, "methods": methods_table,
              "settings": settings_table,
              "cli": cli_reference, "figures": figures_table, "budget-epochs": budget_epochs,
              "results-reference": lambda: figures.format_results_table(reference_findings().seeds,
                                                                        reference_findings()),
              "results-evaluation": lambda: figures.format_evaluation_table(load_seed_results(REFERENCE)),
              "results-findings": lambda: findings_list(reference_findings()),
              "results-ablation": lambda: figures.format_ablation_table(load_ablation(RESULTS / "ablation-recipe")),
              "results-ablation-lr-resolution": lambda: variants_table(RESULTS / "ablation-lr-resolution"),
              "results-deploy": lambda: figures.format_deploy_table(load_deploy(REPO / DEPLOY_REFERENCE)),
              **{name: (lambda name=name: benchmark_block(name)) for name in BENCHMARK_BLOCKS}}


def regenerate(text: str, made: dict[str, str]) -> str:
    """`text` with each generated block's body replaced by what its generator writes now."""
    def body(m):
        if m["name"] not in GENERATORS:
            raise KdlabError(f"unknown generated block {m['name']!r}; known: {', '.join(GENERATORS)}")
        if m["name"] not in made:
            made[m["name"]] = GENERATORS[m["name"]]()
        return f"<!-- generated:{m['name']} -->\n{made[m['name']]}\n<!-- /generated:{m['name']} -->"
    return BLOCK.sub(body, text)


def regenerated_pages(root: Path, made: dict[str, str]) -> list[tuple[Path, str, str]]:
    """(page, its text, its text regenerated) for every page; `made` collects each block's text, made once."""
    return [(page, text := page.read_text(), regenerate(text, made)) for page in pages(root)]


def stale_blocks(root: Path = REPO) -> list[str]:
    """'page: block' for every block whose text differs from what its generator writes now."""
    return [f"{page.relative_to(root)}: {old['name']}" for page, text, fresh in regenerated_pages(root, {})
            for old, new in zip(BLOCK.finditer(text), BLOCK.finditer(fresh)) if old["body"] != new["body"]]


def write_docs(root: Path = REPO, log=print) -> list[Path]:
    """Rewrite every generated block of every page; returns the pages that changed."""
    made, changed = {}, []
    for page, text, fresh in regenerated_pages(root, made):
        if fresh != text:
            page.write_text(fresh)
            changed.append(page)
    log(f"{len(made)} generated blocks in {len(pages(root))} pages; rewrote "
        + (", ".join(str(p.relative_to(root)) for p in changed) or "none (all up to date)"))
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlab.docs", description="rewrite the generated tables "
                                     "of README.md and docs/*.md from the code and the committed results")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each block that differs from what would be written")
    if not parser.parse_args(argv).check:
        write_docs()
        return 0
    stale = stale_blocks()
    for block in stale:
        print(f"stale: {block}")
    print(f"{len(stale)} stale block(s); `python -m kdlab.docs` rewrites them" if stale
          else "every generated block is up to date")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
