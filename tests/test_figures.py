"""kdlab.figures's counting functions, on inputs small enough to check by hand.

The figures themselves are drawn from real smoke runs in test_notebook.py.
"""
import json

import numpy as np
import pytest
from torchvision import models

from conftest import REPO

from kdlab.cli import main
from kdlab.errors import KdlabError
from kdlab.config import RUNS, run_label
from kdlab.figures import confusion_counts, make_all_figures, original_lab_accuracies, run_colour, teacher_agreement
from kdlab.measure import flops_per_image
from kdlab.results import best_student
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
