"""The report generator: its tables equal the results files, smoke results are refused unless
--draft, a draft says so, the expected runs follow the results and the missing ones are named,
bad input is one line, and the PDF builds where LaTeX is installed.

Results files are made by kdlab.checkpoints._results itself (the schema a run writes) on a
tiny synthetic split, then given the accuracies and timings each test needs.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import generated_macros
from kdlab import report
from kdlab.latex import probability_text, tex
from kdlab.results import STEP_DESCRIPTIONS, load_benchmark
from kdlab.stats import paired_difference
from kdlab.checkpoints import TrainedRun, _results
from kdlab.cli import main
from kdlab.config import LAB_RUNS, RUNS, START_OF_WEIGHTS, STARTS, TEACHER_RUN, SpeedLevers, expected_runs, make_config
from kdlab.data import make_splits, make_synthetic_cifar
from kdlab.errors import KdlabError
from kdlab.methods import build_method
from kdlab.models import build_model

REPORT_TEX = Path(__file__).resolve().parents[1] / "report" / "KD_LAB.tex"
CPU = torch.device("cpu")
# (test accuracy, best val accuracy, best epoch, seconds per epoch) of each reference run.
NUMBERS = {
    TEACHER_RUN:                   (0.9312, 0.9358, 3, 41.0),
    "student_scratch_baseline":    (0.9050, 0.9102, 2, 20.0),
    "student_scratch_kd_scores":   (0.9171, 0.9214, 3, 26.0),
    "student_scratch_kd_features": (0.8987, 0.9040, 3, 29.5),
    "student_scratch_dkd":         (0.9120, 0.9170, 3, 27.0),
    "student_scratch_at":          (0.9080, 0.9130, 2, 30.5),
}
EPOCHS = 3


def results_of(run, splits, teacher=None, smoke=False):
    """A results dict exactly as a run writes it, with NUMBERS' accuracies and timings."""
    test_acc, best_val, best_epoch, seconds = NUMBERS[run]
    cfg = make_config(run, smoke=True, weights="none", epochs=EPOCHS)
    arch = "resnet50" if run == TEACHER_RUN else "resnet18"
    method = build_method(cfg, build_model(arch, "none"), teacher.model if teacher else None)
    history = [dict(epoch=e, train_loss=1.0, losses={"ce": 1.0}, train_acc=0.5, val_loss=1.0,
                    val_acc=best_val if e == best_epoch else best_val - 0.01 * e, lr=cfg.lr,
                    seconds=seconds) for e in range(1, EPOCHS + 1)]
    best_modules = {name: m.state_dict() for name, m in method.trained_modules().items()}
    r = _results(cfg, method, splits, CPU, "fp32", SpeedLevers(), history, best_modules, teacher)
    r.update(test_acc=test_acc)
    if not smoke:
        r.update(smoke=False, device="cuda", device_name="Test GPU", data="CIFAR-10 test copy")
        r["config"]["smoke"] = False
    return r


@pytest.fixture(scope="module")
def reference():
    """The reference runs, as real results would look."""
    data = make_synthetic_cifar(train_per_class=10, test_per_class=5)
    splits = make_splits(data, val_per_class=2, split_seed=42, limit_train=0, device=CPU)
    teacher_results = results_of(TEACHER_RUN, splits)
    teacher = TrainedRun(build_model("resnet50", "none").eval(), teacher_results, trained=True)
    out = {TEACHER_RUN: teacher_results}
    for run in list(NUMBERS)[1:]:
        out[run] = results_of(run, splits, teacher)
    return out, splits


def write_results(folder: Path, results: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for run, r in results.items():
        (folder / f"{run}_results.json").write_text(json.dumps(r))
    return folder


def report_dir(tmp_path: Path) -> Path:
    """A report folder that does not exist yet: make_report makes it and copies the template in."""
    return tmp_path / "report"


def efficiency(runs) -> dict:
    runs = {run: dict(params=11e6 + i, flops_per_image=(2.5 + i) * 1e9, checkpoint_mb=44.0,
                      latency_ms=1.25 + i, throughput_img_s=900.0 - i, test_acc=0.9)
            for i, run in enumerate(runs)}
    return dict(device="Test GPU", image_size=128, measured="2026-11-28T00:00:00+00:00", runs=runs)


def number(cell: str) -> float:
    """A table cell's number: '0.2', or '$5\\times10^{-5}$' as kdlab.latex.num writes small ones."""
    sci = re.fullmatch(r"\$([\d.]+)\\times10\^\{(-?\d+)\}\$", cell)
    return float(sci[1]) * 10 ** int(sci[2]) if sci else float(cell)


def table_rows(path: Path) -> dict[str, list[str]]:
    """The body rows of a generated table: run -> its cells after the run's name."""
    body = path.read_text().split(r"\midrule")[1].split(r"\bottomrule")[0]
    rows = {}
    for line in body.strip().splitlines():
        cells = [c.strip() for c in line.removesuffix(r"\\").split("&")]
        run = re.search(r"\\texttt\{(.+?)\}", cells[0].replace(r"\allowbreak{}", "")).group(1)
        rows[run.replace(r"\_", "_")] = cells[1:]
    return rows


def test_tables_equal_the_results_files(tmp_path, reference):
    results, _ = reference
    results_dir = write_results(tmp_path / "results", results)
    figures = tmp_path / "figures"
    figures.mkdir()
    eff = efficiency(results)
    (figures / "efficiency.json").write_text(json.dumps(eff))
    out = report_dir(tmp_path)
    report.make_report(results_dir, figures, out, pdf=False, log=lambda *_: None)

    rows = table_rows(out / "generated" / "results_table.tex")
    assert set(rows) == set(results)
    for run, r in results.items():
        epochs, val, test, params, gflops, latency, train_min = rows[run]
        val_acc, best_epoch = re.fullmatch(r"([\d.]+) \((\d+)\)", val).groups()
        m = eff["runs"][run]
        assert int(epochs) == r["epochs"] and int(best_epoch) == r["best_epoch"]
        assert float(val_acc) == pytest.approx(100 * r["best_val_acc"], abs=0.005)
        assert float(test) == pytest.approx(100 * r["test_acc"], abs=0.005)
        assert float(params) == pytest.approx(r["parameters"] / 1e6, abs=0.005)
        assert float(gflops) == pytest.approx(m["flops_per_image"] / 1e9, abs=0.005)
        assert float(latency) == pytest.approx(m["latency_ms"], abs=0.005)
        assert float(train_min) == pytest.approx(r["wall_seconds"] / 60, abs=0.05)

    config_rows = table_rows(out / "generated" / "config_table.tex")
    assert set(config_rows) == set(results)
    for run, r in results.items():
        arch, method, start, epochs, lr, wd, distillation = config_rows[run]
        cfg = r["config"]
        assert (arch, start, int(epochs)) == (cfg["arch"], STARTS[START_OF_WEIGHTS[cfg["weights"]]], cfg["epochs"])
        assert number(lr) == pytest.approx(cfg["lr"]) and number(wd) == pytest.approx(cfg["weight_decay"])
        if cfg["method"] == "kd_logits":
            t, alpha = re.fullmatch(r"\$T\$ (\S+), \$\\alpha\$ (\S+)", distillation).groups()
            assert (number(t), number(alpha)) == (cfg["temperature"], cfg["alpha"])
        if cfg["method"] == "kd_features":
            layer, weight = re.fullmatch(r"hint \\texttt\{(\w+)\}, \$\\lambda_\{\\mathrm\{hint\}\}\$ (\S+)",
                                         distillation).groups()
            assert (layer, number(weight)) == (cfg["hint_layer"], cfg["hint_weight"])
        if cfg["method"] == "dkd":
            assert distillation == (rf"$T$ {cfg['temperature']:g}, $\alpha$ {cfg['alpha']:g}, $\beta$ {cfg['beta']:g}, "
                                    rf"CE weight {cfg['ce_weight']:g}, warm-up {cfg['dkd_warmup_epochs']:g}")


def test_comparisons_follow_the_numbers(tmp_path, reference):
    results, _ = reference
    out = report_dir(tmp_path)
    report.make_report(write_results(tmp_path / "results", results), tmp_path / "figures", out,
                       pdf=False, log=lambda *_: None)
    m = generated_macros(out)
    # NUMBERS: logit KD 91.71 vs baseline 90.50; feature KD 89.87; teacher 93.12.
    assert "91.71\\% test accuracy against 90.50\\% for the cross-entropy student" in m["KDGainSentences"]
    # The paired difference is counted on the saved test predictions, image by image.
    for better, other, macro in (("student_scratch_kd_scores", "student_scratch_baseline", "KDGainSentences"),
                                 ("student_scratch_kd_features", "student_scratch_baseline", "KDGainSentences"),
                                 ("student_scratch_kd_scores", "student_scratch_kd_features",
                                  "LogitsVsFeaturesSentences"),
                                 ("student_scratch_kd_scores", TEACHER_RUN, "StudentVsTeacherSentences")):
        d = paired_difference([results[better]], [results[other]])
        assert (f"a paired difference of {100 * d['mean_difference']:+.2f} points (1 seed paired), whose 95\\% "
                f"interval [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]") in m[macro]
    assert "The best student, ResNet18 from scratch + logit KD at 91.71\\%, against its teacher at 93.12\\%" \
        in m["StudentVsTeacherSentences"]
    assert "1.30 times as long" in m["KDCostSentences"]   # 26.0 s against 20.0 s per epoch
    assert "Every expected run has its results file" in m["MissingRunsSentence"]
    assert m["NTest"] == f"{results[TEACHER_RUN]['n_test']:,}"


def test_smoke_results_are_refused_without_draft(tmp_path, reference):
    _, splits = reference
    results_dir = write_results(tmp_path / "results",
                                {"student_scratch_baseline": results_of("student_scratch_baseline", splits, smoke=True)})
    out = report_dir(tmp_path)
    args = ["report", "--results", str(results_dir), "--figures", str(tmp_path / "figures"),
            "--report-dir", str(out), "--no-pdf"]
    assert main(args) == 2
    assert not (out / "generated").exists()

    assert main(args + ["--draft"]) == 0
    macros_file = (out / "generated" / "macros.tex").read_text()
    assert generated_macros(out)["DraftText"] == "DRAFT - smoke run, not results"
    assert r"\Drafttrue" in macros_file and r"\usepackage{draftwatermark}" in macros_file
    assert "DRAFT - smoke run, not results" in (out / "generated" / "provenance.tex").read_text()


def test_missing_runs_are_named_and_only_expected_runs_are_missing(tmp_path, reference):
    results, _ = reference
    present = {run: results[run] for run in ("student_scratch_baseline", "student_scratch_dkd")}
    out = report_dir(tmp_path)
    rep = report.make_report(write_results(tmp_path / "results", present), tmp_path / "figures", out,
                             pdf=False, log=lambda *_: None)
    # a lab without ImageNet starts: the teacher and the scratch students of `run all` are expected;
    # decoupled KD, outside `run all`, is reported because it has results
    assert rep.expected == [TEACHER_RUN, "student_scratch_baseline", "student_scratch_kd_scores"]
    missing = [TEACHER_RUN, "student_scratch_kd_scores"]
    assert rep.missing == missing
    macros = generated_macros(out)
    sentence = macros["MissingRunsSentence"]
    for run in missing:
        assert tex(RUNS[run].label) in sentence, "prose names runs by their labels"
    rows = table_rows(out / "generated" / "results_table.tex")
    assert [run for run, cells in rows.items() if "missing" in cells[0]] == missing
    assert set(rows) == set(present) | set(missing), "optional runs without results are left out"
    assert macros["ReportStatus"] == "2 of 3 runs missing"
    assert "cannot be measured yet" in macros["KDGainSentences"]
    for optional in ("student_scratch_kd_features", "student_scratch_at"):
        assert tex(RUNS[optional].label) not in (out / "generated" / "macros.tex").read_text()


def test_the_expected_runs_follow_the_results():
    scratch = [TEACHER_RUN, "student_scratch_baseline", "student_scratch_kd_scores"]
    assert expected_runs([TEACHER_RUN, "student_scratch_kd_features", "student_scratch_dkd"]) == scratch
    assert expected_runs(["teacher_resnet50"]) == scratch, "the teacher alone says nothing of the students"
    assert expected_runs(["student_scratch_baseline", "student_pretrained_baseline"]) == LAB_RUNS


def test_reproduce_block_and_provenance_read_as_typed_not_as_logged(tmp_path, reference):
    results, _ = reference
    results_dir = write_results(tmp_path / "results", results)
    command = ("/usr/bin/python3 -m kdlab run teacher_resnet50 --weights none --data-dir data "
               "--ckpt-dir /dev/shm/kdlab-ckpt --results-dir /root/out/reference --epochs 20")
    manifest = dict(command=command, trial=False, budget_seconds=555.0, wall_seconds=384.807870265)
    (results_dir / "manifest.json").write_text(json.dumps(manifest))
    out = report_dir(tmp_path)
    report.make_report(results_dir, tmp_path / "figures", out, pdf=False, log=lambda *_: None)

    block = (out / "generated" / "reproduce.tex").read_text()
    commands = " ".join(line.strip(" \\") for line in block.splitlines()[1:-1]).split("# ")[1:]
    assert [c.split(maxsplit=1)[1] if c.startswith("python") else c for c in commands] == [
        f"the runs, as their manifest.json records the command python -m kdlab run teacher_resnet50 "
        f"--weights none --data-dir data --ckpt-dir CKPT_DIR --results-dir {results_dir} --epochs 20 ",
        f"the figures, from the results files python -m kdlab figures --results-dir {results_dir} "
        f"--out {tmp_path / 'figures'} ",
        f"this report python -m kdlab report --results {results_dir} --figures {tmp_path / 'figures'} "
        f"--report-dir {out}"]
    provenance = (out / "generated" / "provenance.tex").read_text()
    assert "budget" not in provenance and "384.8" not in provenance and "6.4 min" in provenance
    assert "ResNet50 teacher (from scratch)" in provenance and "teacher\\_" not in provenance


@pytest.mark.parametrize("problem, message", [
    ("no results", "holds no <run>_results.json, so there is nothing to report"),
    ("results folder is a file", "is not a folder"),
    ("report folder cannot be written", "cannot write to"),
    ("no template", "the report's template"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, reference, monkeypatch, capsys, problem, message):
    results, _ = reference
    results_dir = write_results(tmp_path / "results", {TEACHER_RUN: results[TEACHER_RUN]})
    out = report_dir(tmp_path)
    if problem == "no results":
        results_dir = tmp_path / "empty"
        results_dir.mkdir()
    elif problem == "results folder is a file":
        results_dir = results_dir / f"{TEACHER_RUN}_results.json"
    elif problem == "report folder cannot be written":
        out = results_dir / f"{TEACHER_RUN}_results.json" / "report"   # under a file
    else:
        monkeypatch.setattr(report, "TEMPLATE", tmp_path / "gone" / "KD_LAB.tex")
    code = main(["report", "--results", str(results_dir), "--figures", str(tmp_path / "figures"),
                 "--report-dir", str(out), "--no-pdf"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdlab: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "report").exists(), "nothing written"


def test_report_source_uses_every_macro_and_types_no_result(tmp_path, reference):
    results, _ = reference
    source = REPORT_TEX.read_text()
    rep = report.collect(write_results(tmp_path / "results", results), tmp_path / "figures", tmp_path / "report")
    for name in report.macros(rep):
        assert re.search(rf"\\{name}(?![A-Za-z])", source), f"\\{name} is generated but not used"
        assert not re.search(rf"\\{name} +\w", source), f"TeX eats the space after \\{name}: write \\{name}{{}}"
    for name in report.EXPECTED_FIGURES:
        assert name in source
    body = source.split(r"\begin{document}")[1].split(r"\begin{thebibliography}")[0]
    prose = re.sub(r"(?m)(?<!\\)%.*$", "", body)
    assert not re.findall(r"\d+\.\d+|\d\s*\\%", prose), "a result typed by hand in KD_LAB.tex"


BENCHMARK = REPORT_TEX.parents[1] / "benchmarks" / "results" / "h200-full-compile.json"


def teacher_only(tmp_path: Path, reference) -> Path:
    """A results folder with the teacher's results alone: enough for a report."""
    return write_results(tmp_path / "results", {TEACHER_RUN: reference[0][TEACHER_RUN]})


def test_speed_table_equals_the_benchmark_file(tmp_path, reference):
    out = report_dir(tmp_path)
    report.make_report(teacher_only(tmp_path, reference), tmp_path / "figures", out, pdf=False, benchmark=BENCHMARK,
                       log=lambda *_: None)
    bench = load_benchmark(BENCHMARK)   # step kinds under the methods' names
    body = (out / "generated" / "speed_table.tex").read_text().split(r"\midrule")[1].split(r"\bottomrule")[0]
    rows = [[c.strip() for c in line.removesuffix(r"\\").split("&")] for line in body.strip().splitlines()]
    assert [row[0] for row in rows] == [STEP_DESCRIPTIONS[r["step"]] for r in bench["rows"]]
    for cells, r in zip(rows, bench["rows"]):
        kdlab, naive, speedup, tflops, share = (float(c.replace(",", "")) for c in cells[1:])
        assert kdlab == pytest.approx(r["kdlab"]["images_per_s"], abs=0.5)
        assert naive == pytest.approx(r["naive"]["images_per_s"], abs=0.5)
        assert speedup == pytest.approx(r["speedup"], abs=0.05)
        assert tflops == pytest.approx(r["kdlab"]["tflops"], rel=0.005)
        assert share == pytest.approx(100 * r["kdlab"]["peak_share"], abs=0.05)
    sentences = generated_macros(out)["SpeedSentences"]
    train = [r["speedup"] for r in bench["rows"] if r["step"] != "evaluation"]
    assert f"from {min(train):.1f} times" in sentences and f"to {max(train):.1f} times" in sentences
    shares = [100 * r["kdlab"]["peak_share"] for r in bench["rows"]]
    assert f"{min(shares):.1f}\\% to {max(shares):.1f}\\%" in sentences


def test_without_a_benchmark_file_the_speed_is_said_unmeasured(tmp_path, reference):
    out = report_dir(tmp_path)
    results_dir = teacher_only(tmp_path, reference)
    report.make_report(results_dir, tmp_path / "figures", out, pdf=False,
                       benchmark=tmp_path / "none.json", log=lambda *_: None)
    assert generated_macros(out)["SpeedSentences"].startswith("Training speed: not measured")
    assert (out / "generated" / "speed_table.tex").read_text() == ""
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"step": "student_ce"}]}))
    with pytest.raises(KdlabError, match="does not have a benchmark file's layout"):
        report.make_report(results_dir, tmp_path / "figures", out, pdf=False,
                           benchmark=tmp_path / "bad.json", log=lambda *_: None)


def test_missing_latexmk_is_a_note_unless_the_pdf_is_required(tmp_path, monkeypatch, reference):
    monkeypatch.setattr(report.shutil, "which", lambda name: None)
    notes = []
    out = report_dir(tmp_path)
    results_dir = teacher_only(tmp_path, reference)
    report.make_report(results_dir, tmp_path / "figures", out, log=notes.append)
    assert any("PDF was not built" in note and report.TEX_INSTALL in note for note in notes)
    assert (out / "generated" / "macros.tex").is_file(), "the .tex is written all the same"
    with pytest.raises(KdlabError, match="latexmk is not installed"):
        report.make_report(results_dir, tmp_path / "figures", out, pdf_required=True,
                           log=lambda *_: None)


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk (TeX Live) is not installed")
def test_draft_pdf_builds_and_says_draft_on_every_page(tmp_path, reference):
    _, splits = reference
    results_dir = write_results(tmp_path / "results",
                                {"student_scratch_baseline": results_of("student_scratch_baseline", splits, smoke=True)})
    out = report_dir(tmp_path)
    report.make_report(results_dir, tmp_path / "figures", out, draft=True, log=lambda *_: None)
    pdf = out / "KD_LAB.pdf"
    assert pdf.stat().st_size > 0
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed: the PDF built, its pages are not read")
    pages = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True,
                           text=True, check=True, timeout=120).stdout.split("\f")
    pages = [page for page in pages if page.strip()]
    assert len(pages) >= 4
    assert all("DRAFT - smoke run, not results" in page for page in pages)


def with_outcomes(results: dict, outcome: str, epochs: int, seconds: float) -> dict:
    """`results` with every test image right ("all"), the first half right ("half") or none ("none"),
    and its epochs and training seconds."""
    labels = results["test_labels"]
    right = {"all": len(labels), "half": len(labels) // 2, "none": 0}[outcome]
    predictions = [y if i < right else (y + 1) % 10 for i, y in enumerate(labels)]
    return dict(results, epochs=epochs, config=dict(results["config"], epochs=epochs), wall_seconds=seconds,
                test_predictions=predictions, test_acc=right / len(labels))


NOT_TRAINED = "at equal training time and at equal total epochs, the teacher's included."
TEACHER_SECONDS, KD_SECONDS, BASELINE_SECONDS = (EPOCHS * NUMBERS[run][3] for run in (
    TEACHER_RUN, "student_scratch_kd_scores", "student_scratch_baseline"))


# The baseline at equal epochs gets half the test images right; logit KD all, half or none. The
# teacher trained 123 s, logit KD 78 s: a baseline tests the teacher's compute from 201 s.
@pytest.mark.parametrize("kd_outcome, variants, verdict", [
    ("all", {}, "Logit KD from scratch beats its baseline at equal epochs. Whether that gain is what the teacher "
                f"knows or the compute it adds is still open: the baseline has not been trained yet {NOT_TRAINED}"),
    ("half", {}, "Logit KD from scratch is level with its baseline within the noise at equal epochs. The baseline "
                 f"has not been trained yet {NOT_TRAINED}"),
    ("none", {}, f"Logit KD from scratch loses to its baseline at equal epochs. The baseline has not been trained "
                 f"yet {NOT_TRAINED}"),
    ("all", {"equal-training-time": (34, "half", 88.0), "teacher-plus-student-epochs": (60, "half", 150.0)},
     "Logit KD from scratch beats its baseline at equal epochs, at equal training time and at equal total "
     "epochs, the teacher's included. The gain holds at every budget compared, but none gave the baseline the "
     "teacher's training time too: the longest, at equal total epochs, the teacher's included, trained 150~s, "
     "against the teacher's 123~s and the distilled student's 78~s. Whether the gain survives the teacher's "
     "compute is not measured."),
    ("all", {"equal-training-time": (34, "half", 88.0), "teacher-plus-student-epochs": (60, "half", 240.0)},
     "Logit KD from scratch beats its baseline at equal epochs, at equal training time and at equal total "
     "epochs, the teacher's included. The gain survives the teacher's compute: at equal total epochs, the "
     "teacher's included, the baseline trained 240~s, no less than the teacher's 123~s and the distilled "
     "student's 78~s together."),
    ("all", {"equal-training-time": (34, "all", 88.0), "teacher-plus-student-epochs": (60, "half", 150.0)},
     "Logit KD from scratch beats its baseline at equal epochs and at equal total epochs, the teacher's "
     "included; it is level with it within the noise at equal training time."),
    ("all", {"equal-training-time": (34, "all", 88.0), "teacher-plus-student-epochs": (60, "all", 150.0)},
     "Logit KD from scratch beats its baseline at equal epochs; it is level with it within the noise at equal "
     "training time and at equal total epochs, the teacher's included. The gain at equal epochs does not hold "
     "at equal training time and at equal total epochs, the teacher's included: it goes with the compute."),
    ("half", {"equal-training-time": (34, "half", 88.0), "teacher-plus-student-epochs": (60, "all", 150.0)},
     "Logit KD from scratch is level with its baseline within the noise at equal epochs and at equal training "
     "time; it loses to it at equal total epochs, the teacher's included."),
], ids=["pending", "pending, level", "pending, loss", "every budget, not the teacher's compute",
        "the teacher's compute", "mixed", "the compute", "level, then a loss"])
def test_the_budget_comparisons_and_the_conclusion_follow_the_numbers(tmp_path, reference, kd_outcome, variants,
                                                                      verdict):
    results, _ = reference
    assert (results[TEACHER_RUN]["wall_seconds"], results["student_scratch_kd_scores"]["wall_seconds"]) == (
        TEACHER_SECONDS, KD_SECONDS) == (123.0, 78.0)
    base = with_outcomes(results["student_scratch_baseline"], "half", EPOCHS, BASELINE_SECONDS)
    kd = with_outcomes(results["student_scratch_kd_scores"], kd_outcome, EPOCHS, KD_SECONDS)
    results = dict(results, student_scratch_kd_scores=kd, student_scratch_baseline=base)
    budget = tmp_path / "ablation-budget"
    for variant, (epochs, outcome, seconds) in variants.items():
        write_results(budget / variant, {"student_scratch_baseline": with_outcomes(base, outcome, epochs, seconds)})
    out = report_dir(tmp_path)
    report.make_report(write_results(tmp_path / "results", results), tmp_path / "figures", out, pdf=False,
                       budget_dir=budget, log=lambda *_: None)
    macros = generated_macros(out)
    assert macros["DistillationVerdict"] == verdict
    d = paired_difference([kd], [base])
    assert (f"at equal epochs (the baseline trained {EPOCHS} epochs), a paired difference of "
            f"{100 * d['mean_difference']:+.2f} points") in macros["BudgetSentences"]
    for variant, (epochs, outcome, seconds) in variants.items():
        d = paired_difference([kd], [with_outcomes(base, outcome, epochs, seconds)])
        assert f"(the baseline trained {epochs} epochs), a paired difference of {100 * d['mean_difference']:+.2f}" \
            in macros["BudgetSentences"]
    assert ("pending" in macros["BudgetSentences"]) == (not variants)
    assert (f"--budget-baselines {budget}" in
            " ".join((out / "generated" / "reproduce.tex").read_text().replace("\\\n", " ").split()))


def test_pending_budget_sentence_without_a_folder_names_the_option(tmp_path, reference):
    # A non-raw "\texttt" is a TAB and "exttt": what every notebook report printed here.
    results, _ = reference
    rep = report.collect(write_results(tmp_path / "results", results), tmp_path / "figures", report_dir(tmp_path))
    sentences = report.budget_sentences(rep)
    assert r"(no folder given (\texttt{-{}-budget-baselines}); the GPU plan trains them)" in sentences
    assert "\t" not in sentences and "exttt" not in sentences.replace(r"\texttt", "")


# ----------------------------------------------------------------------------- every macro, by value

# The classes each run gets right (every test image of them; the others wrong, predicted as the next
# class): accuracies 90, 60, 70, 50, 60 and 50%. Logit KD against its baseline loses every image of
# airplane and gains every image of frog and horse, so those three classes' intervals are a single
# point; decoupled KD predicts as the baseline does, a difference of exactly zero.
RIGHT_CLASSES = {
    TEACHER_RUN: range(9),
    "student_scratch_baseline": range(6),
    "student_scratch_kd_scores": range(1, 8),
    "student_scratch_kd_features": range(5),
    "student_scratch_dkd": range(6),
    "student_scratch_at": (0, 1, 2, 3, 6),
}
# The recipe the runs record, none of it kdlab.config's defaults: the report must read it from them.
SHARED_RECIPE = dict(batch_size=96, momentum=0.85, warmup_epochs=0.75, split_seed=7, ema_decay=0.995,
                     val_per_class=20, image_size=128, flip_tta=False)
TEACHER_RECIPE = dict(lr=0.123, weight_decay=2e-4, label_smoothing=0.0)
STUDENT_RECIPE = dict(lr=0.456, weight_decay=5e-4, label_smoothing=0.05)
LOGIT_RECIPE = dict(temperature=3.5, alpha=0.7)
FEATURE_RECIPE = dict(hint_layer="layer2", hint_weight=2.5)
# (raw weights one view, raw flip, average one view, average flip) for each run.
EVALUATIONS = {run: (0.50 + 0.01 * i, 0.51 + 0.01 * i, 0.52 + 0.02 * i, 0.50 + 0.03 * i)
               for i, run in enumerate(NUMBERS)}
# Two of the teacher's soft-target examples: a cat with a dog runner-up, a truck with an automobile one.
SOFT_LOGITS = {3: [0, 0, 0, 5, 0, 3, 0, 0, 0, 0], 9: [0, 1, 0, 0, 0, 0, 0, 0, 0, 6]}


@pytest.fixture
def known(tmp_path, reference):
    """Results files with known predictions, evaluations, soft targets and recipes, their figures
    folder (two of the figures in it, and efficiency.json) and the report's macros."""
    results, _ = reference
    labels = np.asarray(results[TEACHER_RUN]["test_labels"])
    known = {}
    for i, (run, classes) in enumerate(RIGHT_CLASSES.items()):
        right = np.isin(labels, list(classes))
        recipe = dict(SHARED_RECIPE, **(TEACHER_RECIPE if run == TEACHER_RUN else STUDENT_RECIPE),
                      **(LOGIT_RECIPE if RUNS[run].method == "kd_logits" else {}),
                      **(FEATURE_RECIPE if RUNS[run].method == "kd_features" else {}))
        known[run] = dict(results[run], test_predictions=np.where(right, labels, (labels + 1) % 10).tolist(),
                          test_acc=float(right.mean()), config=dict(results[run]["config"], **recipe),
                          test_acc_by_evaluation=dict(zip(("raw_single", "raw_flip", "average_single", "average_flip"),
                                                          EVALUATIONS[run])),
                          torch_version="2.9.9+test", finished=f"2026-11-{10 + i}T12:00:00+00:00")
    image = results[TEACHER_RUN]["soft_target_examples"][0]["image"]
    known[TEACHER_RUN]["soft_target_examples"] = [dict(test_index=i, label=label, logits=logits, image=image)
                                                  for i, (label, logits) in enumerate(SOFT_LOGITS.items())]
    figures = tmp_path / "figures"
    figures.mkdir()
    for name in report.EXPECTED_FIGURES[:2]:
        (figures / name).write_bytes(b"")
    (figures / "efficiency.json").write_text(json.dumps(efficiency(known)))
    out = report_dir(tmp_path)
    results_dir = write_results(tmp_path / "results", known)
    report.make_report(results_dir, figures, out, pdf=False, log=lambda *_: None)
    return dict(results=known, labels=labels, figures=figures, results_dir=results_dir,
                efficiency=efficiency(known), macros=generated_macros(out))


def right_of(r: dict) -> np.ndarray:
    return np.equal(r["test_predictions"], r["test_labels"])


def interval_text(kd: dict, base: dict) -> str:
    """The prose of a paired difference: its mean counted here, its interval kdlab.stats's bootstrap
    (tests/test_stats.py checks it against hand-computed ones)."""
    mean = 100 * (right_of(kd).mean() - right_of(base).mean())
    d = paired_difference([kd], [base])
    verdict = ("excludes zero: the difference is beyond what the seeds and the test sample explain"
               if d["ci_low"] > 0 or d["ci_high"] < 0 else "includes zero: no evidence of a difference either way")
    return (f"a paired difference of {mean:+.2f} points (1 seed paired), whose 95\\% interval "
            f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}] (bootstrap over seeds and test images) {verdict}")


def name(run: str, results: dict) -> str:
    return report.run_name(run, results)


def test_the_recipe_the_report_states_is_the_one_the_runs_recorded(known):
    m, results = known["macros"], known["results"]
    for macro, key in (("BatchSize", "batch_size"), ("Momentum", "momentum"), ("WarmupEpochs", "warmup_epochs"),
                       ("SplitSeed", "split_seed"), ("EmaDecay", "ema_decay"), ("ValPerClass", "val_per_class")):
        assert number(m[macro]) == SHARED_RECIPE[key], macro
    for macro, recipe, key in (("TeacherPeakLR", TEACHER_RECIPE, "lr"), ("TeacherWeightDecay", TEACHER_RECIPE, "weight_decay"),
                               ("TeacherLabelSmoothing", TEACHER_RECIPE, "label_smoothing"),
                               ("StudentPeakLR", STUDENT_RECIPE, "lr"), ("StudentWeightDecay", STUDENT_RECIPE, "weight_decay"),
                               ("StudentLabelSmoothing", STUDENT_RECIPE, "label_smoothing"),
                               ("Temperature", LOGIT_RECIPE, "temperature"), ("Alpha", LOGIT_RECIPE, "alpha"),
                               ("HintWeight", FEATURE_RECIPE, "hint_weight")):
        assert number(m[macro]) == recipe[key], macro
    assert m["HintLayer"] == r"\texttt{layer2}"
    assert int(m["TeacherEpochs"]) == results[TEACHER_RUN]["config"]["epochs"] == EPOCHS
    assert int(m["StudentEpochs"]) == EPOCHS
    assert m["TeacherStart"] == "random weights" and results[TEACHER_RUN]["config"]["weights"] == "none"
    assert (number(m["FinetuneEpochs"]), number(m["FinetunePeakLR"]), number(m["FinetuneWeightDecay"])) == (
        report.FINETUNE_RECIPE.epochs, report.FINETUNE_RECIPE.lr, report.FINETUNE_RECIPE.weight_decay)
    assert m["EvaluationViews"] == "the image alone"                 # flip_tta False in every run
    assert m["TrainingSeeds"] == "42"
    r = results[TEACHER_RUN]
    assert (m["NTrain"], m["NVal"], m["NTest"]) == (f"{r['n_train']:,}", f"{r['n_val']:,}", f"{r['n_test']:,}")
    assert m["RegressorParams"] == f"{results['student_scratch_kd_features']['extra_training_parameters']:,} parameters"
    # 128 px: the ImageNet stem's /4, then /2 a stage: 32, 16, 8, 4, a CIFAR ResNet's maps at 32 px.
    assert m["ImageSize"] == "128~px"
    assert m["StageSentence"].startswith("At 128~px the four stages see maps of 32, 16, 8 and 4~px, the sizes")
    assert m["ResolutionCost"] == "16 times the pixels of a native 32~px input"
    assert (m["TrainingDevice"], m["TorchVersion"], m["DataSource"]) == ("Test GPU", "2.9.9+test", "CIFAR-10 test copy")
    assert m["ReportDate"] == "2026-11-15"                           # the last run to finish
    assert m["DraftText"] == ""


def test_every_number_in_the_reports_sentences_is_computed_here(known):
    m, results, labels = known["macros"], known["results"], known["labels"]
    base, kd = results["student_scratch_baseline"], results["student_scratch_kd_scores"]
    accs = {run: f"{100 * right_of(r).mean():.2f}\\%" for run, r in results.items()}
    assert accs == {TEACHER_RUN: "90.00\\%", "student_scratch_baseline": "60.00\\%",
                    "student_scratch_kd_scores": "70.00\\%", "student_scratch_kd_features": "50.00\\%",
                    "student_scratch_dkd": "60.00\\%", "student_scratch_at": "50.00\\%"}
    assert m["AbstractResults"] == ("Test accuracies: " + ", ".join(
        f"{name(run, results)} {accs[run]}" for run in list(results)[:-1]) + f" and {name('student_scratch_at', results)} "
        f"{accs['student_scratch_at']}. The best student is {name('student_scratch_kd_scores', results)}.")

    gains = m["KDGainSentences"]
    for run in ("student_scratch_kd_scores", "student_scratch_kd_features", "student_scratch_dkd", "student_scratch_at"):
        assert (f"({name(run, results)}) reached {accs[run]} test accuracy against {accs['student_scratch_baseline']} for "
                f"the cross-entropy student: {interval_text(results[run], base)}") in gains
    # Decoupled KD predicts as the baseline: every bootstrap replicate is zero.
    assert "a paired difference of +0.00 points (1 seed paired), whose 95\\% interval [+0.00, +0.00]" in gains
    assert m["LogitsVsFeaturesSentences"] == (f"From scratch, logit KD at 70.00\\% against feature KD at 50.00\\%: "
                                              f"{interval_text(kd, results['student_scratch_kd_features'])}.")

    cost = m["KDCostSentences"]
    for method, run in (("logit KD", "student_scratch_kd_scores"), ("feature KD", "student_scratch_kd_features"),
                        ("decoupled KD", "student_scratch_dkd"), ("attention transfer", "student_scratch_at")):
        seconds = NUMBERS[run][3]
        assert (f"An epoch of {method} from scratch took {seconds:.1f} s against 20.0 s for cross-entropy alone "
                f"({seconds / 20.0:.2f} times as long)") in cost
    assert "(1.48 times as long), and trains 264,192 regressor parameters" in cost
    assert f"cost {EPOCHS * 41.0 / 60:.1f} min of training (3 epochs)" in cost

    teacher_params, kd_params = results[TEACHER_RUN]["parameters"], kd["parameters"]
    eff = known["efficiency"]["runs"]
    flops = eff["student_scratch_kd_scores"]["flops_per_image"] / eff[TEACHER_RUN]["flops_per_image"]
    latency = (eff["student_scratch_kd_scores"]["latency_ms"], eff[TEACHER_RUN]["latency_ms"])
    assert m["StudentVsTeacherSentences"] == (
        f"The best student, {name('student_scratch_kd_scores', results)} at 70.00\\%, against its teacher at "
        f"90.00\\%: {interval_text(kd, results[TEACHER_RUN])}. It has {teacher_params / kd_params:.2f} times fewer parameters ({kd_params / 1e6:.2f} M "
        f"against {teacher_params / 1e6:.2f} M). It needs {flops:.2f} times more FLOPs per image. On Test GPU its "
        f"latency is {latency[0]:.2f} ms against the teacher's {latency[1]:.2f} ms "
        f"({latency[0] / latency[1]:.2f} times slower).")

    teacher_predictions = np.asarray(results[TEACHER_RUN]["test_predictions"])
    shares = {run: float(np.mean(np.asarray(r["test_predictions"]) == teacher_predictions))
              for run, r in results.items() if run != TEACHER_RUN}
    assert shares["student_scratch_baseline"] == 0.7        # classes 0-5 right, and class 9 wrong as the teacher
    assert m["AgreementSentences"].startswith("On the test set, the students predict the same class as the teacher "
                                              f"for {100 * shares['student_scratch_baseline']:.2f}\\% of the images")
    for method, run in (("logit KD", "student_scratch_kd_scores"), ("feature KD", "student_scratch_kd_features")):
        diff = 100 * (shares[run] - shares["student_scratch_baseline"])
        assert (f"the agreement of {method} with the teacher is {abs(diff):.2f} points "
                f"{'above' if diff > 0 else 'below'} the cross-entropy student's") in m["AgreementSentences"]
    assert "the agreement of decoupled KD with the teacher is level with the cross-entropy student's" \
        in m["AgreementSentences"]

    n_a_class = int(np.sum(labels == 0))
    assert m["PerClassSentences"] == (
        f"Class by class (\\figref{{per_class_accuracy.png}}{{fig:per-class}}), {name('student_scratch_kd_scores', results)} "
        f"against {name('student_scratch_baseline', results)} gains most on horse (+100.00 points, [+100.00, +100.00]) "
        f"and least on airplane (-100.00 points, [-100.00, -100.00]); with about {n_a_class} test images a class, the "
        f"interval of a class is wide, and more so for ten classes compared at once: 99.5\\% interval each, 95\\% for "
        f"the 10 classes together (Bonferroni). The gain's interval excludes zero for frog and horse, and the loss's "
        f"for airplane.")

    temperature = LOGIT_RECIPE["temperature"]
    softmax = lambda logits, t: np.exp(np.asarray(logits) / t) / np.exp(np.asarray(logits) / t).sum()
    runner_up = {label: max((c for c in range(10) if c != label), key=lambda c: logits[c])
                 for label, logits in SOFT_LOGITS.items()}
    label = max(SOFT_LOGITS, key=lambda y: softmax(SOFT_LOGITS[y], temperature)[runner_up[y]])
    cold, warm = (softmax(SOFT_LOGITS[label], t)[runner_up[label]] for t in (1, temperature))
    assert (label, runner_up[label]) == (3, 5)                       # the cat, whose runner-up is the dog
    assert m["SoftTargetSentences"] == (
        f"For the cat of \\figref{{soft_targets.png}}{{fig:soft-targets}}, the trained teacher gives the class dog a "
        f"probability of {probability_text(cold)} at $T=1$ and {probability_text(warm)} at $T=3.5$: the similarity a "
        f"one-hot label cannot carry.")

    last = [run for run, r in results.items() if r["best_epoch"] == r["epochs"]]
    assert last == [TEACHER_RUN, "student_scratch_kd_scores", "student_scratch_kd_features", "student_scratch_dkd"]
    assert m["BestEpochSentence"] == (
        f"{', '.join(name(run, results) for run in last[:-1])} and {name(last[-1], results)} were best on validation "
        f"at their last epoch, as a cosine schedule that ends at zero makes likely. Peaked before the end: "
        f"{name('student_scratch_baseline', results)} (epoch 2 of 3) and {name('student_scratch_at', results)} "
        f"(epoch 2 of 3).")

    rows = np.array(list(EVALUATIONS.values()))
    gain = 100 * (rows[:, 1:] - rows[:, :1]).mean(axis=0)
    wins = int(np.sum(rows[:, 3] > rows[:, 0]))
    assert m["EvaluationSentences"] == (
        f"Over the 6 trained runs and seeds of this report, against the raw weights of the last epoch on one view, "
        f"the flip alone changed test accuracy by {gain[0]:+.2f} points on average, the weight average alone by "
        f"{gain[1]:+.2f}, and both together by {gain[2]:+.2f} (higher in {wins} of 6 runs).")


def test_the_reports_folders_and_missing_figures_are_named(known):
    m, figures = known["macros"], known["figures"]
    assert m["ReportStatus"] == f"results of {tex(known['results_dir'])}"
    assert m["FiguresDir"] == "../figures" and m["FiguresDirText"] == rf"\texttt{{{tex(figures)}}}".replace(
        r"\_", r"\_\allowbreak{}")
    assert m["MissingRunsSentence"].startswith("Every expected run has its results file in")
    missing = report.EXPECTED_FIGURES[2:]
    sentence = m["MissingFiguresSentence"]
    assert sentence.startswith(r"\textbf{Missing figures:}") and f"are not in" in sentence
    for figure in report.EXPECTED_FIGURES:
        assert (tex(figure).replace(r"\_", r"\_\allowbreak{}") in sentence) == (figure in missing), figure


# The macros whose values other tests check: the budgets and the verdict (above), the speed
# (test_speed_table_equals_the_benchmark_file), ImageNet against scratch (tests/test_pretrained_lab.py),
# deployment (tests/test_deploy.py).
CHECKED_ELSEWHERE = {"BudgetSentences", "DistillationVerdict", "SpeedSentences", "PretrainedVsScratchSentences",
                     "DeploySentences"}   # tests/test_deploy.py, from a deploy.json and without one


def test_the_teacher_sentence_says_every_student_distilled_the_one_teacher(known):
    """Every distilled run of the fixture distilled the teacher whose results the folder holds (one
    model, so one weights sha256); tests/test_kept.py covers runs of several teachers."""
    m = known["macros"]
    assert m["TeacherSentence"] == "Every distilled student learned from the one teacher."


def test_every_macro_has_a_test_of_its_value(known):
    source = Path(__file__).read_text()
    checked = set(re.findall(r'm\["([A-Za-z]+)"\]', source)) | set(re.findall(r'\("([A-Za-z]+)", "[a-z_]+"\)', source))
    checked |= set(re.findall(r'\("([A-Za-z]+)", [A-Z_]+_RECIPE, "[a-z_]+"\)', source))
    assert set(known["macros"]) - checked - CHECKED_ELSEWHERE == set()


def test_per_class_sentence_with_losses_and_no_gain(tmp_path, reference):
    # Logit KD loses every airplane the baseline gets right and gains no class.
    results, _ = reference
    labels = np.asarray(results[TEACHER_RUN]["test_labels"])

    def right_on(run, classes):
        right = np.isin(labels, classes)
        return dict(results[run], test_predictions=np.where(right, labels, (labels + 1) % 10).tolist(),
                    test_acc=float(right.mean()))
    changed = dict(results, student_scratch_baseline=right_on("student_scratch_baseline", range(6)),
                   student_scratch_kd_scores=right_on("student_scratch_kd_scores", range(1, 6)),
                   student_scratch_kd_features=right_on("student_scratch_kd_features", range(1, 5)),
                   student_scratch_dkd=right_on("student_scratch_dkd", range(1, 5)),
                   student_scratch_at=right_on("student_scratch_at", range(1, 5)))
    rep = report.collect(write_results(tmp_path / "results", changed), tmp_path / "figures", report_dir(tmp_path))
    sentence = report.per_class_sentences(rep)
    assert sentence.endswith("No class's gain has an interval that excludes zero; the loss's does for airplane.")
    assert "least on airplane (-100.00 points, [-100.00, -100.00])" in sentence


def test_each_comparison_of_the_reference_report_is_computed_once(tmp_path, monkeypatch):
    """Every sentence that words a comparison reads it from kdlab.findings: no pair of runs (a
    budget-matched baseline told apart by its epochs) is bootstrapped twice for one report."""
    from kdlab import findings
    from conftest import REPO

    computed = []

    def counted(kd, baseline, *args, **kwargs):
        computed.append((kd[0]["run"], baseline[0]["run"], baseline[0]["epochs"]))
        return paired_difference(kd, baseline, *args, **kwargs)
    monkeypatch.setattr(findings, "paired_difference", counted)
    budget = tmp_path / "ablation-budget"   # the reference's baseline, relabelled as the budget-matched ones
    for variant, epochs in (("equal-training-time", 34), ("teacher-plus-student-epochs", 60)):
        (budget / variant).mkdir(parents=True)
        for path in (REPO / "results" / "reference").glob("student_scratch_baseline*_results.json"):
            (budget / variant / path.name).write_text(json.dumps(dict(json.loads(path.read_text()), epochs=epochs)))
    report.make_report(REPO / "results" / "reference", REPO / "figures", report_dir(tmp_path), pdf=False,
                       budget_dir=budget, log=lambda *_: None)
    assert len(computed) == len(set(computed)) > 0, computed
    budget_matched = [c for c in computed if c[:2] == ("student_scratch_kd_scores", "student_scratch_baseline")]
    assert len(budget_matched) == 3   # equal epochs, equal training time, the teacher's epochs too: once each
