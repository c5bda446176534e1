import dataclasses
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from kdlab.checkpoints import train_or_load
from kdlab.config import make_config
from kdlab.data import make_splits, make_synthetic_cifar

REPO = Path(__file__).resolve().parents[1]
# ci_skips: no skip under CI=true outside its list; pytester: tests/test_suite.py runs pytest itself.
pytest_plugins = ["ci_skips", "pytester"]

# The suite runs on two pytest-xdist workers (pyproject.toml): one torch thread each, and for every
# process a test starts, since two processes of two threads on two cores slow each other tenfold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The order the two workers take the test files in (pyproject.toml's --no-loadscope-reorder keeps it;
# the files not named follow): the notebook first, as it trains the session's smoke lab (which the
# deploy, CLI, kept-weights and own-method files read) and executes the notebook the teaching file
# reads; the two Ray files far apart, as they take turns (one_ray_at_a_time); then the longest first,
# so that neither worker is left alone with a long file at the end.
FIRST_FILES = ["test_notebook.py", "test_cluster.py", "test_sweep.py", "test_reliability.py", "test_benchmark.py",
               "test_plan.py", "test_precision.py", "test_speed_levers.py", "test_cli.py", "test_deploy.py",
               "test_own_method.py", "test_train_or_load.py", "test_kept.py", "test_teaching.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: a file's tests keep their order


# The limit of every subprocess a test starts: on a busy shared machine the smoke lab takes minutes,
# and a slow machine must not turn into failed tests; a hang must.
SUBPROCESS_TIMEOUT = 900


def run_kdlab(*args, check=True, env=None, timeout=SUBPROCESS_TIMEOUT):
    """`python -m kdlab ARGS` in a subprocess, as a user runs it; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    result = subprocess.run([sys.executable, "-m", "kdlab", *map(str, args)], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kdlab {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def session_root(tmp_path_factory) -> Path:
    """The session's temporary folder, shared by its xdist workers (each has its own below it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def once_a_session(tmp_path_factory, name: str, make) -> Path:
    """The folder `make(folder)` filled, once for the whole session: the first worker to ask makes it
    while the others wait on a lock, then every worker reads it (a worker's session fixture alone
    would make it once a worker). A folder is read only once its `.complete` marker is written, so a
    worker stopped halfway leaves it to be made again."""
    root = session_root(tmp_path_factory)
    folder, complete = root / name, root / f"{name}.complete"
    with FileLock(root / f"{name}.lock"):
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            complete.touch()
    return folder


def one_ray_at_a_time(tmp_path_factory) -> FileLock:
    """Held while a test file runs its Ray (the sweeps' local Ray, the two-node cluster): two Rays on
    two cores at once would starve each other's trials and race for ports."""
    return FileLock(session_root(tmp_path_factory) / "ray.lock")


@pytest.fixture(scope="session")
def smoke_lab(tmp_path_factory):
    """The six runs of the lab trained once in smoke mode, shared by every test that reads them:
    (their checkpoint folder, the finished `run all` process)."""
    def train(folder):
        result = run_kdlab("run", "all", "--smoke", "--ckpt-dir", folder / "ckpt")
        (folder / "run_all.json").write_text(json.dumps(dict(args=result.args, stdout=result.stdout,
                                                             stderr=result.stderr)))
    folder = once_a_session(tmp_path_factory, "smoke_lab", train)
    return folder / "ckpt", subprocess.CompletedProcess(returncode=0, **json.loads((folder / "run_all.json").read_text()))


@pytest.fixture(scope="session")
def executed_notebook(tmp_path_factory, smoke_lab):
    """The notebook executed headless once per session, on the smoke lab (tests/test_notebook.py
    says how); shared by the notebook's tests and the teaching tests."""
    from test_notebook import execute_once, read_execution

    return read_execution(once_a_session(tmp_path_factory, "notebook_smoke",
                                         lambda folder: execute_once(folder, smoke_lab)))


def block_network(monkeypatch) -> list:
    """Every connection fails, as offline; returns the list of attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(errno.ENETUNREACH, "network blocked by the test")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture
def no_network(monkeypatch) -> list:
    return block_network(monkeypatch)


def generated_macros(report_dir: Path) -> dict[str, str]:
    """The macros `python -m kdlab report` wrote into report_dir/generated/macros.tex, by name."""
    text = (report_dir / "generated" / "macros.tex").read_text()
    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", text, re.M))


TINY_RUN = "student_scratch_baseline"


@pytest.fixture(scope="session")
def tiny_splits():
    """60 synthetic images: 40 to train on (4 steps of 10 an epoch), 20 to validate, 20 to test."""
    data = make_synthetic_cifar(train_per_class=6, test_per_class=2)
    return make_splits(data, val_per_class=2, split_seed=42, limit_train=0, device=torch.device("cpu"))


def train_tiny(splits, ckpt_dir, log=lambda _: None, **kwargs):
    """train_or_load of the scratch baseline on `splits` on the CPU: 16 px, batches of 10, 2 epochs."""
    cfg = dataclasses.replace(make_config(TINY_RUN, smoke=True, batch_size=10, image_size=16, epochs=2),
                              val_per_class=2)
    return train_or_load(cfg, lambda: splits, torch.device("cpu"), ckpt_dir, progress=False, log=log, **kwargs)
