"""A method of your own (kdlab.methods.register_method): one call registers a loss from outside the
package, and its run trains through train-or-load and shows in the results table, the figures and
the report like the lab's own; bad losses are refused in one line, and nothing is saved."""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_kdlab
from kdlab import docs, figures
from kdlab.config import RUNS, make_config
from kdlab.errors import KdlabError
from kdlab.lab import Lab
from kdlab.losses import cross_entropy
from kdlab.methods import build_method, register_method, registered_runs, unregister_method
from kdlab.models import build_model
from kdlab.registry import METHODS
from kdlab.report import make_report
from kdlab.results import load_seed_results

KEY, RUN = "logit_matching", "student_scratch_logit_matching"


def logit_matching(student_logits, teacher_logits, targets, weight=1.0):
    """Ba & Caruana (2014): the student's logits regressed onto the teacher's, beside CE."""
    return {"ce": cross_entropy(student_logits, targets), "mse": weight * F.mse_loss(student_logits, teacher_logits)}


@pytest.fixture
def registered():
    yield register_method(KEY, logit_matching, settings=dict(weight=0.5), name="logit matching",
                          description="Ba & Caruana 2014: the MSE between the logits")
    unregister_method(KEY)


@pytest.fixture(scope="module")
def own_lab(smoke_lab, tmp_path_factory):
    """The registered run trained in smoke mode beside the smoke lab's teacher and scratch baseline,
    with their figures and report (no PDF); the method is unregistered afterwards."""
    folder = tmp_path_factory.mktemp("own_method")
    (folder / "ckpt").mkdir()
    for path in smoke_lab[0].glob("*"):
        if path.name.startswith(("teacher_resnet50_", "student_scratch_baseline_")):
            shutil.copy2(path, folder / "ckpt")
    run = register_method(KEY, logit_matching, settings=dict(weight=0.5), name="logit matching")
    saved = {}
    real_save = figures._save
    try:
        lab = Lab(folder / "ckpt", folder / "data", device="cpu", smoke=True, progress=False, log=lambda _: None)
        trained = {name: lab.run(name) for name in ("student_scratch_baseline", run)}
        figures._save = lambda fig, path: saved.setdefault(path.name, fig) and real_save(fig, path)
        figures.make_all_figures(folder / "ckpt", folder / "figures", device=lab.device)
        make_report(folder / "ckpt", folder / "figures", folder / "report", draft=True, pdf=False)
        yield dict(folder=folder, lab=lab, trained=trained, figures=saved,
                   table=figures.format_results_table(load_seed_results(folder / "ckpt")))
    finally:
        figures._save = real_save
        unregister_method(KEY)


def test_one_call_registers_a_method_and_its_run(registered):
    assert registered == RUN and RUN in registered_runs()
    assert METHODS[KEY].name == "logit matching" and METHODS[KEY].loss_terms == ("ce", "mse")
    cfg = make_config(RUN, smoke=True, weight=0.25)
    assert cfg.uses_teacher and cfg.arch == "resnet18" and cfg.weights == "none"
    assert cfg.settings.weight == 0.25 and len(cfg.settings.loss_code) == 12
    method = build_method(cfg, build_model("resnet18", "none"), build_model("resnet50", "none"))
    images, targets = torch.randint(0, 255, (4, 3, 16, 16)).float() / 255, torch.arange(4)
    logits, losses = method.forward_train(images, targets, 0.0)
    assert set(losses) == {"ce", "mse"} and all(term.ndim == 0 for term in losses.values())
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_unregistering_leaves_the_lab_as_it_was(registered):
    unregister_method(KEY)
    assert KEY not in METHODS and RUN not in RUNS
    assert docs.stale_blocks() == []


def test_the_registered_run_trains_and_shows_in_table_figures_and_report(own_lab):
    results = own_lab["trained"][RUN].results
    assert own_lab["trained"][RUN].trained and results["run"] == RUN
    assert set(results["history"][0]["losses"]) == {"ce", "mse"}
    assert results["config"]["weight"] == 0.5 and results["teacher"]["run"] == "teacher_resnet50"
    assert f"| {RUN} |" in own_lab["table"]
    chart = own_lab["figures"]["comparison_test_accuracy.png"]
    ticks = [tick.get_text() for tick in chart.axes[0].get_xticklabels()]
    assert any("logit matching" in tick for tick in ticks), ticks
    assert (own_lab["folder"] / "figures" / f"curves_{RUN}.png").is_file()
    report = "\n".join(p.read_text() for p in (own_lab["folder"] / "report" / "generated").glob("*.tex"))
    assert "logit matching" in report


def test_the_same_registration_after_a_restart_loads_its_checkpoint(own_lab):
    """A notebook's kernel restarted: the same cell registers the same loss, and the run loads."""
    unregister_method(KEY)
    register_method(KEY, logit_matching, settings=dict(weight=0.5), name="logit matching")
    lab = Lab(own_lab["folder"] / "ckpt", device="cpu", smoke=True, progress=False, log=lambda _: None)
    again = lab.run(RUN)
    assert not again.trained and again.results["test_acc"] == own_lab["trained"][RUN].results["test_acc"]


def test_a_changed_loss_asks_for_retrain_instead_of_loading_the_old_run(own_lab):
    def logit_matching(student_logits, teacher_logits, targets, weight=1.0):   # noqa: F811 - edited in its cell
        return {"mse": weight * F.mse_loss(student_logits, teacher_logits)}

    unregister_method(KEY)
    register_method(KEY, logit_matching, settings=dict(weight=0.5))
    lab = Lab(own_lab["folder"] / "ckpt", device="cpu", smoke=True, progress=False, log=lambda _: None)
    with pytest.raises(KdlabError, match="loss_code.*--retrain"):
        lab.run(RUN)


def non_scalar(s, t, y):
    return F.mse_loss(s, t, reduction="none")


def not_finite(s, t, y):
    return F.mse_loss(s, t) * math.inf


def needs_a_setting(s, t, y, weight):
    return weight * F.mse_loss(s, t)


def ignores_the_student(s, t, y):
    return F.mse_loss(t, t + 1)


@pytest.mark.parametrize("key, loss, settings, problem", [
    ("mine", non_scalar, {}, "has shape (8, 10), not a scalar"),
    ("mine", not_finite, {}, "not finite"),
    ("mine", needs_a_setting, {}, "needs the setting weight"),
    ("mine", needs_a_setting, dict(weight=1.0, other=2.0), "other is not a parameter"),
    ("mine", ignores_the_student, {}, "does not depend on the student's logits"),
    ("mine", lambda s, t: F.mse_loss(s, t), {}, "must take (student_logits, teacher_logits, targets)"),
    ("kd_logits", non_scalar, {}, "already has a method of that key"),
    ("baseline", logit_matching, {}, "would replace the lab's own run"),
    ("My Method", logit_matching, {}, "lower-case letters"),
])
def test_a_bad_method_is_refused_in_one_line_and_nothing_is_registered(key, loss, settings, problem):
    before = (dict(METHODS), dict(RUNS))
    with pytest.raises(KdlabError) as refused:
        register_method(key, loss, settings=settings)
    message = str(refused.value)
    assert problem in message and repr(key) in message and "\n" not in message
    assert (dict(METHODS), dict(RUNS)) == before


def test_the_cli_reads_methods_from_a_file_and_a_bad_one_exits_2_saving_nothing(tmp_path):
    good, bad = tmp_path / "mine.py", tmp_path / "bad.py"
    good.write_text("import torch.nn.functional as F\nfrom kdlab.methods import register_method\n"
                    "register_method('matching', lambda s, t, y, weight=1.0: weight * F.mse_loss(s, t))\n")
    bad.write_text("import torch.nn.functional as F\nfrom kdlab.methods import register_method\n"
                   "register_method('bad', lambda s, t, y: F.mse_loss(s, t, reduction='none'))\n")
    refused = run_kdlab("--methods", bad, "run", "student_scratch_bad", "--smoke", "--ckpt-dir", tmp_path / "ckpt",
                        check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "method 'bad'" in refused.stderr and "not a scalar" in refused.stderr
    assert not (tmp_path / "ckpt").exists()
    helped = run_kdlab("--methods", good, "run", "--help")
    assert "--weight" in helped.stdout and "--loss-code" not in helped.stdout
    unknown = run_kdlab("run", "student_scratch_matching", "--smoke", "--ckpt-dir", tmp_path / "ckpt", check=False)
    assert unknown.returncode == 2 and "unknown run student_scratch_matching" in unknown.stderr
