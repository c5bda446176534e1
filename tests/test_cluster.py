"""Sweeps on a real Ray cluster (docs/sweeps.md): a head and a worker node started on this machine
with `ray start`, Ray's token authentication on, and `python -m kdlab sweep --address` joining them.

Every node runs `ray start --block` in its own process group, with its own ports, temp dir and one
CPU, so the fixtures stop exactly the nodes they started (never `ray stop`, which stops every Ray
on the machine). The nodes advertise 127.0.0.2: Ray replaces 127.0.0.1 and localhost by the
machine's outward address, and keeps another loopback address. (Ray's servers listen on every
interface whatever the node's address.) Trials are smoke runs of the baseline on one thread: no
teacher to train. Linux only: `ray start` refuses worker nodes on macOS and Windows.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import SUBPROCESS_TIMEOUT, one_ray_at_a_time
from kdlab.cli import main
from kdlab.config import run_id
from kdlab.results import RunPaths, read_results_file
from kdlab.sweep import Trial

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="Ray runs multi-node clusters on Linux only")

REPO = Path(__file__).resolve().parents[1]
BASELINE = "student_scratch_baseline"
NODE_ADDRESS = "127.0.0.2"
SMOKE = ["--smoke", "--device", "cpu", "--batch-size", "10"]
STARTED = "Ray runtime started."
# A refused token or an unreachable head must be said within this (issue 21).
ANSWER_WITHIN_S = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(name, parent's pid, session) of process `pid`, from /proc; None if it has exited."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, parent, _, session = text[text.rindex(")") + 2:].split()[:4]
    return None if state == "Z" else (text[text.index("(") + 1:text.rindex(")")], int(parent), int(session))


def processes() -> dict[int, tuple[str, int, int]]:
    """{pid: (name, parent's pid, session)} of every process."""
    found = {int(stat.parent.name): process_stat(int(stat.parent.name)) for stat in Path("/proc").glob("[0-9]*/stat")}
    return {pid: stat for pid, stat in found.items() if stat is not None}


class RayNode:
    """One `ray start --block`: the node's processes are its children, and stop with it."""

    def __init__(self, root: Path, name: str, env: dict, *args: str):
        self.log, self.stopped = root / f"{name}.out", False
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", NODE_ADDRESS,
                   "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
                   "--temp-dir", str(root / name), "--disable-usage-stats",
                   *[arg for port in ports for arg in (port, str(free_port()))], *args]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        # `ray start` says so once the node has registered with the head.
        deadline = time.monotonic() + 120
        while STARTED not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"ray start {name} failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def raylet(self) -> int:
        return next(pid for pid, (name, parent, _) in processes().items()
                    if (name, parent) == ("raylet", self.process.pid))

    def stop(self) -> None:
        """SIGTERM: `ray start --block` stops its node's processes; then SIGKILL to any left in its
        session (Ray's workers, in process groups of their own)."""
        if self.stopped:
            return
        self.stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for pid, (_, _, session) in processes().items():
            if session == self.process.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait(60)


class Cluster:
    """A head on this machine, and worker nodes joined to it, all with one token."""

    def __init__(self, root: Path):
        self.root = root
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        # What docs/sweeps.md tells a user to export on every node and where the sweep runs.
        self.env = dict(clean_environment(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        port = free_port()
        self.address = f"{NODE_ADDRESS}:{port}"
        self.nodes = [RayNode(root, "head", self.env, "--head", "--port", str(port), "--include-dashboard", "false")]

    def add_worker(self) -> RayNode:
        node = RayNode(self.root, f"worker{len(self.nodes)}", self.env, "--address", self.address)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def clean_environment() -> dict:
    """This environment without Ray's settings (a user's token, RAY_ADDRESS), one thread each."""
    return dict({k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO))


def kdlab(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdlab", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's socket paths must fit in 107 characters: a short folder, not pytest's.
    with one_ray_at_a_time(tmp_path_factory), tempfile.TemporaryDirectory(prefix="kdlab-ray-") as root:
        started = None
        try:
            started = Cluster(Path(root))
            yield started
        finally:
            if started is not None:
                started.stop()


@pytest.fixture
def worker(cluster):
    node = cluster.add_worker()
    yield node
    node.stop()


def trial_records(out: Path) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())["trials"]


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_a_sweep_trains_on_every_node_and_says_where(cluster, worker, tmp_path, capsys):
    out = tmp_path / "sweep"
    result = kdlab("sweep", BASELINE, "--grid", "label_smoothing=0,0.1", *SMOKE, "--limit-train", "20",
                   "--epochs", "2", "--out", out, "--address", cluster.address, env=cluster.env)
    assert result.returncode == 0, result.stderr
    trials = trial_records(out)
    assert [r["status"] for r in trials] == ["trained", "trained"]
    # One CPU a node, one a trial: the two trials ran at once, one on each node.
    assert len({r["trained_on"]["ray_node_id"] for r in trials}) == 2
    for r in trials:
        assert r["trained_on"]["host"] == socket.gethostname()
        assert (r["trained_on"]["device"], r["trained_on"]["device_name"]) == ("cpu", "cpu")
        assert f"on Ray node {r['trained_on']['ray_node_id']}" in (out / r["log"]).read_text()

    assert main(["figures", "--sweep", str(out), "--out", str(tmp_path)]) == 0
    assert f"the sweep was trained on 2 nodes: {socket.gethostname()} (Ray node" in capsys.readouterr().out


def test_a_sweep_without_the_clusters_token_says_so(cluster, tmp_path):
    start = time.monotonic()
    result = kdlab("sweep", BASELINE, *SMOKE, "--out", tmp_path, "--address", cluster.address,
                   env=clean_environment())
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"kdlab: error: the Ray cluster at --address {cluster.address} refused this process")
    assert "RAY_AUTH_MODE=token" in last_line and "auth_token" in last_line
    assert elapsed < ANSWER_WITHIN_S, f"answered in {elapsed:.0f}s"


def test_an_address_nothing_answers_at_is_one_line(tmp_path, capsys, monkeypatch):
    # With token authentication on, Ray alone retries such an address for minutes.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    code = main(["sweep", BASELINE, *SMOKE, "--out", str(tmp_path), "--address", address])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"kdlab: error: nothing answers at --address {address} (") and "ray start --head" in err
    assert elapsed < ANSWER_WITHIN_S, f"answered in {elapsed:.0f}s"


def test_a_killed_worker_node_fails_its_trial_and_the_rerun_resumes_it(cluster, worker, tmp_path):
    """Two seeds at once, one per node; the worker node's raylet is killed once its trial has saved
    an epoch. The re-run, on the head alone, gives what a serial sweep of the same trials gives."""
    out = tmp_path / "cluster"
    args = [BASELINE, "--seeds", "42", "43", *SMOKE, "--limit-train", "40", "--epochs", "4"]
    sweep = subprocess.Popen([sys.executable, "-m", "kdlab", "sweep", *args, "--out", out, "--address", cluster.address],
                             cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    raylet, victim = worker.raylet(), None
    try:
        while victim is None and sweep.poll() is None:
            for seed in (42, 43):
                paths = RunPaths(out / Trial(BASELINE, seed).folder, BASELINE, seed)
                try:
                    pid = int(paths.lock_file.read_text().split()[0])
                except (OSError, ValueError, IndexError):   # not yet taken, or being written
                    continue
                stat = process_stat(pid)
                if paths.last.exists() and stat is not None and stat[1] == raylet:
                    os.kill(raylet, signal.SIGKILL)
                    victim = seed, pid
            time.sleep(0.05)
        stdout, stderr = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert victim is not None, f"the sweep ended before a trial on the worker node saved an epoch:\n{stderr}"
    seed, pid = victim
    (survivor,) = {42, 43} - {seed}   # trained on the head
    assert sweep.returncode == 2 and "1 trial(s) failed" in stderr
    first = {r["seed"]: r for r in trial_records(out)}
    assert first[survivor]["status"] == "trained" and first[seed]["status"] == "failed"
    assert first[seed]["error"].startswith("NodeDiedError") and f"seed {seed}: FAILED: NodeDiedError" in stdout
    head_node = first[survivor]["trained_on"]["ray_node_id"]
    deadline = time.monotonic() + 60   # the trial's process goes with its node
    while process_stat(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_stat(pid) is None, "the killed node's trial is still running"

    rerun = kdlab("sweep", *args, "--out", out, "--address", cluster.address, env=cluster.env)
    assert rerun.returncode == 0, rerun.stderr
    second = {r["seed"]: r for r in trial_records(out)}
    assert second[survivor]["status"] == "loaded" and second[survivor]["trained_on"]["ray_node_id"] == head_node
    assert second[seed]["status"] == "trained" and second[seed]["trained_on"]["ray_node_id"] == head_node
    # It kept the epochs it had saved: at least the one finished before the kill.
    assert int((out / second[seed]["log"]).read_text().split("resuming after epoch ")[1].split()[0]) >= 1

    threads = torch.get_num_threads()
    try:
        assert main(["sweep", *args, "--out", str(tmp_path / "serial"), "--engine", "serial"]) == 0
    finally:
        torch.set_num_threads(threads)   # the serial engine set this process's threads to one
    for s in (42, 43):
        on_cluster, serial = (read_results_file(folder / Trial(BASELINE, s).results_file, BASELINE, s)
                              for folder in (out, tmp_path / "serial"))
        assert on_cluster["test_predictions"] == serial["test_predictions"], run_id(BASELINE, s)
        assert without_timings(on_cluster["history"]) == without_timings(serial["history"])
