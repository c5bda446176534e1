"""kdlab.figures: its counting functions, on inputs small enough to check by hand, and what each
figure plots (bar heights, curve points, interval ends, the budget variants), read from the figure
objects and checked against the results files.

The figures are also drawn, as PNG files, from real smoke runs in test_notebook.py.
"""
import json

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from torchvision import models

from conftest import REPO

from kdlab.cli import main
from kdlab.errors import KdlabError
from kdlab.config import RUNS, run_label
from kdlab.figures import (confusion_counts, make_all_figures, original_lab_accuracies, plot_soft_targets, plot_sweep,
                           plot_throughput, run_colour, teacher_agreement)
from kdlab.measure import flops_per_image
from kdlab.results import best_student
from kdlab.stats import paired_difference_by_class
from kdlab.models import build_model


def test_confusion_counts_puts_true_classes_in_rows():
    counts = confusion_counts(predictions=[0, 1, 1, 9, 3], labels=[0, 1, 2, 9, 9])
    expected = np.zeros((10, 10), dtype=int)
    expected[0, 0] = expected[1, 1] = expected[2, 1] = expected[9, 9] = expected[9, 3] = 1
    np.testing.assert_array_equal(counts, expected)


def test_agreement_and_best_student_compare_predictions_per_image():
    results = {"teacher_resnet50": dict(test_predictions=[1, 2, 3, 4], test_acc=0.9),
               "student_pretrained_baseline": dict(test_predictions=[1, 2, 0, 0], test_acc=0.5),
               "student_pretrained_kd_logits": dict(test_predictions=[1, 2, 3, 0], test_acc=0.7)}
    assert teacher_agreement(results) == {"student_pretrained_baseline": 0.5,
                                          "student_pretrained_kd_logits": 0.75}
    assert best_student(results) == "student_pretrained_kd_logits"


@pytest.mark.parametrize("arch, weights", [("resnet18", models.ResNet18_Weights.IMAGENET1K_V1),
                                           ("resnet50", models.ResNet50_Weights.IMAGENET1K_V2)])
def test_flops_match_torchvisions_published_count(arch, weights):
    # torchvision publishes GFLOPs at 224 px counting a multiply-add once; PyTorch's counter twice.
    # Our 10-class head is smaller than ImageNet's 1000-class one, by well under 1% of the total.
    counted = flops_per_image(build_model(arch, "none").eval(), 224)
    assert counted / 2 / 1e9 == pytest.approx(weights.meta["_ops"], rel=0.01)


def test_every_run_has_its_own_colour_and_label_and_the_original_lab_figures_are_the_three():
    assert len({run_colour(run) for run in RUNS}) == len({run.label for run in RUNS.values()}) == len(RUNS)
    assert original_lab_accuracies() == {"teacher_resnet50": 0.9297, "student_pretrained_baseline": 0.9213,
                                         "student_pretrained_kd_logits": 0.9312}


def test_a_run_started_from_random_weights_is_never_called_pretrained():
    for run in RUNS:
        assert "pretrained" not in run_label(run, {run: dict(weights="none")})
    assert run_label("student_pretrained_baseline", {}) == RUNS["student_pretrained_baseline"].label
    assert run_label("teacher_resnet50", {"teacher_resnet50": dict(weights="none")}).endswith("(from scratch)")


def test_figures_into_an_unwritable_folder_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "figures"
    assert main(["figures", "--results-dir", str(REPO / "results" / "reference"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: ") and err.count("\n") == 1
    assert f"cannot write to {out}" in err and "--out" in err


def test_figures_of_an_empty_folder_say_what_to_do(tmp_path):
    with pytest.raises(KdlabError, match="python -m kdlab run all"):
        make_all_figures(tmp_path, tmp_path / "figures")


def test_efficiency_measured_elsewhere_is_reused_with_the_accuracies_of_the_results(tmp_path, capsys):
    reference = REPO / "results" / "reference"
    made = make_all_figures(reference, tmp_path / "figures", efficiency_from=REPO / "figures", log=lambda _: None)
    measured = (REPO / "figures" / "efficiency.json").read_text()
    for run, row in made["efficiency"]["runs"].items():
        assert row["latency_ms"] == json.loads(measured)["runs"][run]["latency_ms"]
    assert made["efficiency"]["reused_from"] == str(REPO / "figures" / "efficiency.json")
    with pytest.raises(KdlabError, match="holds no efficiency.json"):
        make_all_figures(reference, tmp_path / "other", efficiency_from=tmp_path / "nowhere", log=lambda _: None)


def test_soft_target_examples_are_the_first_right_image_of_each_chosen_class_or_else_its_first():
    import base64
    import torch
    from kdlab.checkpoints import SOFT_TARGET_CLASSES, soft_target_examples
    from kdlab.config import CLASSES

    labels = torch.tensor([3, 3, 5, 1, 0])                  # cat, cat, dog, automobile, airplane
    logits = torch.nn.functional.one_hot(torch.tensor([5, 3, 5, 2, 0]), 10).float()   # right: 1, 2, 4
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 32, 32)
    examples = soft_target_examples(logits, images, labels)
    assert [CLASSES[e["label"]] for e in examples] == [c for c in SOFT_TARGET_CLASSES if c != "truck"]
    assert [e["test_index"] for e in examples] == [1, 2, 3], "the first image the model gets right, or the first"
    assert examples[0]["logits"] == logits[1].tolist()
    assert base64.b64decode(examples[1]["image"]) == bytes([2]) * 3 * 32 * 32


def test_the_budget_matched_baselines_are_drawn_beside_the_test_accuracies(tmp_path):
    """A stand-in variant (the reference baseline's files, relabelled 34 epochs): drawn after the runs."""
    reference = REPO / "results" / "reference"
    variant = tmp_path / "ablation-budget" / "equal-training-time"
    variant.mkdir(parents=True)
    for path in reference.glob("student_scratch_baseline*_results.json"):
        r = json.loads(path.read_text())
        (variant / path.name).write_text(json.dumps(dict(r, epochs=34, config=dict(r["config"], epochs=34))))
    made = make_all_figures(reference, tmp_path / "figures", efficiency_from=REPO / "figures", log=lambda _: None,
                            budget_dir=tmp_path / "ablation-budget")
    assert made["budget_baselines"] == ["equal-training-time"]
    assert (tmp_path / "figures" / "comparison_test_accuracy.png").is_file()
    without = make_all_figures(reference, tmp_path / "plain", efficiency_from=REPO / "figures", log=lambda _: None,
                               budget_dir=tmp_path / "nowhere")
    assert without["budget_baselines"] == []


def test_reused_efficiency_leaves_out_a_run_it_never_measured_and_names_it(tmp_path):
    """--efficiency-from a folder measured before a run existed: the run gets no row (never another
    run's timing), and the table says it was not measured there."""
    from kdlab.figures import format_efficiency_table, reuse_efficiency
    from kdlab.results import default_seed_results, load_seed_results

    results = default_seed_results(load_seed_results(REPO / "results" / "reference"))
    measured = json.loads((REPO / "figures" / "efficiency.json").read_text())
    dropped = next(run for run in measured["runs"] if run != "teacher_resnet50")
    measured["runs"].pop(dropped)
    (tmp_path / "efficiency.json").write_text(json.dumps(measured))
    reused = reuse_efficiency(tmp_path, results)
    assert dropped not in reused["runs"] and dropped in reused["not_measured"]
    assert set(reused["runs"]) | set(reused["not_measured"]) == set(results)
    assert all(reused["runs"][run]["test_acc"] == results[run]["test_acc"] for run in reused["runs"])
    assert f"Not measured there: {', '.join(reused['not_measured'])}." in format_efficiency_table(reused)


# ----------------------------------------------------------------------------- the figures' data

REFERENCE = REPO / "results" / "reference"
BUDGET_EPOCHS, BUDGET_GAIN = 34, 0.0125    # the stand-in budget-matched baseline: its epochs, its gain


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure of the reference results and a stand-in budget-matched baseline, as figure
    objects by file name (not written: the data is the question, not the pixels), and the
    results files read here with json alone."""
    import kdlab.figures

    tmp = tmp_path_factory.mktemp("drawn")
    variant = tmp / "ablation-budget" / "equal-training-time"
    variant.mkdir(parents=True)
    seeds = {}
    for path in sorted(REFERENCE.glob("*_results.json")):
        r = json.loads(path.read_text())
        seeds.setdefault(r["run"], []).append(r)
        if r["run"] == "student_scratch_baseline":
            (variant / path.name).write_text(json.dumps(dict(
                r, epochs=BUDGET_EPOCHS, config=dict(r["config"], epochs=BUDGET_EPOCHS),
                test_acc=r["test_acc"] + BUDGET_GAIN)))
    figures = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(kdlab.figures, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
        made = make_all_figures(REFERENCE, tmp / "figures", efficiency_from=REPO / "figures", log=lambda _: None,
                                budget_dir=tmp / "ablation-budget")
    default = {run: next(r for r in rs if r["config"]["seed"] == 42) for run, rs in seeds.items()}
    return figures, seeds, default, made


def tick_label(run: str, results: dict) -> str:
    """A run's tick on a bar chart's x axis, broken over lines as kdlab.figures breaks it."""
    return run_label(run, results).replace(" from ", "\nfrom ").replace(" + ", "\n+ ").replace(" (", "\n(")


def line(ax, label: str):
    [found] = [line for line in ax.lines if line.get_label() == label]
    return found


def bars(ax):
    return [patch for patch in ax.patches if type(patch).__name__ == "Rectangle"]


def error_bar_ends(container) -> list[tuple[float, float]]:
    """(low, high) of each bar's error bar, from the bar container's line segments."""
    segments = container.errorbar.lines[2][0].get_segments()
    return [(segment[0][1], segment[1][1]) for segment in segments]


def test_validation_curves_are_the_mean_over_seeds_in_a_min_max_band(drawn):
    figures, seeds, default, _ = drawn
    ax = figures["comparaison_finale.png"].axes[0]
    for run, rs in seeds.items():
        curves = 100 * np.array([[h["val_acc"] for h in r["history"]] for r in rs])
        label = run_label(run, default) + (f" (mean of {len(rs)} seeds, band: min-max)" if len(rs) > 1 else "")
        drawn_line = line(ax, label)
        np.testing.assert_array_equal(drawn_line.get_xdata(), [h["epoch"] for h in rs[0]["history"]])
        np.testing.assert_allclose(drawn_line.get_ydata(), curves.mean(0))
    # Each band's outline: the highest seed at each epoch, then the lowest (stored as float32).
    bands = sorted(sorted(set(np.round(c.get_paths()[0].vertices[:, 1], 3))) for c in ax.collections)
    expected = sorted(sorted(set(np.round(np.concatenate([curves.min(0), curves.max(0)]), 3))) for curves in (
        100 * np.array([[h["val_acc"] for h in r["history"]] for r in rs]) for rs in seeds.values() if len(rs) > 1))
    assert bands == expected


def test_test_accuracy_bars_are_the_seeds_mean_and_sd_beside_the_original_lab_and_the_budget_baseline(drawn):
    figures, seeds, default, made = drawn
    assert made["budget_baselines"] == ["equal-training-time"]
    ax = figures["comparison_test_accuracy.png"].axes[0]
    containers = [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    ours = {c.patches[0].get_facecolor()[:3]: c for c in containers if c.patches[0].get_hatch() is None}
    for run, rs in seeds.items():
        accs = 100 * np.array([r["test_acc"] for r in rs])
        [container] = [c for colour, c in ours.items() if np.allclose(colour, to_rgb(run_colour(run)))]
        assert container.patches[0].get_height() == pytest.approx(accs.mean())
        if len(rs) > 1:
            sd = accs.std(ddof=1)
            assert error_bar_ends(container) == [pytest.approx((accs.mean() - sd, accs.mean() + sd))]
            seeds_drawn = [l for l in ax.lines if l.get_marker() == "o" and
                           np.allclose(l.get_xdata(), container.patches[0].get_center()[0])]
            assert sorted(seeds_drawn[0].get_ydata()) == pytest.approx(sorted(accs))
    original = {round(c.patches[0].get_height(), 6) for c in containers if c.patches[0].get_hatch() == "//"}
    assert original == {round(100 * acc, 6) for acc in original_lab_accuracies().values()}
    [budget] = [c for c in containers if c.patches[0].get_hatch() == ".."]
    variant = 100 * (np.array([r["test_acc"] for r in seeds["student_scratch_baseline"]]) + BUDGET_GAIN)
    assert budget.patches[0].get_height() == pytest.approx(variant.mean())
    assert error_bar_ends(budget) == [pytest.approx((variant.mean() - variant.std(ddof=1),
                                                     variant.mean() + variant.std(ddof=1)))]
    runs_drawn = len([run for run in RUNS if run in seeds or run in original_lab_accuracies()])
    assert budget.patches[0].get_center()[0] == pytest.approx(runs_drawn)      # after every run
    assert f"{BUDGET_EPOCHS} epochs" in ax.get_xticklabels()[runs_drawn].get_text()


def test_loss_terms_and_run_curves_are_the_history(drawn):
    figures, _, default, _ = drawn
    axes = {ax.get_title(): ax for ax in figures["training_losses.png"].axes if ax.get_title()}
    for run, r in default.items():
        ax = axes[run_label(run, default)]
        for term in r["history"][0]["losses"]:
            np.testing.assert_allclose(line(ax, term).get_ydata(), [h["losses"][term] for h in r["history"]])
        if len(r["history"][0]["losses"]) > 1:
            np.testing.assert_allclose(line(ax, "total").get_ydata(), [h["train_loss"] for h in r["history"]])
        loss_ax, acc_ax = figures[f"curves_{run}.png"].axes[:2]
        for ax, label, values in ((loss_ax, "train (all terms)", [h["train_loss"] for h in r["history"]]),
                                  (loss_ax, "validation (cross-entropy)", [h["val_loss"] for h in r["history"]]),
                                  (acc_ax, "train (augmented batches)", [100 * h["train_acc"] for h in r["history"]]),
                                  (acc_ax, "validation", [100 * h["val_acc"] for h in r["history"]])):
            np.testing.assert_allclose(line(ax, label).get_ydata(), values)
        assert line(acc_ax, "test (best-on-val weights)").get_ydata()[0] == pytest.approx(100 * r["test_acc"])


def test_agreement_confusion_and_soft_targets_are_counted_from_the_predictions(drawn):
    figures, _, default, _ = drawn
    teacher = np.asarray(default["teacher_resnet50"]["test_predictions"])
    students = [run for run in default if run != "teacher_resnet50"]
    ax = figures["agreement.png"].axes[0]
    heights = {tick.get_text(): bar.get_height() for tick, bar in zip(ax.get_xticklabels(), bars(ax), strict=True)}
    assert heights == pytest.approx({tick_label(run, default): 100 * np.mean(np.asarray(
        default[run]["test_predictions"]) == teacher) for run in students})

    best = max(students, key=lambda run: default[run]["test_acc"])
    labels, predictions = (np.asarray(default[best][key]) for key in ("test_labels", "test_predictions"))
    shares = np.array([[100 * np.mean(predictions[labels == true] == pred) for pred in range(10)] for true in range(10)])
    np.testing.assert_allclose(figures["confusion_matrix.png"].axes[0].images[0].get_array(), shares)



def test_soft_targets_are_the_softmax_of_the_kept_logits_at_both_temperatures(tmp_path, recorded):
    # The reference teacher was trained before its results kept examples: two made here.
    import base64

    figures = recorded
    teacher = json.loads((REFERENCE / "teacher_resnet50_results.json").read_text())
    image = base64.b64encode(bytes(3 * 32 * 32)).decode()
    examples = [dict(test_index=i, label=label, logits=logits, image=image) for i, (label, logits) in
                enumerate([(3, [0, 0, 0, 5, 0, 3, 0, 0, 0, 0]), (9, [0, 1, 0, 0, 0, 0, 0, 0, 0, 6])])]
    temperature = 3.5
    plot_soft_targets(dict(teacher, soft_target_examples=examples), temperature, tmp_path)
    bar_axes = figures["soft_targets.png"].axes[1::2]
    for ax, example in zip(bar_axes, examples, strict=True):
        logits = np.asarray(example["logits"], dtype=float)
        for t, drawn_bars in ((1.0, bars(ax)[:10]), (temperature, bars(ax)[10:20])):
            softmax = np.exp(logits / t - (logits / t).max())
            assert [b.get_height() for b in drawn_bars] == pytest.approx(100 * softmax / softmax.sum())


def test_per_class_bars_and_gains_are_counted_per_class(drawn):
    figures, seeds, default, _ = drawn
    kd, base = "student_scratch_kd_scores", "student_scratch_baseline"
    accuracy_ax, gain_ax = figures["per_class_accuracy.png"].axes[:2]

    def per_class(run):
        return np.mean([[100 * np.mean(np.equal(r["test_predictions"], r["test_labels"])[np.equal(r["test_labels"], c)])
                         for c in range(10)] for r in seeds[run]], axis=0)
    heights = [bar.get_height() for bar in bars(accuracy_ax)]
    assert heights[:10] == pytest.approx(per_class(base)) and heights[10:20] == pytest.approx(per_class(kd))
    gains = [bar.get_height() for bar in bars(gain_ax)]
    assert gains == pytest.approx(per_class(kd) - per_class(base))    # the same images and seeds, paired
    [container] = [c for c in gain_ax.containers if type(c).__name__ == "BarContainer"]
    intervals = paired_difference_by_class(seeds[kd], seeds[base], 10)   # tests/test_stats.py checks them
    assert error_bar_ends(container) == [pytest.approx((100 * d["ci_low"], 100 * d["ci_high"])) for d in intervals]
    assert "99.5% interval each" in gain_ax.get_ylabel()


def test_efficiency_points_are_the_efficiency_table(drawn):
    figures, _, default, made = drawn
    runs = made["efficiency"]["runs"]
    for ax, (key, scale) in zip(figures["efficiency.png"].axes[:3], (("params", 1e-6), ("flops_per_image", 1e-9),
                                                                     ("latency_ms", 1))):
        points = [tuple(c.get_offsets()[0]) for c in ax.collections]
        assert points == [pytest.approx((e[key] * scale, 100 * e["test_acc"])) for e in runs.values()]
        assert {run: e["test_acc"] for run, e in runs.items()} == {run: default[run]["test_acc"] for run in runs}


@pytest.fixture
def recorded(monkeypatch) -> dict:
    """The figures kdlab.figures draws from now on, by file name, recorded instead of written."""
    import kdlab.figures

    figures = {}
    monkeypatch.setattr(kdlab.figures, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    return figures


def test_throughput_bars_are_the_benchmark_files_numbers(recorded, tmp_path):
    bench = json.loads((REPO / "benchmarks" / "results" / "h200-full.json").read_text())
    plot_throughput(bench, tmp_path / "throughput.png")
    speed_ax, share_ax = recorded["throughput.png"].axes[:2]
    rows = bench["rows"]
    assert [bar.get_height() for bar in bars(speed_ax)] == pytest.approx(
        [r["kdlab"]["images_per_s"] for r in rows] + [r["naive"]["images_per_s"] for r in rows])
    assert [bar.get_height() for bar in bars(share_ax)] == pytest.approx([100 * r["kdlab"]["peak_share"] for r in rows])
    assert [text.get_text() for text in speed_ax.texts] == [f"{r['kdlab']['images_per_s'] / r['naive']['images_per_s']:.1f}x"
                                                           for r in rows]


def test_sweep_points_are_each_settings_mean_and_sd_over_seeds(recorded, tmp_path):
    folder = REPO / "results" / "sweep-smoke-demo"
    sweep = json.loads((folder / "sweep.json").read_text())
    plot_sweep(folder, tmp_path)
    accs = {}   # (run, setting, value, the other settings) -> test accuracies over seeds, from the files
    for trial in sweep["trials"]:
        acc = json.loads((folder / trial["results"]).read_text())["test_acc"]
        for key in sweep["grid"]:
            others = tuple((k, v) for k, v in trial["settings"].items() if k != key)
            accs.setdefault((trial["run"], key, trial["settings"].get(key), others), []).append(100 * acc)
    for ax, key in zip(recorded["sweep.png"].axes, sweep["grid"], strict=True):
        containers = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert containers, f"no run reading {key} drawn"
        for container in containers:
            data_line = container.lines[0]
            [(run, others)] = {(run, others) for run, k, _, others in accs
                               if k == key and container.get_label().startswith(run_label(run, {}) + "".join(
                                   f", {o}={v}" for o, v in others) + " (mean")}
            expected = [accs[(run, key, value, others)] for value in data_line.get_xdata()]
            assert list(data_line.get_ydata()) == pytest.approx([np.mean(a) for a in expected])
            ends = container.lines[2][0].get_segments()
            assert [(s[0][1], s[1][1]) for s in ends] == [pytest.approx((np.mean(a) - np.std(a, ddof=1),
                                                                         np.mean(a) + np.std(a, ddof=1))) for a in expected]
        bands = [line for line in ax.lines if "does not read" in line.get_label()]
        for band in bands:
            [run] = [run for run in sweep["runs"] if band.get_label().startswith(run_label(run, {}))]
            assert band.get_ydata()[0] == pytest.approx(np.mean(accs[(run, key, None, ())]))
        assert bands, "the baseline reads no swept setting: a band in every panel"
