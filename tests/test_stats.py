"""kdlab.stats: spread across seeds, the paired KD-against-baseline difference, duplicate results."""
import math
import time

import numpy as np
import pytest

from kdlab.errors import KdlabError
from kdlab.stats import (bootstrap_mean_differences, check_no_duplicates, mcnemar_exact_p,
                         paired_difference, paired_difference_by_class, per_class_interval_text, summarise)

KD, BASE = "student_scratch_kd_scores", "student_scratch_baseline"


def results(run, seed, predictions, labels):
    return dict(run=run, test_acc=float(np.mean(np.equal(predictions, labels))),
                test_predictions=predictions, test_labels=labels,
                config=dict(seed=seed, lr=0.4))


def pair(seed, b, c, both_right, both_wrong):
    """A KD and a baseline result for one seed: b images only KD gets right, c only the baseline."""
    kd_right = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
    base_right = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
    labels = [i % 10 for i in range(len(kd_right))]
    predict = lambda right: [y if ok else (y + 1) % 10 for y, ok in zip(labels, right)]
    return results(KD, seed, predict(kd_right), labels), results(BASE, seed, predict(base_right), labels)


def pairs(*counts):
    """KD and baseline lists for seeds 0, 1, ...: one (b, c, both_right, both_wrong) per seed."""
    made = [pair(seed, *c) for seed, c in enumerate(counts)]
    return [kd for kd, _ in made], [base for _, base in made]


# ----------------------------------------------------------------------------- summary

def test_summary_of_three_seeds_against_hand_computed_numbers():
    runs = [dict(run=BASE, test_acc=acc, config=dict(seed=s)) for s, acc in [(3, 0.87), (1, 0.80), (2, 0.82)]]
    # mean 0.83; squared deviations 0.0016 + 0.0009 + 0.0001 = 0.0026, / (3 - 1) = 0.0013
    summary = summarise(runs)
    assert summary["n_seeds"] == 3 and summary["seeds"] == [1, 2, 3]
    assert summary["mean"] == pytest.approx(0.83)
    assert summary["std"] == pytest.approx(math.sqrt(0.0013)) == pytest.approx(0.036056, abs=1e-6)
    assert summary["sem"] == pytest.approx(0.036056 / math.sqrt(3), abs=1e-6)
    assert (summary["min"], summary["max"]) == (0.80, 0.87)


def test_one_seed_has_no_spread():
    summary = summarise([dict(run=BASE, test_acc=0.9, config=dict(seed=42))])
    assert summary == dict(n_seeds=1, seeds=[42], mean=0.9, std=None, sem=None, min=0.9, max=0.9)


# ----------------------------------------------------------------------------- McNemar

def test_mcnemar_exact_p_against_a_hand_computed_example():
    # b=7, c=2: 2 * (C(9,0) + C(9,1) + C(9,2)) / 2^9 = 2 * (1 + 9 + 36) / 512 = 0.1797
    assert mcnemar_exact_p(7, 2) == mcnemar_exact_p(2, 7) == pytest.approx(92 / 512)
    assert round(mcnemar_exact_p(7, 2), 4) == 0.1797
    assert mcnemar_exact_p(0, 0) == mcnemar_exact_p(40, 40) == 1.0
    n = 300
    assert mcnemar_exact_p(180, 120) == pytest.approx(2 * sum(math.comb(n, k) for k in range(121)) / 2 ** n)


def test_mcnemar_stays_finite_and_close_to_the_normal_approximation_for_thousands_of_images():
    b, c = 5_300, 4_700
    z = (abs(b - c) - 1) / math.sqrt(b + c)           # continuity-corrected normal approximation
    p = mcnemar_exact_p(b, c)
    assert 0 < p < 1e-8
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.1)


# ----------------------------------------------------------------------------- paired difference

def test_point_estimate_and_mcnemar_counts_against_hand_counts():
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    kd = [results(KD, 0, [0, 1, 2, 3, 4, 5, 6, 7, 0, 0], labels),     # right on 8
          results(KD, 1, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], labels)]     # right on 10
    base = [results(BASE, 0, [0, 1, 2, 3, 4, 5, 0, 0, 8, 0], labels),  # right on 7; KD-only 6, 7; base-only 8
            results(BASE, 1, [0, 1, 2, 3, 4, 0, 0, 0, 0, 0], labels)]  # right on 5; KD-only 5..9
    result = paired_difference(kd, base, n_boot=2_000)
    assert result["seeds"] == [0, 1]
    assert result["differences"] == pytest.approx([0.8 - 0.7, 1.0 - 0.5])
    assert result["mean_difference"] == pytest.approx((0.1 + 0.5) / 2)
    assert [(m["seed"], m["b"], m["c"]) for m in result["mcnemar"]] == [(0, 2, 1), (1, 5, 0)]
    assert result["mcnemar"][1]["p_value"] == pytest.approx(2 / 2 ** 5)
    assert result["ci_low"] <= result["mean_difference"] <= result["ci_high"]
    assert result["n_boot"] == 2_000


def test_identical_runs_have_an_interval_of_width_zero():
    kd, base = pairs((0, 0, 80, 20), (0, 0, 85, 15))
    result = paired_difference(kd, base)
    assert result["mean_difference"] == result["ci_low"] == result["ci_high"] == 0
    assert not result["excludes_zero"]
    assert [m["p_value"] for m in result["mcnemar"]] == [1.0, 1.0]


def test_a_clearly_better_run_excludes_zero():
    kd, base = pairs((300, 100, 8_500, 1_100), (280, 110, 8_520, 1_090), (310, 95, 8_480, 1_115))
    result = paired_difference(kd, base)
    assert result["excludes_zero"] and 0 < result["ci_low"] <= result["mean_difference"] <= result["ci_high"]
    assert all(m["p_value"] < 1e-10 for m in result["mcnemar"])


def test_runs_that_differ_by_chance_include_zero():
    kd, base = pairs((210, 200, 8_600, 990), (195, 205, 8_610, 990), (204, 199, 8_597, 1_000))
    result = paired_difference(kd, base)
    assert not result["excludes_zero"] and result["ci_low"] < 0 < result["ci_high"]
    assert result["ci_low"] <= result["mean_difference"] <= result["ci_high"]


def test_the_same_seed_gives_the_same_interval():
    kd, base = pairs((30, 20, 900, 50), (25, 22, 903, 50))
    first, again, other = (paired_difference(kd, base, n_boot=3_000, seed=s) for s in (7, 7, 8))
    assert first == again
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])


def test_multinomial_draws_match_resampling_image_indices():
    """The counts shortcut has the distribution of the plain bootstrap over seeds and images."""
    kd, base = pairs((9, 3, 40, 8), (5, 6, 44, 5))
    kd_right = np.array([np.equal(r["test_predictions"], r["test_labels"]) for r in kd], dtype=int)
    base_right = np.array([np.equal(r["test_predictions"], r["test_labels"]) for r in base], dtype=int)
    per_image = kd_right - base_right                                   # (seed pairs, images)
    n_pairs, n_images = per_image.shape
    n_boot = 20_000
    rng = np.random.default_rng(1)
    seed_draws = rng.integers(n_pairs, size=(n_boot, n_pairs, 1))
    image_draws = rng.integers(n_images, size=(n_boot, n_pairs, n_images))
    by_indices = per_image[seed_draws, image_draws].mean(axis=(1, 2))
    counts = np.array([[(d == v).sum() for v in (-1, 0, 1)] for d in per_image])
    by_counts = bootstrap_mean_differences(counts, n_boot, np.random.default_rng(2))
    assert by_counts.mean() == pytest.approx(by_indices.mean(), abs=0.002)
    assert by_counts.std() == pytest.approx(by_indices.std(), rel=0.03)
    quantiles = [2.5, 25, 50, 75, 97.5]
    assert (np.percentile(by_counts, quantiles)
            == pytest.approx(np.percentile(by_indices, quantiles), abs=0.01))


def test_seeds_only_one_run_has_are_left_out():
    kd, base = pairs((5, 1, 90, 4), (6, 2, 88, 4), (7, 0, 90, 3))
    result = paired_difference(kd[1:], base[:2], n_boot=500)           # KD seeds 1, 2; baseline 0, 1
    assert result["seeds"] == [1] and result["differences"] == pytest.approx([0.04])


def test_runs_without_a_common_seed_are_refused():
    kd, base = pairs((5, 1, 90, 4), (6, 2, 88, 4))
    with pytest.raises(KdlabError, match=rf"share no training seed.*python -m kdlab run {BASE} --seed 1"):
        paired_difference(kd[1:], base[:1])


def test_runs_tested_on_different_labels_are_refused():
    kd, base = pairs((5, 1, 90, 4), (6, 2, 88, 4))
    base[1]["test_labels"] = base[1]["test_labels"][::-1]
    with pytest.raises(KdlabError, match=rf"{BASE} \(seed 1\) was tested on other labels"):
        paired_difference(kd, base)


def test_results_without_labels_say_how_to_record_them():
    kd, base = pairs((5, 1, 90, 4))
    del base[0]["test_labels"]
    with pytest.raises(KdlabError,
                       match=rf"{BASE} \(seed 0\) have no test_labels.*kdlab run {BASE} --seed 0 --retrain"):
        paired_difference(kd, base)


def test_ten_thousand_replicates_of_three_seeds_of_the_full_test_set_take_under_a_second():
    kd, base = pairs((300, 250, 8_500, 950), (280, 260, 8_510, 950), (310, 240, 8_490, 960))
    # This process's CPU time, not the wall clock: other processes on a busy machine do not count.
    start = time.process_time()
    paired_difference(kd, base, n_boot=10_000)
    assert time.process_time() - start < 1.0


# ----------------------------------------------------------------------------- duplicates

def test_a_run_and_seed_twice_with_different_settings_is_refused_naming_both_files():
    kd, _ = pairs((5, 1, 90, 4))
    changed = dict(kd[0], config=dict(kd[0]["config"], lr=0.2))
    with pytest.raises(KdlabError, match=r"a/kd_results\.json and b/kd_results\.json both hold "
                                         rf"{KD} with training seed 0 .*lr: 0\.4 against 0\.2"):
        check_no_duplicates([("a/kd_results.json", kd[0]), ("b/kd_results.json", changed)])


def test_a_copy_is_kept_once_and_other_seeds_and_runs_are_kept():
    kd, base = pairs((5, 1, 90, 4), (6, 2, 88, 4))
    entries = [("a/kd_0", kd[0]), ("a/kd_1", kd[1]), ("b/kd_0", dict(kd[0])), ("a/base_0", base[0])]
    assert check_no_duplicates(entries) == [entries[0], entries[1], entries[3]]


def test_per_class_differences_count_each_class_images_alone():
    # 40 images, labels 0..9 four times: KD gains on classes 0 and 1 only; the baseline on class 9
    labels = [i % 10 for i in range(40)]
    wrong = lambda y: (y + 1) % 10
    kd = [y if y != 9 else wrong(y) for y in labels]
    base = [y if y not in (0, 1) else wrong(y) for y in labels]
    by_class = paired_difference_by_class([results(KD, 0, kd, labels)], [results(BASE, 0, base, labels)], 10)
    assert [d["mean_difference"] for d in by_class] == [1.0, 1.0] + [0.0] * 7 + [-1.0]
    assert [d["mcnemar"][0]["b"] for d in by_class] == [4, 4] + [0] * 8
    assert by_class[0]["excludes_zero"] and by_class[9]["excludes_zero"] and not by_class[5]["excludes_zero"]


def test_per_class_intervals_hold_at_95_percent_together():
    # 40 images a class; on class 0 four images only KD gets right. A bootstrap draws none of the four
    # with probability (36/40)^40 = 1.5%: under 2.5%, so one 95% interval excludes zero; over 0.25%,
    # so the interval at 1 - 5%/10 = 99.5% (ten classes, Bonferroni) includes it.
    assert 0.0025 < (36 / 40) ** 40 < 0.025
    labels = [i % 10 for i in range(400)]
    gained = set([i for i, y in enumerate(labels) if y == 0][:4])
    kd = results(KD, 0, labels, labels)
    base = results(BASE, 0, [(y + 1) % 10 if i in gained else y for i, y in enumerate(labels)], labels)
    by_class = paired_difference_by_class([kd], [base], 10)
    class_0 = [i for i, y in enumerate(labels) if y == 0]
    only_class_0 = lambda r: dict(r, test_predictions=[r["test_predictions"][i] for i in class_0],
                                  test_labels=[labels[i] for i in class_0])
    alone = paired_difference([only_class_0(kd)], [only_class_0(base)])
    assert alone["confidence"] == 0.95 and alone["excludes_zero"] and alone["mean_difference"] == 0.1
    corrected = paired_difference([only_class_0(kd)], [only_class_0(base)], confidence=0.995)
    assert [by_class[0][k] for k in ("confidence", "ci_low", "ci_high", "excludes_zero")] == [
        0.995, corrected["ci_low"], corrected["ci_high"], False]
    assert by_class[0]["ci_low"] == 0.0 and alone["ci_low"] == 0.025
    assert per_class_interval_text(by_class) == "99.5% interval each, 95% for the 10 classes together (Bonferroni)"
