"""The files a run leaves in its checkpoint folder, and reading its results files.

No torch here: `python -m kdlab status` and `report` only look at files, and start at once.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kdlab.config import RUNS
from kdlab.errors import KdlabError

# Where runs are saved unless --ckpt-dir says otherwise. Smoke runs (random weights, synthetic
# data) have their own folder: their checkpoints must never block or pass for real ones.
CKPT_DIR = Path("checkpoints")
SMOKE_CKPT_DIR = CKPT_DIR / "smoke"

# What every <run>_results.json holds (kdlab.checkpoints writes it when a run finishes).
RESULT_KEYS = ("run", "test_acc", "best_val_acc", "best_epoch", "epochs", "config",
               "weights", "smoke", "data", "n_train", "n_val", "n_test", "parameters",
               "extra_training_parameters", "test_predictions", "device", "device_name",
               "torch_version", "wall_seconds", "finished")


@dataclass
class RunPaths:
    """The names of a run's files in a checkpoint folder (kdlab.checkpoints says what each holds)."""
    ckpt_dir: Path
    run: str

    @property
    def best(self) -> Path:
        return self.ckpt_dir / f"{self.run}_best.pt"

    @property
    def last(self) -> Path:
        return self.ckpt_dir / f"{self.run}_last.pt"

    @property
    def results(self) -> Path:
        return self.ckpt_dir / f"{self.run}_results.json"

    @property
    def lock_file(self) -> Path:
        return self.ckpt_dir / f"{self.run}.lock"


def default_ckpt_dir(smoke: bool) -> Path:
    return SMOKE_CKPT_DIR if smoke else CKPT_DIR


def run_status(ckpt_dir: str | Path, run: str) -> str:
    paths = RunPaths(Path(ckpt_dir), run)
    if paths.best.exists():
        # The zip's directory is at its end: a truncated copy (an interrupted sync) has none.
        # Reading it costs a few bytes; checking every checksum is left to loading.
        return "trained" if zipfile.is_zipfile(paths.best) else "damaged"
    return "resumable" if paths.last.exists() else "missing"


def read_json(path: Path, what: str):
    """The JSON in `path`; if it cannot be read, an error that ends with `what` to do."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KdlabError(f"{path} is not readable JSON ({err}); {what}") from None


def run_order(run: str) -> tuple[int, str]:
    names = list(RUNS)
    return (names.index(run) if run in names else len(names), run)


def read_results_file(path: Path, run: str) -> dict:
    """One run's results file, checked; a damaged or foreign one stops with what to do about it."""
    again = (f"copy it again from where it came from, or, in the run's checkpoint folder, delete it and "
             f"run `python -m kdlab run {run} --ckpt-dir <that folder>`: a finished run writes it again "
             f"from its checkpoint.")
    r = read_json(path, again)
    lacking = [k for k in RESULT_KEYS if k not in r] if isinstance(r, dict) else list(RESULT_KEYS)
    if lacking:
        raise KdlabError(f"{path} is not a kdlab results file (it lacks {', '.join(lacking)}); {again}")
    if r["run"] != run:
        raise KdlabError(f"{path} holds the results of {r['run']!r}; rename it "
                         f"{r['run']}_results.json or delete it.")
    return r


def load_results(results_dir: str | Path) -> dict[str, dict]:
    """The `<run>_results.json` of every run found in `results_dir`, by run, in the lab's order.

    Files of names that are not runs are not read.
    """
    paths = {run: RunPaths(Path(results_dir), run).results for run in RUNS}
    return {run: read_results_file(path, run) for run, path in paths.items() if path.is_file()}
