"""The notebook teaches: each method's code is shown from the package's source beside its formula,
and the optional sections (6b: decoupled KD and attention transfer; 6c: a method of your own) run
headless in smoke mode, switched on by their environment variables, through the results table,
the figures and the report."""
import inspect
import json
import os
import textwrap

import pytest

from conftest import REPO, generated_macros
from kdlab import losses, methods, train
from kdlab.code_view import source_markdown
from kdlab.models import StageOutput

NOTEBOOK = REPO / "notebook" / "EfficientDL_KD_Lab.ipynb"
OWN_RUN = "student_scratch_logit_matching"
# The code each section shows: every function that computes a loss the lab trains with.
SHOWN = (train.train_step, methods.Method.forward_train, losses.cross_entropy, methods.LogitKD.forward_train,
         losses.kd_logits_terms, losses.distillation_term, methods.FeatureKD, losses.hint_loss, StageOutput,
         methods.DecoupledKD.forward_train, losses.dkd_loss, losses.binary_log_probs,
         methods.AttentionTransfer.forward_train, losses.attention_transfer_loss, losses.attention_map)


def test_source_markdown_is_the_source_itself_with_its_place():
    text = source_markdown(losses.hint_loss, methods.FeatureKD)
    assert inspect.getsource(losses.hint_loss).strip() in text
    assert "`hint_loss` (kdlab/losses.py, line " in text and "`FeatureKD` (kdlab/methods.py, line " in text


@pytest.fixture(scope="module")
def executed(executed_notebook):
    """The notebook's one execution of the session, sections 6b and 6c on: (nb, folder)."""
    nb, folder, _ = executed_notebook
    return nb, folder


def outputs(nb) -> str:
    return "\n".join(out.get("text", "") + out.get("data", {}).get("text/markdown", "")
                     for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_every_loss_is_shown_as_the_packages_own_source(executed):
    nb, _ = executed
    shown = outputs(nb)
    missing = [obj.__qualname__ for obj in SHOWN if textwrap.dedent(inspect.getsource(obj)).strip() not in shown]
    assert missing == []
    for obj in SHOWN:   # rendered at run time from the package: no cell holds a copy
        assert not any(inspect.getsource(obj).strip().splitlines()[0].strip() in cell.source
                       for cell in nb.cells if cell.cell_type == "code"), obj.__qualname__


def test_sections_6b_and_6c_train_and_reach_the_table_figures_and_report(executed):
    nb, folder = executed
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    for run in ("student_scratch_dkd", "student_scratch_at", OWN_RUN):
        assert (folder / "ckpt" / f"{run}_best.pt").is_file(), run
        assert (folder / "figures" / f"curves_{run}.png").is_file(), run
    own = json.loads((folder / "ckpt" / f"{OWN_RUN}_results.json").read_text())
    assert set(own["history"][0]["losses"]) == {"ce", "mse"} and own["config"]["method"] == "logit_matching"
    assert f"| {OWN_RUN} |" in outputs(nb)   # the results table of section 7
    assert OWN_RUN in json.loads((folder / "figures" / "efficiency.json").read_text())["runs"]
    macros = generated_macros(folder / "report")
    assert "logit matching" in macros["AbstractResults"] and "logit matching" in macros["KDGainSentences"]


def test_the_labs_time_is_estimated_from_the_committed_benchmark_and_says_so():
    from kdlab.lab_time import PEAK_TFLOPS, estimate, estimate_line, time_table

    e = estimate()
    bench = json.loads((REPO / "benchmarks" / "results" / "h200-full-compile.json").read_text())
    assert e["device_name"] == bench["device_name"] and e["source"] == "benchmarks/results/h200-full-compile.json"
    assert e["share"] == min(row["kdlab"]["peak_share"] for row in bench["rows"])
    for chip, minutes in e["minutes"].items():
        assert minutes == pytest.approx(e["flops"] / (PEAK_TFLOPS[chip] * 1e12 * e["share"]) / 60)
    table = time_table(e)
    assert f"| T4 (Colab's free GPU) | about {e['minutes']['T4']:.0f} min |" in table
    assert "Estimates, not measurements" in table and e["source"] in table
    readme = (REPO / "README.md").read_text().splitlines()
    assert any("T4" in line and "min" in line for line in readme[:50]), "the T4 time on the README's first screen"
    assert f"about {e['minutes']['T4']:.0f} min on this Tesla T4" in estimate_line("Tesla T4", e)
    assert "not estimated" in estimate_line("NVIDIA L4", e)


def test_a_runs_log_gives_its_time_after_its_first_epoch(tiny_splits, tmp_path):
    from conftest import train_tiny

    lines = []
    train_tiny(tiny_splits, tmp_path, log=lines.append)
    said = [line for line in lines if "remaining epoch" in line]
    assert len(said) == 1 and "the 1 remaining epoch will take about" in said[0]
    assert lines.index(said[0]) == next(i for i, line in enumerate(lines) if " epoch 1/2" in line) + 1


def test_the_students_report_holds_no_number_of_another_machine(executed):
    _, folder = executed
    generated = {p.name: p.read_text() for p in (folder / "report" / "generated").glob("*.tex")}
    assert not any("H200" in text for text in generated.values()), [n for n, t in generated.items() if "H200" in t]
    assert generated["speed_table.tex"].strip() == ""
    assert "not measured for this report" in generated_macros(folder / "report")["SpeedSentences"]


def digests(folder):
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_figures_and_report_without_a_folder_leave_the_committed_reference_untouched(tmp_path):
    """Run from a folder of one's own, `figures` and `report` write my_figures/ and my_report/ there;
    run from the repository they would too: figures/ and report/ change only when named."""
    import subprocess
    import sys

    before = {name: digests(REPO / name) for name in ("figures", "report")}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (["figures", "--results-dir", REPO / "results" / "reference", "--efficiency-from", REPO / "figures",
                  "--device", "cpu"],
                 ["report", "--results", REPO / "results" / "reference", "--figures", REPO / "figures", "--no-pdf"]):
        done = subprocess.run([sys.executable, "-m", "kdlab", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "my_figures" / "comparison_test_accuracy.png").is_file()
    assert (tmp_path / "my_report" / "generated" / "macros.tex").is_file()
    assert {name: digests(REPO / name) for name in ("figures", "report")} == before
    from kdlab.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["figures"]).out == "my_figures"
    assert parser.parse_args(["report"]).report_dir == "my_report"


def test_without_tensorboard_a_run_trains_and_one_line_says_how_to_get_curves(tiny_splits, tmp_path, monkeypatch):
    from conftest import train_tiny
    from kdlab import live_curves

    monkeypatch.setattr(live_curves, "has_tensorboard", lambda: False)
    monkeypatch.setattr(live_curves, "_told_missing", False)
    lines = []
    train_tiny(tiny_splits, tmp_path / "a", log=lines.append, live_curves=True)
    train_tiny(tiny_splits, tmp_path / "b", log=lines.append, live_curves=True)
    told = [line for line in lines if line.startswith("live curves:")]
    assert len(told) == 1 and "pip install tensorboard" in told[0]
    assert not (tmp_path / "a" / "tensorboard").exists()


def test_each_epoch_is_written_as_tensorboard_scalars_beside_the_checkpoints(tiny_splits, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import TINY_RUN, train_tiny

    assert not (train_tiny(tiny_splits, tmp_path / "off") and (tmp_path / "off" / "tensorboard").exists()), \
        "curves only when asked for: a checkpoint folder holds the runs' files otherwise"
    history = train_tiny(tiny_splits, tmp_path, live_curves=True).results["history"]
    events = EventAccumulator(str(tmp_path / "tensorboard" / TINY_RUN))
    events.Reload()
    assert {"train_loss/ce", "train_loss/total", "accuracy/train", "accuracy/val", "accuracy/val_raw_weights",
            "val_loss", "lr"} <= set(events.Tags()["scalars"])
    for tag, key in (("accuracy/val", "val_acc"), ("lr", "lr"), ("train_loss/total", "train_loss")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [h["epoch"] for h in history]
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in history], rel=1e-6)


def test_the_notebooks_runs_write_their_live_curves_where_tensorboard_is_installed(executed):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, folder = executed
    for run in ("student_scratch_baseline", "student_scratch_kd_scores", OWN_RUN):   # those trained in the kernel
        events = EventAccumulator(str(folder / "ckpt" / "tensorboard" / run))
        events.Reload()
        history = json.loads((folder / "ckpt" / f"{run}_results.json").read_text())["history"]
        assert [s.step for s in events.Scalars("accuracy/val")] == [h["epoch"] for h in history], run
    assert {"train_loss/ce", "train_loss/mse"} <= set(events.Tags()["scalars"])
