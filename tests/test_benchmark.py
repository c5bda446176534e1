"""benchmarks/throughput.py runs end to end on the CPU and writes a well-formed report.

Only structure is checked: tiny mode's timings on a shared CPU mean nothing, so no test
compares speeds.
"""
import datetime
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab import benchmark_tables
from kdlab.config import LAB_RUNS, step_runs
from kdlab.results import STEP_DESCRIPTIONS
from kdlab.results import load_benchmark as load_benchmark_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput.py"
STEPS = list(step_runs())
# One CPU thread: on a shared CI machine, OpenMP threads spinning against other processes slow a
# two-thread run many-fold, and these tests check structure, not speed.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def numbers(tree, path=""):
    """Every number in a JSON tree, with its path (booleans are not numbers here)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture
def one_thread(monkeypatch):
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)               # for the processes a test starts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_run_writes_every_row_scaling_and_the_table(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    budget = report["budget"]

    assert report["device"] == "cpu" and report["mode"] == "tiny" and report["torch_version"]
    assert_measured_now_at_a_commit(report)
    assert report["peak_tflops"] is None and report["fast_path"] is None   # both CUDA only
    assert list(report["configs"]) == STEPS == [row["step"] for row in report["rows"]]
    for row in report["rows"]:
        assert row["run"] == report["configs"][row["step"]]["run"]
        forward = row["forward_flops_per_image"]
        if row["step"] == "evaluation":
            assert row["flops_per_image"] == forward["trained"]
            images = budget["eval_timed_batches"] * budget["eval_batch_size"]
        else:
            assert row["flops_per_image"] == 3 * forward["trained"] + (forward["teacher"] or 0)
            images = budget["timed_steps"] * report["batch_size"]
        assert (forward["teacher"] is None) == (row["step"] in ("teacher_ce", "student_ce", "evaluation"))
        for path in ("kdlab", "naive"):
            assert row[path]["images"] == images
            assert row[path]["peak_memory_gib"] is None and row[path]["peak_share"] is None
        assert row["speedup"] == row["kdlab"]["images_per_s"] / row["naive"]["images_per_s"]

    first, second = report["scaling"]["epochs"]
    assert second["limit_train"] == 2 * first["limit_train"] == second["train_images"]
    assert second["steps"] == 2 * first["steps"] == 2 * budget["scaling_steps"]

    for path, value in numbers(report):
        assert math.isfinite(value), path
    for path, value in numbers({"rows": report["rows"], "scaling": report["scaling"]}):
        assert value > 0, path

    bench = load_benchmark()
    families = [*bench.OP_FAMILIES, *bench.REGIONS.values(), benchmark_tables.OTHER]
    assert [part["step"] for part in report["breakdown"]] == STEPS[:-1]   # every training step kind
    for part in report["breakdown"]:
        assert list(part["shares"]) == families and math.isclose(sum(part["shares"].values()), 1)
        # Each family's operators ran in every step: convolutions, batch norm, the loader's
        # crops and resizes, SGD's update, and the rest (ReLU, adds, the loss).
        assert all(part["seconds_per_step"][family] > 0 for family in families), part["seconds_per_step"]
        assert part["kernel_seconds_per_step"] is part["busy_share"] is part["conv_peak_share"] is None  # CUDA only
        assert part["conv_tflops"] > 0

    lab_batch = report["batch_size"]
    assert [sweep["step"] for sweep in report["batch_sweep"]] == ["teacher_ce", "student_ce"]
    for sweep in report["batch_sweep"]:
        assert sweep["lab_batch_size"] == lab_batch
        assert [p["batch_size"] for p in sweep["points"]] == [round(f * lab_batch) for f in budget["batch_factors"]]
        assert all(p["images"] == budget["timed_steps"] * p["batch_size"] and p["tflops"] > 0 for p in sweep["points"])

    table = result.stdout.split("Measured on cpu", 1)[1]   # the Markdown of the results file it wrote
    assert table.strip() == benchmark_tables.markdown(report, str(out)).split("Measured on cpu", 1)[1].strip()
    assert all(STEP_DESCRIPTIONS[step] in table for step in STEPS) and "Epoch time of the student CE step" in table
    assert "Where the step's time goes" in table and "Batch sweep" in table
    assert "10 (lab)" in table   # the lab's batch is marked in the sweep

    render = [sys.executable, "-m", "kdlab.benchmark_tables"]   # from the results file alone
    plotted = subprocess.run([*render, str(out), "--plot", str(tmp_path / "throughput.png")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    missing = subprocess.run([*render, str(tmp_path / "none.json"), "--plot", str(tmp_path / "x.png")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr

    text = benchmark_tables.markdown(report, "bench.json")
    assert "| step | conv+mm | BN | data | optim | other | busy |" in text
    assert text.count("| teacher_ce | ") == 1 + len(budget["batch_factors"])   # breakdown + sweep rows


def test_markdown_of_a_results_file_from_before_the_breakdown():
    """Committed GPU results predate the breakdown and the sweep: their tables still print."""
    path = REPO / "benchmarks" / "results" / "h200-full-compile.json"
    text = benchmark_tables.markdown(load_benchmark_file(path), str(path))
    assert "| student step (ResNet18, CE) |" in text and "| logit KD step (+ ResNet50 forward) |" in text
    assert "Batch sweep" not in text


def assert_measured_now_at_a_commit(report: dict) -> None:
    measured = datetime.datetime.fromisoformat(report["measured"])
    assert measured.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - measured) < datetime.timedelta(hours=1)
    assert re.fullmatch(r"[0-9a-f]{40}(\+uncommitted)?", report["commit"]), report["commit"]


def test_the_commit_measured_is_git_head_or_the_one_given(monkeypatch):
    bench = load_benchmark()
    monkeypatch.delenv("KDLAB_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout.strip()
    assert bench.measured_commit().split("+")[0] == head
    monkeypatch.setenv("KDLAB_COMMIT", "abc123 (copied to a GPU)")   # a copy without .git is told
    assert bench.measured_commit() == "abc123 (copied to a GPU)"


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """The compile lever with torch's aot_eager backend: the lever's path, without inductor's
    minute of code generation per graph on this CPU."""
    monkeypatch.setattr("kdlab.train.COMPILE_OPTIONS", dict(backend="aot_eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fast_path_switches_and_their_table_run_on_the_cpu(one_thread, aot_eager_compile, monkeypatch):
    """The CUDA-only section, run here on the CPU, so the GPU run meets no new code."""
    bench = load_benchmark()
    budget, device = bench.BUDGETS["tiny"], torch.device("cpu")
    cfg = bench.make_config(step_runs()["student_ce"], **bench.size_overrides(budget))
    data = bench.make_data(budget, cfg)
    images, labels = bench.student_ce_data(budget, data, cfg)
    baseline = bench.measure(lambda: bench.kdlab_train(cfg, images, labels, device),
                             budget.warmup_steps, budget.timed_steps, device)
    evaluation = bench.measure_row("evaluation", cfg, data, budget, device, None)["kdlab"]
    fast = bench.measure_fast_paths(budget, data, device, "tiny", baseline, evaluation, True, log=lambda line: None)

    switches = fast["switches"]
    assert list(switches) == ["channels_last", "autocast", "fp16", "fused_sgd", "fp16_fused_sgd", "eval_batch",
                              "cudnn_benchmark", "compile"]
    for name, result in switches.items():
        assert result["on"]["images_per_s"] > 0 and result["off"]["images_per_s"] > 0, name
        assert result["verdict"] in ("pays", "costs", "no clear difference")
    assert switches["autocast"]["off"] is not baseline and switches["fused_sgd"]["off"] is baseline
    assert switches["fp16"]["against"] == "fp32" and switches["fp16_fused_sgd"]["off"] is switches["fp16"]["on"]
    check = switches["fused_sgd"]["skipped_steps_check"]
    assert check["agrees"] and check["max_weight_difference"] < 1e-6 and check["skipped_steps"] == [1, 3]
    batch = switches["eval_batch"]
    assert batch["off"] is evaluation and batch["batch_size"] == 4 * batch["default_batch_size"] == 40
    assert batch["on"]["images"] == batch["batch_size"]   # one timed batch, after one warm-up batch
    assert switches["compile"]["compile_seconds"] == (switches["compile"]["on"]["warmup_seconds"]
                                                      - baseline["warmup_seconds"])

    report = dict(device_name="cpu", mode="tiny", image_size=cfg.image_size, batch_size=cfg.batch_size,
                  torch_version=torch.__version__, budget=bench.asdict(budget), rows=[], fast_path=fast,
                  scaling=bench.measure_scaling(budget, data, device))
    table = benchmark_tables.markdown(report, "bench.json")
    for name in switches:
        assert f"| {name} |" in table
    assert "the same update as the default SGD after skipped fp16 steps" in table and "(compiling: " in table

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")
    monkeypatch.setattr("kdlab.train.COMPILE_OPTIONS", dict(backend=no_compiler))
    torch._dynamo.reset()
    failed = bench.measure_compile(cfg, images, labels, device, budget, baseline, log=lambda line: None)
    assert failed == {"error": "RuntimeError: the lever fell back: torch.compile failed "
                               "(RuntimeError: no C++ compiler here); training without it"}, failed


def test_lab_time_trial_runs_the_six_runs_from_cached_imagenet_shaped_weights(tmp_path, one_thread, no_network,
                                                                           monkeypatch, capsys):
    """The GPU measurement's path at trial sizes: every run of `run all` trains, the pretrained ones
    from the temporary cache (nothing downloaded), which is gone afterwards with the checkpoints."""
    bench = load_benchmark()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "the user's cache"))
    out = tmp_path / "lab-time.json"
    assert bench.main(["--lab-time", "--tiny", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    lab = report["lab_time"]

    assert no_network == [] and os.environ["TORCH_HOME"] == str(tmp_path / "the user's cache")
    assert report["mode"] == "tiny" and lab["trial"] and lab["precision"] == "fp32"
    assert_measured_now_at_a_commit(report)
    assert [run["run"] for run in lab["runs"]] == LAB_RUNS
    for run in lab["runs"]:
        assert run["weights"] == lab["configs"][run["run"]]["weights"] and run["seconds"] > 0
        assert run["epochs"] == len(run["epoch_seconds"]) == bench.LAB_TRIAL["epochs"]
    assert {run["weights"] for run in lab["runs"]} == {"imagenet", "none"}
    assert lab["total_seconds"] == sum(run["seconds"] for run in lab["runs"])
    table = capsys.readouterr().out.split("the six-run lab on", 1)[1]
    assert "trial sizes: the times mean nothing" in table and all(run in table for run in LAB_RUNS)


def test_peak_of_known_gpus_is_found_by_name():
    bench = load_benchmark()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench.peak_tflops("NVIDIA H200") == 989
    assert bench.peak_tflops("NVIDIA A100-SXM4-40GB") == 312
    assert bench.peak_tflops("Tesla T4") == 65
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_a_failed_breakdown_is_a_row_that_says_so():
    """The profiler's output differs across torch versions: a step whose breakdown failed keeps its place."""
    report = dict(device="cuda", breakdown=[dict(step="teacher_ce", run="teacher_resnet50",
                                                 error="RuntimeError: the profiler attributed no time")])
    header, row = benchmark_tables.breakdown_rows(report)
    assert len(row) == len(header) and row[0] == "teacher_ce" and row[1].startswith("failed: RuntimeError")
    assert "cuda kernels" in benchmark_tables.breakdown_note(report)
