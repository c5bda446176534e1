import dataclasses
import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.checkpoints import train_or_load
from kdlab.config import make_config
from kdlab.data import make_splits, make_synthetic_cifar

REPO = Path(__file__).resolve().parents[1]
# ci_skips: no skip under CI=true outside its list; pytester: tests/test_suite.py runs pytest itself.
pytest_plugins = ["ci_skips", "pytester"]


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


@pytest.fixture(scope="session")
def smoke_lab(tmp_path_factory):
    """The six runs of the lab trained once in smoke mode, shared by every test that reads them."""
    ckpt_dir = tmp_path_factory.mktemp("smoke_ckpt")
    result = run_kdlab("run", "all", "--smoke", "--ckpt-dir", ckpt_dir)
    return ckpt_dir, result


@pytest.fixture(scope="session")
def executed_notebook(tmp_path_factory, smoke_lab):
    """The notebook executed headless once per session, on the smoke lab (tests/test_notebook.py
    says how); shared by the notebook's tests and the teaching tests."""
    from test_notebook import execute_once

    return execute_once(tmp_path_factory, smoke_lab)


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
