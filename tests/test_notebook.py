"""The notebook, executed headless in smoke mode, and the figures it and the CLI draw.

The notebook is executed once (`executed`), on a copy of the session's smoke lab (tests/conftest.py)
without the two runs from scratch: it loads four runs the CLI trained and trains two in its
kernel, with sections 6b (decoupled KD, attention transfer) and 6c (the student's own method) on,
then draws and reports. Every other test reuses its checkpoints, tests/test_teaching.py too.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from PIL import Image

from conftest import generated_macros
from kdlab.config import SMOKE
from kdlab.latex import tex

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebook" / "EfficientDL_KD_Lab.ipynb"
LAB_RUNS = ["teacher_resnet50", "student_pretrained_baseline", "student_pretrained_kd_logits",
            "student_pretrained_kd_features", "student_scratch_baseline", "student_scratch_kd_scores"]
# Sections 6b and 6c: beyond the original lab, and the method the notebook defines itself.
OPTIONAL_RUNS = ["student_scratch_dkd", "student_scratch_at", "student_scratch_logit_matching"]
RUNS = LAB_RUNS + OPTIONAL_RUNS
RESULTS_FIGURES = {"comparaison_finale.png", "comparison_test_accuracy.png", "training_losses.png",
                   "efficiency.png", "confusion_matrix.png", "agreement.png", "soft_targets.png",
                   "per_class_accuracy.png",
                   *(f"curves_{run}.png" for run in RUNS)}
RESULTS_TABLES = {"efficiency.json", "efficiency.md"}
DATA_FIGURES = {"sample_images.png"}   # drawn from the data, so only by the notebook
# The runs the notebook trains in its kernel, all but the baseline distilling the teacher it loaded.
TRAINED_IN_THE_KERNEL = ["student_scratch_baseline", "student_scratch_kd_scores", *OPTIONAL_RUNS]


def execute(nb, env: dict, timeout: int = 900):
    """Run every cell of `nb` in a fresh kernel whose environment is os.environ plus `env`."""
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=dict(os.environ, **env))
    return nb


# Section 7b deploys where ONNX Runtime is installed (requirements-dev.txt installs it).
DEPLOYS = importlib.util.find_spec("onnxruntime") is not None


def smoke_env(folder: Path) -> dict:
    return dict(KDLAB_SMOKE="1", KDLAB_CKPT_DIR=str(folder / "ckpt"), KDLAB_DATA_DIR=str(folder / "data"),
                KDLAB_FIGURES_DIR=str(folder / "figures"), KDLAB_REPORT_DIR=str(folder / "report"),
                KDLAB_DEPLOY="1" if DEPLOYS else "0", KDLAB_BEYOND_THE_ORIGINAL_LAB="1", KDLAB_OWN_METHOD="1")


def outputs_text(nb) -> str:
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs)


def assert_valid_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG", path
        assert image.width > 100 and image.height > 100, path
        image.verify()


@pytest.fixture(scope="module")
def executed(executed_notebook):
    """(the executed notebook, its folder, {copied file: its mtime before the execution})."""
    return executed_notebook


def execute_once(folder, smoke_lab) -> None:
    """The notebook's one execution of the session, in `folder` (tests/conftest.py's executed_notebook):
    the executed notebook and the copied files' times before it are written beside its outputs."""
    shutil.copytree(smoke_lab[0], folder / "ckpt",
                    ignore=shutil.ignore_patterns(*(f"{run}_*" for run in TRAINED_IN_THE_KERNEL),
                                                  *TRAINED_IN_THE_KERNEL))   # and their tensorboard/<run>/
    copied = {path.name: path.stat().st_mtime_ns for path in (folder / "ckpt").iterdir() if path.is_file()}
    start = time.perf_counter()
    nb = execute(nbformat.read(NOTEBOOK, as_version=4), smoke_env(folder))
    print(f"\nheadless smoke execution of the notebook: {time.perf_counter() - start:.1f}s")
    nbformat.write(nb, folder / "executed.ipynb")
    (folder / "copied.json").write_text(json.dumps(copied))


def read_execution(folder):
    """(the executed notebook, its folder, {copied file: its mtime before the execution})."""
    copied = json.loads((folder / "copied.json").read_text())
    return (nbformat.read(folder / "executed.ipynb", as_version=4), folder,
            {folder / "ckpt" / name: stamp for name, stamp in copied.items()})


def test_committed_notebook_has_no_outputs_or_execution_counts():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], cell.source[:60]
        assert cell.execution_count is None, cell.source[:60]
    tagged = [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1


def test_notebook_runs_headless_and_draws_every_figure(executed):
    nb, folder, _ = executed
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert errors == []
    written = {path.name for path in (folder / "figures").iterdir()}
    assert RESULTS_FIGURES | RESULTS_TABLES | DATA_FIGURES <= written
    for name in RESULTS_FIGURES | DATA_FIGURES:
        assert_valid_png(folder / "figures" / name)
    # the results figures are shown inline in section 7, the teacher's soft targets in section 2 too
    shown = sum("image/png" in out.get("data", {}) for out in code_cell(nb, "made = figures.make_all_figures").outputs)
    assert shown == len(RESULTS_FIGURES) - len(RUNS)
    assert any("image/png" in out.get("data", {}) for out in code_cell(nb, "show(figures.plot_soft_targets").outputs)
    assert "Not on Colab: every file is already on this machine's disk." in outputs_text(nb)
    assert "SMOKE RUN: synthetic data, not results" in outputs_text(nb)
    assert "IProgress not found" not in outputs_text(nb), "tqdm falls back to text bars quietly"


def code_cell(nb, text: str):
    """The one code cell whose source holds `text`."""
    [cell] = [cell for cell in nb.cells if cell.cell_type == "code" and text in cell.source]
    return cell


def test_section_8_writes_the_report_of_the_notebooks_runs(executed):
    nb, folder, _ = executed
    report = folder / "report"
    assert (report / "KD_LAB.tex").is_file() and (report / "generated" / "results_table.tex").is_file()
    macros = generated_macros(report)
    assert macros["DraftText"] == "DRAFT - smoke run, not results"
    assert macros["ReportStatus"] == f"results of {tex(folder / 'ckpt')}", "the six runs, none missing"
    assert macros["FiguresDir"] == "../figures"
    if DEPLOYS:   # section 7b deployed the teacher and the best student: the report's section says how fast
        assert "ms in int8" in macros["DeploySentences"] and (folder / "figures" / "deploy.png").is_file()
    text = "".join(out.get("text", "") for out in code_cell(nb, "make_report(").outputs)
    assert "kdlab: error" not in text and "wrote" in text
    if shutil.which("latexmk"):
        assert (report / "KD_LAB.pdf").stat().st_size > 0 and "built" in text
    else:
        assert "latexmk is not installed" in text


def test_efficiency_table_comes_from_the_runs(executed):
    _, folder, _ = executed
    efficiency = json.loads((folder / "figures" / "efficiency.json").read_text())
    assert {"device", "image_size", "measured", "runs"} <= set(efficiency)
    assert efficiency["smoke"] and efficiency["image_size"] == SMOKE["image_size"]
    assert set(efficiency["runs"]) == set(RUNS)
    for run, entry in efficiency["runs"].items():
        results = json.loads((folder / "ckpt" / f"{run}_results.json").read_text())
        assert entry["test_acc"] == results["test_acc"]
        assert entry["params"] == results["parameters"]
        assert entry["checkpoint_mb"] == (folder / "ckpt" / f"{run}_best.pt").stat().st_size / 1e6
        assert entry["latency_ms"] > 0 and entry["throughput_img_s"] > 0
    teacher, student = efficiency["runs"]["teacher_resnet50"], efficiency["runs"]["student_pretrained_baseline"]
    assert teacher["flops_per_image"] > student["flops_per_image"] > 0


def test_the_notebook_loads_the_runs_it_finds_and_trains_the_others(executed):
    # The checkpoints the CLI's `run all --smoke` wrote load in the notebook: the same configs.
    nb, folder, copied = executed
    assert sorted(p.name for p in (folder / "ckpt").glob("*_best.pt")) == sorted(f"{run}_best.pt" for run in RUNS)
    assert {path: path.stat().st_mtime_ns for path in copied} == copied, "a loaded run was written again"
    assert not list((folder / "ckpt").glob("*_last.pt"))
    text = outputs_text(nb)
    for run in RUNS:
        trained = run in TRAINED_IN_THE_KERNEL
        assert (f"{run}: loaded" in text) != trained and (f"{run}: training on cpu" in text) == trained, run
        assert (f"{run}: test accuracy" in text) == trained, run


def test_figures_command_draws_the_notebooks_results_figures(executed, tmp_path):
    _, folder, _ = executed
    start = time.perf_counter()
    # Section 7b's deploy.json (in the figures folder's deploy/) gives the command its deploy.png too.
    deploy = ["--deploy", str(folder / "figures" / "deploy" / "deploy.json")] if DEPLOYS else []
    done = subprocess.run([sys.executable, "-m", "kdlab", "figures", "--ckpt-dir", str(folder / "ckpt"),
                           "--out", str(tmp_path), "--device", "cpu", *deploy],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    print(f"\n`python -m kdlab figures` on the smoke checkpoints: {time.perf_counter() - start:.1f}s")
    assert done.returncode == 0, done.stderr
    notebook_files = {p.name for p in (folder / "figures").iterdir()} - DATA_FIGURES - {"deploy"}
    deployed = {"deploy.png"} if DEPLOYS else set()
    assert notebook_files == RESULTS_FIGURES | RESULTS_TABLES | deployed
    # The method the notebook defines is registered in its kernel; the command line knows it only
    # through --methods FILE, so without it the command draws every figure but that run's curves.
    assert {p.name for p in tmp_path.iterdir()} == notebook_files - {f"curves_{OPTIONAL_RUNS[-1]}.png"}


def test_missing_runs_are_named_and_the_other_figures_still_drawn(executed, tmp_path):
    from kdlab.figures import make_all_figures

    _, folder, _ = executed
    partial = tmp_path / "results"
    partial.mkdir()
    for run in ("student_pretrained_baseline", "student_scratch_baseline"):
        shutil.copy(folder / "ckpt" / f"{run}_results.json", partial)
    lines = []
    made = make_all_figures(partial, tmp_path / "figures", device="cpu", log=lines.append)

    assert made["missing_runs"] == ["teacher_resnet50", "student_pretrained_kd_logits",
                                    "student_pretrained_kd_features", "student_scratch_kd_scores"]
    assert "agreement.png" in made["skipped"]
    assert any("missing runs" in line and "student_pretrained_kd_logits" in line for line in lines)
    drawn = {p.name for p in made["files"]}
    assert {"comparaison_finale.png", "comparison_test_accuracy.png", "confusion_matrix.png",
            "efficiency.png", "curves_student_scratch_baseline.png"} <= drawn
    for path in made["files"]:
        assert path.is_file()
    # no checkpoint beside these results: the size is that of the fp32 weights
    entry = made["efficiency"]["runs"]["student_scratch_baseline"]
    assert entry["checkpoint_mb"] == 4 * entry["params"] / 1e6


# ----------------------------------------------------------------------------- the Colab branch

FAKE_DRIVE = '''
import os
from pathlib import Path


def mount(mountpoint, **kwargs):
    """Stands in for Colab's Drive: records the call and makes the mount point."""
    with open(os.environ["FAKE_COLAB_RECORD"], "a") as record:
        record.write(mountpoint + "\\n")
    (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)


def flush_and_unmount():
    with open(os.environ["FAKE_COLAB_RECORD"], "a") as record:
        record.write("flush_and_unmount\\n")
'''


def setup_notebook(content: Path, *more_cells):
    """The notebook's setup cell, with Colab's /content moved to `content`, then `more_cells`, or
    else a cell that prints what the setup found."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    setup = nb.cells[2]
    assert 'CONTENT = Path("/content")' in setup.source
    setup.source = setup.source.replace('CONTENT = Path("/content")', f"CONTENT = Path({str(content)!r})")
    report = nbformat.v4.new_code_cell("print('REPO', REPO); print('CKPT', DEFAULT_CKPT_DIR)")
    nb.cells = [setup, *(more_cells or [report])]
    return nb


@pytest.fixture
def fake_colab(tmp_path):
    package = tmp_path / "fake_site" / "google" / "colab"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "drive.py").write_text(FAKE_DRIVE)
    record = tmp_path / "mount_calls.txt"
    env = dict(PYTHONPATH=os.pathsep.join(filter(None, [str(package.parents[1]), os.environ.get("PYTHONPATH")])),
               FAKE_COLAB_RECORD=str(record))
    return env, record


def test_colab_setup_mounts_drive_and_finds_the_code_there(fake_colab, tmp_path):
    env, record = fake_colab
    content = tmp_path / "content"
    (content / "drive" / "MyDrive").mkdir(parents=True)
    (content / "drive" / "MyDrive" / "kdlab").symlink_to(REPO)

    nb = execute(setup_notebook(content), env, timeout=120)

    assert record.read_text().splitlines() == [str(content / "drive")]
    text = outputs_text(nb)
    assert f"Colab: the lab's code is in {content / 'drive' / 'MyDrive' / 'kdlab'}" in text
    assert f"CKPT {content / 'drive' / 'MyDrive' / 'KD_checkpoints'}" in text


def test_colab_setup_without_the_code_says_where_to_put_it(fake_colab, tmp_path):
    env, record = fake_colab
    with pytest.raises(CellExecutionError) as failure:
        execute(setup_notebook(tmp_path / "content"), env, timeout=120)
    assert record.read_text().splitlines() == [str(tmp_path / "content" / "drive")]
    message = str(failure.value)
    assert "MyDrive/kdlab" in message and "git clone" in message


def test_last_cell_on_colab_syncs_drive_and_mounts_it_again(fake_colab, tmp_path):
    env, record = fake_colab
    content = tmp_path / "content"
    (content / "drive" / "MyDrive").mkdir(parents=True)
    (content / "drive" / "MyDrive" / "kdlab").symlink_to(REPO)
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    parameters = next(cell for cell in cells if "parameters" in cell.metadata.get("tags", []))
    assert "drive.flush_and_unmount()" in cells[-1].source

    nb = execute(setup_notebook(content, parameters, cells[-1]), env, timeout=120)

    mountpoint = str(content / "drive")
    assert record.read_text().splitlines() == [mountpoint, "flush_and_unmount", mountpoint]
    assert f"Drive is synced: checkpoints in {content / 'drive' / 'MyDrive' / 'KD_checkpoints'}" in outputs_text(nb)
