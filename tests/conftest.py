import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_kdlab(*args, check=True, env=None, timeout=None):
    """`python -m kdlab ARGS` in a subprocess, as a user runs it; returns the CompletedProcess.

    No timeout by default: on a busy shared machine the smoke lab can take minutes, and a slow
    machine must not turn into failed tests.
    """
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
