import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_kdlab(*args, check=True, env=None, timeout=600):
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
