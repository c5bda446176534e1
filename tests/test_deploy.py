"""`python -m kdlab deploy` on the smoke lab's teacher and a student: the ONNX export gives PyTorch's
logits, the int8 model runs and was calibrated on training images only, deploy.json holds every field
and the figure is drawn from it; bad inputs stop with one line, exit 2, and leave nothing behind.
Latency is measured by the command, never asserted here."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, generated_macros
from kdlab.cli import main
from kdlab.errors import KdlabError
from kdlab.data import limit_stratified, make_synthetic_cifar, split_train_val
from kdlab.results import RunPaths

onnx = pytest.importorskip("onnx", reason="pip install -r requirements-deploy.txt")
onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -r requirements-deploy.txt")
deploy_module = pytest.importorskip("kdlab.deploy", reason="pip install -r requirements-deploy.txt")

RUNS = ["teacher_resnet50", "student_scratch_kd_scores"]


@pytest.fixture(scope="module")
def deployed(smoke_lab, tmp_path_factory):
    """The teacher and logit-KD student of the smoke lab, deployed once for every test here."""
    ckpt_dir, _ = smoke_lab
    out = tmp_path_factory.mktemp("deploy") / "out"
    deployment = deploy_module.deploy(RUNS, ckpt_dir, out, log=lambda _: None)
    return ckpt_dir, out, deployment


def test_every_file_is_written_and_nothing_else(deployed):
    _, out, _ = deployed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["deploy.json", "deploy.png", *(f"{run}{kind}.onnx" for run in RUNS for kind in ("", "_int8"))])


def test_deploy_json_holds_every_field_and_labels_smoke_weights(deployed):
    ckpt_dir, out, deployment = deployed
    assert json.loads((out / "deploy.json").read_text()) == deployment
    assert deployment["smoke"] is True and "not results" in deployment["note"]
    assert {"measured", "cpu", "software", "exporter", "quantization", "data", "n_test", "evaluation", "timing",
            "variants", "runs"} <= set(deployment)
    assert {"model", "cores", "threads", "int8_instructions"} <= set(deployment["cpu"])
    assert "opset 18" in deployment["exporter"] and deployment["timing"]["throughput_batch"] == 64
    assert list(deployment["runs"]) == RUNS
    for run, measured in deployment["runs"].items():
        checkpoint = RunPaths(ckpt_dir, run).best
        assert measured["sha256"] == deploy_module.sha256(checkpoint) and measured["smoke"] is True
        assert list(measured["variants"]) == list(deploy_module.VARIANTS)
        for variant in measured["variants"].values():
            assert {"file", "size_mb", "latency_ms", "throughput_img_s", "test_acc", "agreement_with_pytorch"} \
                <= set(variant)
            assert variant["latency_ms"] > 0 and variant["throughput_img_s"] > 0 and 0 <= variant["test_acc"] <= 1
        assert measured["variants"]["pytorch_fp32"]["agreement_with_pytorch"] == 1
        sizes = {variant: v["size_mb"] for variant, v in measured["variants"].items()}
        assert sizes["onnxruntime_int8"] < sizes["onnxruntime_fp32"] / 3   # int8 weights: a quarter of fp32's


def test_the_onnx_export_gives_pytorchs_logits_at_any_batch_size(deployed):
    ckpt_dir, out, _ = deployed
    for run in RUNS:
        weights = deploy_module.load_best(ckpt_dir, run)
        session = onnxruntime.InferenceSession(str(out / f"{run}.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 5):
            x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                expected = weights.model(x).numpy()
            got = session.run(None, {"images": x.numpy()})[0]
            tolerance = deploy_module.EXPORT_TOLERANCE * max(1.0, np.abs(expected).max())
            assert np.abs(got - expected).max() <= tolerance, (run, batch)


def test_the_int8_model_runs_quantized(deployed):
    _, out, _ = deployed
    model = onnx.load(str(out / "student_scratch_kd_scores_int8.onnx"))
    operators = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators   # the QDQ format
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    session = onnxruntime.InferenceSession(str(out / "student_scratch_kd_scores_int8.onnx"),
                                           providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": np.zeros((3, 3, 16, 16), np.float32)})[0]
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


def test_calibration_draws_training_images_only(deployed):
    _, _, deployment = deployed
    data = make_synthetic_cifar()   # the smoke lab's data
    labels = data.train_labels.numpy()
    for measured in deployment["runs"].values():
        config = torch.load(measured["checkpoint"], weights_only=True)["config"]
        train_idx, val_idx = split_train_val(labels, config["val_per_class"], config["split_seed"])
        drawn = np.array(measured["calibration_indices"])
        assert len(drawn) == deploy_module.CALIBRATION_IMAGES and len(set(drawn)) == len(drawn)
        assert set(drawn) <= set(train_idx) and not set(drawn) & set(val_idx)
        assert np.bincount(labels[drawn]).tolist() == [deploy_module.CALIBRATION_IMAGES // 10] * 10
    # A run trained on a subset is calibrated within that subset.
    limited = dict(config, limit_train=100)
    drawn = deploy_module.calibration_indices(labels, limited)
    subset = limit_stratified(train_idx, labels, 100, config["split_seed"])
    assert len(drawn) == 100 and set(drawn) <= set(subset)


def test_the_figure_is_drawn_from_deploy_json(deployed, tmp_path):
    from kdlab.figures import plot_deploy

    _, out, _ = deployed
    path = plot_deploy(json.loads((out / "deploy.json").read_text()), tmp_path)
    assert path == tmp_path / "deploy.png" and path.stat().st_size > 10_000


def test_runs_with_a_best_checkpoint_are_the_default(smoke_lab, tmp_path):
    ckpt_dir, _ = smoke_lab
    shutil.copy(RunPaths(ckpt_dir, "student_scratch_baseline").best, tmp_path)
    assert deploy_module.runs_with_weights(tmp_path) == ["student_scratch_baseline"]


# ----------------------------------------------------------------------------- shown: efficiency table, report

def test_the_efficiency_table_gains_cpu_columns_from_deploy_json_only(deployed):
    from kdlab.figures import format_efficiency_table, with_cpu_latency

    _, out, deployment = deployed
    # The committed table as measured on the GPU, without the CPU columns its figures run added.
    measured = json.loads((REPO / "figures" / "efficiency.json").read_text())
    reference = {key: value for key, value in measured.items() if key != "cpu"}
    reference["runs"] = {run: {k: v for k, v in e.items() if k != "cpu_latency_ms"} for run, e in measured["runs"].items()}
    assert "CPU" not in format_efficiency_table(reference)
    runs = RUNS + ["student_scratch_baseline"]
    smoke = dict(reference, smoke=True, runs={run: reference["runs"][run] for run in runs})
    lines = format_efficiency_table(with_cpu_latency(smoke, deployment, str(out / "deploy.json"))).splitlines()
    assert lines[0].endswith(" | ".join(f"{label}, CPU (ms)" for label in deployment["variants"].values()) + " |")
    int8 = deployment["runs"]["teacher_resnet50"]["variants"]["onnxruntime_int8"]["latency_ms"]
    assert lines[2].startswith("| teacher_resnet50 |") and lines[2].endswith(f"| {int8:.2f} |")
    assert lines[4].startswith("| student_scratch_baseline |") and lines[4].endswith("| not measured |")
    # Smoke weights' latencies are never shown beside results.
    with pytest.raises(KdlabError, match="smoke weights"):
        with_cpu_latency(reference, deployment, "deploy.json")


def test_the_report_deploys_the_student_from_deploy_json_and_says_not_measured_without(deployed, tmp_path):
    from kdlab.report import make_report

    ckpt_dir, out, deployment = deployed
    rep = make_report(ckpt_dir, tmp_path / "figures", tmp_path / "report", draft=True, pdf=False,
                      deploy=out / "deploy.json", log=lambda _: None)
    sentences = generated_macros(tmp_path / "report")["DeploySentences"]
    variants = deployment["runs"]["student_scratch_kd_scores"]["variants"]
    eager, fp32, int8 = (variants[v] for v in ("pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"))
    teacher = deployment["runs"]["teacher_resnet50"]["variants"]["pytorch_fp32"]
    assert (f"answers one image in {eager['latency_ms']:.2f}~ms in PyTorch, {fp32['latency_ms']:.2f}~ms in ONNX "
            f"Runtime") in sentences and f"{int8['latency_ms']:.2f}~ms in int8" in sentences
    assert f"class on {100 * int8['agreement_with_pytorch']:.2f}\\% of the test images" in sentences
    assert f"The teacher in PyTorch takes {teacher['latency_ms']:.2f}~ms" in sentences
    table = (tmp_path / "report" / "generated" / "deploy_table.tex").read_text()
    assert [table.count(f"& {label} &") for label in deployment["variants"].values()] == [len(RUNS)] * 3
    assert rep.deployment == deployment
    make_report(ckpt_dir, tmp_path / "figures", tmp_path / "report", draft=True, pdf=False,
                deploy=tmp_path / "none.json", log=lambda _: None)
    assert "not measured" in generated_macros(tmp_path / "report")["DeploySentences"]
    assert (tmp_path / "report" / "generated" / "deploy_table.tex").read_text() == ""
    # Smoke weights' deploy.json beside the reference's results: refused, not presented as a result.
    with pytest.raises(KdlabError, match="measured smoke weights"):
        make_report(REPO / "results" / "reference", REPO / "figures", tmp_path / "reference", pdf=False,
                    deploy=out / "deploy.json", log=lambda _: None)


# ----------------------------------------------------------------------------- bad input

def deploy_fails(capsys, *args) -> str:
    """`python -m kdlab deploy ARGS` in this process: exit 2 and one line of error, returned."""
    assert main(["deploy", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdlab: error: ") and "Traceback" not in err
    return err


def test_a_run_without_a_best_checkpoint(smoke_lab, tmp_path, capsys):
    ckpt_dir, _ = smoke_lab
    shutil.copy(RunPaths(ckpt_dir, "teacher_resnet50").best, tmp_path)
    err = deploy_fails(capsys, "teacher_resnet50", "student_scratch_baseline", "--ckpt-dir", tmp_path,
                       "--out", tmp_path / "out")
    assert "student_scratch_baseline has no best checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_checkpoint_folder(tmp_path, capsys):
    err = deploy_fails(capsys, "--ckpt-dir", tmp_path, "--out", tmp_path / "out")
    assert "nothing to deploy" in err and not (tmp_path / "out").exists()


def test_a_damaged_checkpoint(smoke_lab, tmp_path, capsys):
    ckpt_dir, _ = smoke_lab
    data = RunPaths(ckpt_dir, "student_scratch_baseline").best.read_bytes()
    RunPaths(tmp_path, "student_scratch_baseline").best.write_bytes(data[: len(data) // 2])
    err = deploy_fails(capsys, "--ckpt-dir", tmp_path, "--out", tmp_path / "out")
    assert "corrupted, truncated" in err and not (tmp_path / "out").exists()


def test_onnxruntime_missing(smoke_lab, tmp_path, capsys, monkeypatch):
    ckpt_dir, _ = smoke_lab
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # `import onnxruntime` raises ImportError
    monkeypatch.delitem(sys.modules, "kdlab.deploy")
    err = deploy_fails(capsys, "--ckpt-dir", ckpt_dir, "--out", tmp_path / "out")
    assert "deploy needs onnxruntime" in err and "requirements-deploy.txt" in err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_written(smoke_lab, tmp_path, capsys):
    ckpt_dir, _ = smoke_lab
    (tmp_path / "a_file").write_text("")
    err = deploy_fails(capsys, "student_scratch_baseline", "--ckpt-dir", ckpt_dir,
                       "--out", tmp_path / "a_file" / "out")
    assert "cannot write to" in err and "--out" in err


def test_a_deploy_that_stops_midway_leaves_nothing(smoke_lab, tmp_path, monkeypatch):
    ckpt_dir, _ = smoke_lab

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(deploy_module, "quantize_int8", fail)
    with pytest.raises(OSError):
        deploy_module.deploy(["student_scratch_baseline"], ckpt_dir, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(OSError):
        deploy_module.deploy(["student_scratch_baseline"], ckpt_dir, tmp_path / "kept", log=lambda _: None)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_the_tests_install_the_deploy_requirements():
    """CI installs requirements-dev.txt: with the deploy requirements in it, these tests run there."""
    assert "-r requirements-deploy.txt" in (REPO / "requirements-dev.txt").read_text().splitlines()


def test_kept_weights_deploy_as_a_checkpoint_does_and_an_altered_part_is_refused(smoke_lab, tmp_path, capsys):
    """--kept: the weights of checkpoints/reference/<run>/ (kdlab.kept), labelled with their sha256."""
    from kdlab.checkpoints import load_checkpoint
    from kdlab.config import make_config
    from kdlab.kept import keep_weights

    ckpt_dir, _ = smoke_lab
    state = load_checkpoint(RunPaths(ckpt_dir, "student_scratch_kd_scores").best)
    manifest = keep_weights(state["modules"]["student"], make_config("student_scratch_kd_scores", smoke=True),
                            tmp_path / "kept" / "student_scratch_kd_scores", test_acc=state["results"]["test_acc"])
    assert main(["deploy", "--kept", str(tmp_path / "kept"), "--out", str(tmp_path / "out")]) == 0
    deployment = json.loads((tmp_path / "out" / "deploy.json").read_text())
    measured = deployment["runs"]["student_scratch_kd_scores"]
    assert list(deployment["runs"]) == ["student_scratch_kd_scores"] and deployment["smoke"]
    assert measured["sha256"] == manifest["sha256"] and measured["results_test_acc"] == manifest["test_acc"]
    part = tmp_path / "kept" / "student_scratch_kd_scores" / "weights.fp16.part00"
    part.write_bytes(b"altered" + part.read_bytes()[7:])
    capsys.readouterr()
    err = deploy_fails(capsys, "--kept", tmp_path / "kept", "--out", tmp_path / "out2")
    assert "does not match its sha256" in err and not (tmp_path / "out2").exists()
