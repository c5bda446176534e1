"""Statistics across training seeds: each run's spread, and a KD run against its baseline.

Reads results dicts as kdlab writes them (`<run>_results.json`): "test_acc", the saved
"test_predictions" and "test_labels", and the training seed in "config". numpy only, no torch:
`status` and `report` use this module and must start at once.
"""
from __future__ import annotations

import math

import numpy as np

from kdlab.errors import KdlabError


# The confidence the per-class intervals hold at together (paired_difference_by_class).
FAMILY_CONFIDENCE = 0.95


def training_seed(results: dict) -> int:
    return results["config"]["seed"]


def summarise(results: list[dict]) -> dict:
    """Test accuracy across the seeds of one run (`results`: its results files, one per seed).

    std is the sample standard deviation (ddof=1) and sem its standard error of the mean; both are
    None for a single seed, where no spread can be measured.
    """
    accs = np.array([r["test_acc"] for r in results], dtype=float)
    n = len(accs)
    std = float(accs.std(ddof=1)) if n > 1 else None
    return dict(n_seeds=n, seeds=sorted(training_seed(r) for r in results), mean=float(accs.mean()),
                std=std, sem=std / math.sqrt(n) if std is not None else None,
                min=float(accs.min()), max=float(accs.max()))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under no difference, b ~ Binomial(b + c, 1/2).

    p = 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c), capped at 1. The sum is exact in Python's
    unbounded integers and the division is correctly rounded, so no normal approximation is needed
    even for thousands of discordant images; only a p-value below ~1e-308 underflows, to 0.0.
    Each term comes from the previous one (C(n, k+1) = C(n, k) (n - k) / (k + 1), exact) because
    math.comb for every k takes seconds once b + c reaches 10,000.
    """
    n, smaller = b + c, min(b, c)
    term = tail = 1                      # C(n, 0)
    for k in range(smaller):
        term = term * (n - k) // (k + 1)
        tail += term
    return min(1.0, 2 * tail / 2 ** n)


def correct_images(results: dict) -> np.ndarray:
    """Which test images the run classified right (bool, one per image)."""
    if "test_labels" not in results:
        run, seed = results["run"], training_seed(results)
        raise KdlabError(f"The results of {run} (seed {seed}) have no test_labels (written by an older "
                         f"kdlab); run `python -m kdlab run {run} --seed {seed} --retrain` to record them.")
    return np.asarray(results["test_predictions"]) == np.asarray(results["test_labels"])


def bootstrap_mean_differences(outcome_counts: np.ndarray, n_boot: int,
                               rng: np.random.Generator) -> np.ndarray:
    """`n_boot` bootstrap replicates of the mean accuracy difference over seed pairs.

    `outcome_counts[i]` counts, for seed pair i, the test images where KD minus baseline
    correctness is -1, 0 and +1. Each replicate resamples the seed pairs with replacement, then,
    within every drawn pair, the test images with replacement (the same images for both runs).
    A pair's resampled difference is the mean of its drawn per-image values in {-1, 0, 1}, so it
    depends only on how many of each value were drawn: a multinomial draw over the three counts is
    exactly the distribution of resampling image indices, at three numbers per pair instead of
    10,000 indices (tests/test_stats.py checks it against index resampling).
    """
    n_pairs = len(outcome_counts)
    n_images = int(outcome_counts[0].sum())
    pairs = rng.integers(n_pairs, size=(n_boot, n_pairs))
    drawn = rng.multinomial(n_images, outcome_counts[pairs] / n_images)
    return (drawn[..., 2] - drawn[..., 0]).mean(axis=1) / n_images


def paired_difference(kd: list[dict], baseline: list[dict], n_boot: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """The KD run's test accuracy minus its baseline's, paired by training seed, with a `confidence`
    interval (95 % unless said).

    `kd` and `baseline` hold one results dict per seed. Only seeds both runs have are used.
    Accuracies come from the saved predictions, so the estimate and its interval read the same
    per-image data. The interval is the 2.5/97.5 percentile (at 95 %) of a paired bootstrap over seeds and
    test images (bootstrap_mean_differences), drawn from `seed`: the same seed gives the same
    interval. McNemar's test per seed pair: b = images only the KD run gets right, c = images
    only the baseline gets right.
    """
    kd_runs, base_runs = ({training_seed(r): r for r in runs} for runs in (kd, baseline))
    kd_name, base_name = kd[0]["run"], baseline[0]["run"]
    seeds = sorted(kd_runs.keys() & base_runs.keys())
    if not seeds:
        raise KdlabError(f"{kd_name} (seeds {sorted(kd_runs)}) and {base_name} (seeds {sorted(base_runs)}) "
                         f"share no training seed, so they cannot be paired; train {base_name} with "
                         f"one of {kd_name}'s seeds (`python -m kdlab run {base_name} --seed "
                         f"{min(kd_runs)}`).")
    first = kd_runs[seeds[0]]
    outcome_counts, mcnemar = [], []
    for s in seeds:
        kd_right, base_right = correct_images(kd_runs[s]), correct_images(base_runs[s])
        for r in (kd_runs[s], base_runs[s]):
            if r["test_labels"] != first["test_labels"]:
                raise KdlabError(f"{r['run']} (seed {s}) was tested on other labels than {kd_name} "
                                 f"(seed {seeds[0]}): the runs were evaluated on different test sets "
                                 f"(a smoke run next to a real one?); compare runs tested on the "
                                 f"same data.")
        b, c = int((kd_right & ~base_right).sum()), int((base_right & ~kd_right).sum())
        outcome_counts.append((c, len(kd_right) - b - c, b))
        mcnemar.append(dict(seed=s, b=b, c=c, p_value=mcnemar_exact_p(b, c)))
    outcome_counts = np.array(outcome_counts)
    differences = (outcome_counts[:, 2] - outcome_counts[:, 0]) / outcome_counts.sum(axis=1)
    replicates = bootstrap_mean_differences(outcome_counts, n_boot, np.random.default_rng(seed))
    tail = 100 * (1 - confidence) / 2
    ci_low, ci_high = (float(q) for q in np.percentile(replicates, [tail, 100 - tail]))
    return dict(kd_run=kd_name, baseline_run=base_name, seeds=seeds,
                differences=[float(d) for d in differences], mean_difference=float(differences.mean()),
                ci_low=ci_low, ci_high=ci_high, confidence=confidence, n_boot=n_boot, mcnemar=mcnemar,
                excludes_zero=ci_low > 0 or ci_high < 0)


def paired_difference_by_class(kd: list[dict], baseline: list[dict], n_classes: int) -> list[dict]:
    """`paired_difference` on the test images of each true class apart: which classes a method helps.

    Ten intervals at 95 % each would exclude zero for some class one time in two or so with no
    difference at all. Each is at 1 - 5 %/n_classes instead (Bonferroni), so all of them hold
    together at 95 % at least, and "excludes zero" is a claim made once, not ten times."""
    def of_class(results: dict, c: int) -> dict:
        keep = np.asarray(results["test_labels"]) == c
        return dict(results, test_predictions=np.asarray(results["test_predictions"])[keep].tolist(),
                    test_labels=np.asarray(results["test_labels"])[keep].tolist())
    return [paired_difference([of_class(r, c) for r in kd], [of_class(r, c) for r in baseline],
                              confidence=1 - (1 - FAMILY_CONFIDENCE) / n_classes)
            for c in range(n_classes)]


def difference_points(d: dict, unit: str = "points") -> str:
    """A paired difference and its interval in percentage points: '+1.21 points [+0.92, +1.50]'."""
    return f"{100 * d['mean_difference']:+.2f} {unit} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"


def per_class_interval_text(by_class: list[dict]) -> str:
    """How paired_difference_by_class's intervals are drawn, in words: the figure and the report say it."""
    return (f"{100 * by_class[0]['confidence']:g}% interval each, {100 * FAMILY_CONFIDENCE:g}% for the "
            f"{len(by_class)} classes together (Bonferroni)")


def check_no_duplicates(entries: list[tuple]) -> list[tuple]:
    """The (path, results) pairs with one per (run, training seed); refuses conflicting copies.

    The same run and seed twice with the same config is a copy: the first is kept. With different
    configs, averaging them would mix two experiments, so this stops and names both files.
    """
    kept = {}
    for path, results in entries:
        key = (results["run"], training_seed(results))
        first_path, first = kept.setdefault(key, (path, results))
        a, b = first["config"], results["config"]
        if a != b:
            differing = ", ".join(f"{k}: {a.get(k, '<absent>')!r} against {b.get(k, '<absent>')!r}"
                                  for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
            raise KdlabError(f"{first_path} and {path} both hold {key[0]} with training seed {key[1]} "
                             f"but with different settings ({differing}); move the one you do not "
                             f"mean out of the folder.")
    return list(kept.values())
