"""Reliability: nothing is lost on interrupts, crashes and bad input; checkpoints are data, not code.

Each test injects one fault into a tiny smoke run (synthetic data, ResNet18 at 16 px, a few
steps per epoch) and checks what is left on disk and what the user is told. Faults:
SIGKILL at seeded moments (tests/forked_kdlab.py), SIGINT, a full disk, truncated, flipped,
foreign and malicious checkpoints, non-finite losses, bad arguments and data, no network,
two processes of one run. Torch runs on one thread here: two threads on a busy 2-core machine
spin-wait for each other, and a thread count is part of what makes a CPU run reproducible.
"""
from __future__ import annotations

import errno
import gc
import json
import os
import pathlib
import pickle
import queue
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
import zipfile

import numpy as np
import pytest
import torch

import kdlab.train
from kdlab.checkpoints import RunFiles, load_checkpoint
from kdlab.cli import main
from kdlab.data import BATCHES_DIR, TEST_FILES, TRAIN_FILES
from kdlab.errors import KdlabError
from kdlab.lab import Lab
from kdlab.methods import Method

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = "student_scratch_baseline"
# In-process runs: 20 images, 2 steps per epoch, 2 epochs.
TINY = dict(limit_train=20, batch_size=10, image_size=16, epochs=2)
# The killed run: 40 images, 4 steps per epoch, 3 epochs.
KILLED = dict(limit_train=40, batch_size=10, image_size=16, epochs=3)
KILL_SEED = 2024


def run_args(ckpt_dir, run=RUN, **settings) -> list[str]:
    args = ["run", run, "--smoke", "--device", "cpu", "--ckpt-dir", str(ckpt_dir)]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def tiny_args(ckpt_dir, run=RUN, **changes) -> list[str]:
    return run_args(ckpt_dir, run, **dict(TINY, **changes))


def cli(capsys, args) -> tuple[int, str]:
    """Exit code and stderr of `python -m kdlab ARGS`, run in this process."""
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert err.startswith("kdlab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


def same_weights(path_a, path_b) -> bool:
    a, b = load_checkpoint(path_a)["modules"], load_checkpoint(path_b)["modules"]
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m]) for m in a)


def files_of(ckpt_dir, seed=42) -> dict[str, pathlib.Path]:
    files = RunFiles(pathlib.Path(ckpt_dir), RUN, seed)
    return dict(best=files.best, last=files.last, results=files.results, lock=files.lock_file)


def leftovers(ckpt_dir) -> list[str]:
    return sorted(p.name for p in pathlib.Path(ckpt_dir).iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stop_at_call(n: int, real, fault):
    """`real`, except that its n-th call first calls `fault()` (which raises or signals)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            fault()
        return real(*args, **kwargs)
    return wrapped


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run (best.pt, results) and the last.pt it had after epoch 1."""
    ckpt = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kdlab.train, "evaluate", stop_at_call(2, kdlab.train.evaluate, raise_keyboard_interrupt))
        assert main(tiny_args(ckpt)) == 130
    last_after_epoch_1 = tmp_path_factory.mktemp("saved") / "last.pt"
    shutil.copy(files_of(ckpt)["last"], last_after_epoch_1)
    assert main(tiny_args(ckpt)) == 0
    return dict(best=files_of(ckpt)["best"], last=last_after_epoch_1,
                results=json.loads(files_of(ckpt)["results"].read_text()))


# ----------------------------------------------------------------------------- SIGKILL

class ForkedKdlab:
    """tests/forked_kdlab.py in a subprocess: starts kdlab processes and reads their markers."""

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forked_kdlab.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout],
                         daemon=True).start()
        self.transcript: list[str] = []
        self.markers: list[list[str]] = []    # of the current child
        self.wait_for("ready")

    def wait_for(self, *words: str, timeout: float = 120) -> list[str]:
        """Read until the marker that starts with `words`; fail if the child ends first."""
        while True:
            line = self.lines.get(timeout=timeout)
            self.transcript.append(line)
            if not line.startswith("@ "):
                continue
            marker = line.split()[1:]
            self.markers.append(marker)
            if marker[:len(words)] == list(words):
                return marker
            if marker[0] == "exit":
                raise AssertionError(f"the run ended before '@ {' '.join(words)}':\n"
                                     + "".join(self.transcript[-30:]))

    def start(self, args: list[str], write_pause: float = 0.0) -> int:
        self.markers = []
        self.proc.stdin.write(json.dumps(dict(argv=args, write_pause=write_pause)) + "\n")
        self.proc.stdin.flush()
        return int(self.wait_for("child")[1])

    def run(self, args: list[str]) -> None:
        self.start(args)
        code = int(self.wait_for("exit")[2])
        assert code == 0, "".join(self.transcript[-30:])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forked():
    harness = ForkedKdlab()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def reference(forked, tmp_path_factory) -> pathlib.Path:
    """The uninterrupted run that the killed one must match."""
    ckpt = tmp_path_factory.mktemp("reference")
    forked.run(run_args(ckpt, **KILLED))
    return ckpt


def kill_plan(seed: int) -> list[dict]:
    """Ten kill points: three in a training step, three in validation, three in the write of an
    epoch's checkpoint, in seeded epochs, and the last in the write of the finished checkpoint."""
    rng = random.Random(seed)
    phases = ["step"] * 3 + ["validate"] * 3 + ["write"] * 3
    rng.shuffle(phases)
    epochs = sorted(rng.randint(1, KILLED["epochs"]) for _ in phases)
    steps = KILLED["limit_train"] // KILLED["batch_size"]
    plan = [dict(phase=phase, epoch=epoch, step=rng.randint(1, steps)) for phase, epoch in zip(phases, epochs)]
    plan.append(dict(phase="write best", epoch=KILLED["epochs"], step=None))
    for point in plan:
        # The delay after the marker stays well inside the phase: a step takes ~0.1 s, a
        # validation ~0.2 s, and a write is paused for 0.4 s halfway.
        point["delay"] = rng.uniform(*{"step": (0, 0.05), "validate": (0, 0.08)}.get(point["phase"], (0.05, 0.3)))
    return plan


def check_after_kill(ckpt, killed_pid: int, saved_by_child: int, reference_history) -> int:
    """Every file under a final name is readable; every epoch the child finished is on disk."""
    files = files_of(ckpt)
    finals = {p.name for p in pathlib.Path(ckpt).iterdir() if ".tmp" not in p.name}
    assert finals <= {p.name for p in files.values()}, finals
    assert files["lock"].read_text().split()[0] == str(killed_pid)   # stale, to be taken over
    on_disk = 0
    if files["last"].exists():
        last = load_checkpoint(files["last"])
        on_disk = last["epoch"]
        assert without_seconds(last["history"]) == without_seconds(reference_history[:on_disk])
    if files["results"].exists():
        json.loads(files["results"].read_text())
    if files["best"].exists():
        load_checkpoint(files["best"])
        on_disk = KILLED["epochs"]
    assert on_disk >= saved_by_child, f"epoch {saved_by_child} was saved, the folder has {on_disk}"
    return on_disk


def test_sigkill_at_ten_seeded_moments_loses_no_finished_epoch(forked, reference, tmp_path):
    reference_results = json.loads(files_of(reference)["results"].read_text())
    ckpt = tmp_path / "killed"
    args = run_args(ckpt, **KILLED)
    on_disk, landed = 0, []
    for point in kill_plan(KILL_SEED):
        phase, epoch = point["phase"], max(point["epoch"], on_disk + 1)
        if epoch > KILLED["epochs"]:       # every epoch is saved: only the final write is left
            phase = "write best"
        pid = forked.start(args, write_pause=0.4 if phase.startswith("write") else 0.0)
        if phase == "write best":
            while "_best.pt" not in forked.wait_for("write")[1]:
                pass
        else:
            forked.wait_for("epoch", str(epoch))
            for _ in range(point["step"] if phase == "step" else 1):
                forked.wait_for(phase)
        time.sleep(point["delay"])
        os.kill(pid, signal.SIGKILL)
        assert forked.wait_for("exit")[2] == str(-signal.SIGKILL)
        moments = [m[0] for m in forked.markers if m[0] in ("step", "validate", "write", "saved")]
        saved = max((int(m[1]) for m in forked.markers if m[0] == "saved"), default=0)
        on_disk = check_after_kill(ckpt, pid, saved, reference_results["history"])
        landed.append((phase, moments[-1]))
        print(f"kill {len(landed)}: aimed at {phase} of epoch {epoch}, {point['delay']:.3f} s after "
              f"the marker; last marker '{moments[-1]}'; epochs on disk: {on_disk}")
    # A write is paused halfway, so a kill aimed at it lands in it; steps and validations are
    # timed, and at least one of each must have been hit.
    assert all(last == "write" for aimed, last in landed if aimed.startswith("write"))
    assert {"step", "validate", "write"} <= {last for _, last in landed}

    forked.run(args)
    files = files_of(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([files["best"].name, files["results"].name])
    results = json.loads(files["results"].read_text())
    assert without_seconds(results["history"]) == without_seconds(reference_results["history"])
    for key in reference_results:
        if key not in ("history", "wall_seconds", "finished"):
            assert results[key] == reference_results[key], key
    assert same_weights(files["best"], files_of(reference)["best"])


def test_second_process_of_a_run_is_refused_and_its_stale_lock_taken_over(forked, tmp_path, capsys):
    args = run_args(tmp_path, **KILLED)
    pid = forked.start(args)
    try:
        forked.wait_for("epoch", "1")             # the run holds its lock while it trains
        code, err = cli(capsys, args)
    finally:
        os.kill(pid, signal.SIGKILL)
        forked.wait_for("exit")
    assert code == 2
    assert_one_line_error(err, f"already being trained by process {pid} on {socket.gethostname()}")
    files = RunFiles(tmp_path, RUN)
    with files.lock():                            # the owner is dead: its lock is taken over
        assert files.lock_file.read_text() == f"{os.getpid()} {socket.gethostname()}"
    assert not files.lock_file.exists()


def test_a_lock_the_drive_dropped_while_taking_is_not_held_by_the_kernel(tmp_path, monkeypatch):
    # The drive drops after the lock file is made, while stale temporaries are removed: the user
    # gets the storage advice, and the same kernel, the drive back, takes the lock over.
    files = RunFiles(tmp_path, RUN)
    files.last.with_name(f"{files.last.name}.tmp99999").write_bytes(b"left by a killed process")
    monkeypatch.setattr(pathlib.Path, "unlink", lambda path, missing_ok=False: (_ for _ in ()).throw(
        OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))))
    with pytest.raises(KdlabError) as refused:
        with files.lock():
            pass
    assert f"cannot write to the checkpoint folder {tmp_path}" in str(refused.value)
    assert ADVICE["ENOTCONN"] in str(refused.value)

    monkeypatch.undo()
    with files.lock():
        assert files.lock_file.read_text() == f"{os.getpid()} {socket.gethostname()}"
    assert not files.lock_file.exists() and leftovers(tmp_path) == []


def test_lock_from_another_machine_is_taken_over(tmp_path):
    # A Colab runtime that was disconnected leaves its lock on Drive; the new runtime's
    # processes, this one included, may have the same pids.
    files = RunFiles(tmp_path, RUN)
    files.lock_file.write_text(f"{os.getpid()} a-disconnected-runtime")
    with files.lock():
        assert files.lock_file.read_text() == f"{os.getpid()} {socket.gethostname()}"


def test_same_seed_gives_same_run_and_another_seed_another(forked, reference, tmp_path):
    forked.run(run_args(tmp_path / "same", **KILLED))
    forked.run(run_args(tmp_path / "other", **KILLED, seed=7))
    histories = {name: without_seconds(json.loads(files_of(tmp_path / name, seed)["results"].read_text())["history"])
                 for name, seed in (("same", 42), ("other", 7))}
    reference_history = without_seconds(json.loads(files_of(reference)["results"].read_text())["history"])
    assert histories["same"] == reference_history
    assert same_weights(files_of(tmp_path / "same")["best"], files_of(reference)["best"])
    assert histories["other"] != reference_history
    assert not same_weights(files_of(tmp_path / "other", 7)["best"], files_of(reference)["best"])


# ----------------------------------------------------------------------------- Ctrl-C

@pytest.fixture
def python_sigint():
    """SIGINT raising KeyboardInterrupt, as in a user's process: a pytest-xdist worker ignores it
    (its controller takes Ctrl-C)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_the_cli_exits_130_and_the_same_command_resumes(tmp_path, capsys, monkeypatch, tiny_run,
                                                                    python_sigint):
    # A real SIGINT, sent while epoch 2 validates; Python turns it into KeyboardInterrupt.
    monkeypatch.setattr(kdlab.train, "evaluate", stop_at_call(
        2, kdlab.train.evaluate, lambda: os.kill(os.getpid(), signal.SIGINT)))
    capsys.readouterr()
    assert main(tiny_args(tmp_path)) == 130
    out, err = capsys.readouterr()
    files = files_of(tmp_path)
    assert f"{RUN}: interrupted; every finished epoch is saved in {files['last']}" in out
    assert "to resume" in out and err.strip() == "kdlab: interrupted."   # said once, by the run
    assert load_checkpoint(files["last"])["epoch"] == 1
    assert not files["lock"].exists() and leftovers(tmp_path) == []

    monkeypatch.undo()
    assert main(tiny_args(tmp_path)) == 0
    history = json.loads(files["results"].read_text())["history"]
    assert without_seconds(history) == without_seconds(tiny_run["results"]["history"])


def test_ctrl_c_in_a_teacher_trained_for_a_student_is_reported_once(tmp_path, monkeypatch):
    monkeypatch.setattr(kdlab.train, "evaluate", stop_at_call(1, kdlab.train.evaluate, raise_keyboard_interrupt))
    log = []
    lab = Lab(tmp_path, device="cpu", smoke=True, progress=False, log=log.append, **TINY)
    with pytest.raises(KeyboardInterrupt):
        lab.run("student_scratch_kd_scores")   # trains its teacher first, which is interrupted
    said = [line for line in log if "interrupted" in line]
    assert said == ["teacher_resnet50: interrupted; it has no finished epoch to resume from."]


@pytest.mark.parametrize("moment", ["validation", "checkpoint write"])
def test_keyboard_interrupt_in_lab_run_keeps_the_last_finished_epoch(tmp_path, monkeypatch, moment, tiny_run):
    if moment == "validation":
        monkeypatch.setattr(kdlab.train, "evaluate",
                            stop_at_call(2, kdlab.train.evaluate, raise_keyboard_interrupt))
    else:
        real, calls = pathlib.Path.write_bytes, []

        def half_then_interrupt(path, data):
            calls.append(path)
            if len(calls) < 2:
                return real(path, data)
            real(path, bytes(memoryview(data)[:len(data) // 2]))
            raise KeyboardInterrupt
        monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_interrupt)
    log = []
    lab = Lab(tmp_path, device="cpu", smoke=True, progress=False, log=log.append, **TINY)
    with pytest.raises(KeyboardInterrupt):
        lab.run(RUN)
    files = files_of(tmp_path)
    assert f"{RUN}: interrupted; every finished epoch is saved in {files['last']}" in log[-1]
    assert load_checkpoint(files["last"])["epoch"] == 1
    assert not files["lock"].exists() and leftovers(tmp_path) == []

    monkeypatch.undo()
    history = lab.run(RUN).results["history"]    # the notebook cell, run again
    assert without_seconds(history) == without_seconds(tiny_run["results"]["history"])


def fail_in_step(monkeypatch, step: int, fault, held: dict | None = None) -> None:
    """The training loop's `step`-th call of train_step calls `fault()` instead; `held` gets weak
    references to what the loop holds then: the model, the optimiser, the weight average, the
    loader's padded copy of the data."""
    real, calls = kdlab.train.train_step, []

    def failing_step(method, optimizer, *args, **kwargs):
        calls.append(1)
        if len(calls) < step:
            return real(method, optimizer, *args, **kwargs)
        if held is not None:
            frame = sys._getframe(1)
            while frame.f_code.co_name != "train_epochs":
                frame = frame.f_back
            loop = frame.f_locals
            held.update({name: weakref.ref(thing) for name, thing in [
                ("student", method.student), ("method", method), ("optimizer", optimizer),
                ("weight average", loop["average"].model), ("loader's copy", loop["loader"].padded)]})
        fault()
    monkeypatch.setattr(kdlab.train, "train_step", failing_step)


def raise_diverged():
    raise KdlabError("the loss became non-finite (injected)")


def raise_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory (injected)")


@pytest.mark.parametrize("fault", [raise_keyboard_interrupt, raise_diverged, raise_out_of_memory],
                         ids=["Ctrl-C", "error", "out of memory"])
def test_a_stopped_run_releases_what_it_held_while_its_exception_is_kept(tmp_path, monkeypatch, fault):
    # IPython keeps the last exception (sys.last_value, its traceback): the frames of the run
    # must not be reachable from it, or the cell run again would hold two runs' GPU memory.
    # Running out of GPU memory is the commonest way a run stops on a T4.
    held = {}
    fail_in_step(monkeypatch, 3, fault, held)        # epoch 2's first step: epoch 1 is saved
    lab = Lab(tmp_path, device="cpu", smoke=True, progress=False, log=lambda line: None, **TINY)
    with pytest.raises((KeyboardInterrupt, KdlabError, torch.OutOfMemoryError)) as stopped:
        lab.run(RUN)
    kept = stopped.value
    gc.collect()
    assert {name for name, ref in held.items() if ref() is not None} == set()
    assert kept.__traceback__ is not None and kept.__context__ is None
    if fault is raise_diverged:
        assert str(kept) == "the loss became non-finite (injected)"
    if fault is raise_out_of_memory:    # the same error, and where it happened, as text
        assert type(kept) is torch.OutOfMemoryError and str(kept) == "CUDA out of memory (injected)"
        assert any("in failing_step" in note and "raise_out_of_memory" in note for note in kept.__notes__)

    monkeypatch.undo()
    assert lab.run(RUN).trained and load_checkpoint(files_of(tmp_path)["best"])["results"]["epochs"] == 2


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> pathlib.Path:
    """The folder of a TINY teacher, trained once for the tests that distil it."""
    ckpt = tmp_path_factory.mktemp("tiny_teacher")
    Lab(ckpt, device="cpu", smoke=True, progress=False, log=lambda line: None, **TINY).run("teacher_resnet50")
    return ckpt


@pytest.mark.parametrize("run", ["student_scratch_kd_features", "student_scratch_at"])
@pytest.mark.parametrize("fault", [raise_keyboard_interrupt, raise_diverged], ids=["Ctrl-C", "error"])
def test_a_failed_feature_run_leaves_no_hook_on_the_teacher(tmp_path, monkeypatch, tiny_teacher, run, fault):
    lab = Lab(tmp_path, device="cpu", smoke=True, progress=False, log=lambda line: None, teacher_dir=tiny_teacher,
              **TINY)
    teacher = lab.run("teacher_resnet50").model        # loaded: the object the student's run distils
    fail_in_step(monkeypatch, 2, fault)
    for attempt in range(2):                          # a retry must not add hooks either
        with pytest.raises((KeyboardInterrupt, KdlabError)):
            lab.run(run)
        hooked = [name for name, module in teacher.named_modules() if module._forward_hooks]
        assert hooked == [], f"attempt {attempt + 1}: hooks left on the teacher's {hooked}"


# ----------------------------------------------------------------------------- full disk, failing drive

# A drive that has dropped (Google Drive's mount on Colab) fails every write and removal until
# it is mounted again; a full disk or a quota fails only what would grow.
DISCONNECTS = ("ENOTCONN", "EIO", "ESTALE")
ADVICE = {
    "ENOSPC": "Free some space or choose another --ckpt-dir",
    "EFBIG": "Free some space or choose another --ckpt-dir",
    "EDQUOT": "wait a while and run the same cell or command again, or choose a --ckpt-dir "
              "(CKPT_DIR in the notebook) on the local disk",
    **{kind: "remount it, on Colab with drive.mount('/content/drive', force_remount=True), and run the "
             "same cell or command again; a run resumes after its last saved epoch" for kind in DISCONNECTS},
}


def fail_second_checkpoint_write(monkeypatch, kind: str) -> dict:
    """The checkpoint of epoch 2 fails halfway with `kind`: a real EFBIG from the kernel
    (RLIMIT_FSIZE), the others from a fake writer; after a disconnect, removals fail too, until
    the test undoes its patches (the drive mounted again). Records epoch 1's checkpoint's bytes."""
    seen = {}
    real_save_last = RunFiles.save_last
    code = getattr(errno, kind)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    def save_last(self, state):
        if state["epoch"] < 2:
            return real_save_last(self, state)
        seen["epoch_1_bytes"] = self.last.read_bytes()
        if kind != "EFBIG":
            def half_then_fail(path, data):
                with open(path, "wb") as fh:
                    fh.write(memoryview(data)[:len(data) // 2])
                if kind in DISCONNECTS:
                    monkeypatch.setattr(pathlib.Path, "unlink", refuse)
                refuse()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(pathlib.Path, "write_bytes", half_then_fail)
                return real_save_last(self, state)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(seen["epoch_1_bytes"]) // 2, limits[1]))
        try:
            return real_save_last(self, state)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(RunFiles, "save_last", save_last)
    return seen


@pytest.mark.parametrize("kind", ["ENOSPC", "EFBIG", "EDQUOT", *DISCONNECTS])
def test_failed_checkpoint_write_says_why_keeps_the_previous_one_and_the_same_command_resumes(
        tmp_path, capsys, monkeypatch, kind, tiny_run):
    seen = fail_second_checkpoint_write(monkeypatch, kind)
    code, err = cli(capsys, tiny_args(tmp_path))
    files = files_of(tmp_path)
    assert code == 2
    assert_one_line_error(err, f"could not write {files['last']} ({os.strerror(getattr(errno, kind))})",
                          "previous version of that file, if any, is intact", ADVICE[kind])
    assert files["last"].read_bytes() == seen["epoch_1_bytes"]
    assert load_checkpoint(files["last"])["epoch"] == 1 and not files["best"].exists()
    if kind not in DISCONNECTS:   # a drive that answers: the run cleaned up after itself
        assert leftovers(tmp_path) == [] and not files["lock"].exists()

    monkeypatch.undo()            # space freed, the quota back, or Drive mounted again
    assert main(tiny_args(tmp_path)) == 0
    history = json.loads(files["results"].read_text())["history"]
    assert without_seconds(history) == without_seconds(tiny_run["results"]["history"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([files["best"].name, files["results"].name])


def test_last_dir_keeps_the_epoch_checkpoints_off_the_checkpoint_folder(tmp_path, capsys, monkeypatch, tiny_run):
    drive, local = tmp_path / "drive", tmp_path / "local"
    monkeypatch.setattr(kdlab.train, "evaluate", stop_at_call(2, kdlab.train.evaluate, raise_keyboard_interrupt))
    assert main(tiny_args(drive)) == 130                    # epoch 1 saved on the drive, before --last-dir
    monkeypatch.setattr(kdlab.train, "evaluate", stop_at_call(1, kdlab.train.evaluate, raise_keyboard_interrupt))
    capsys.readouterr()
    assert main(tiny_args(drive) + ["--last-dir", str(local)]) == 130
    # The drive's checkpoint copied to the local folder, and the run resumed from it; the drive's
    # copy, the only one that outlives the runtime, stays until the run's best checkpoint is saved.
    local_last = RunFiles(drive, RUN, last_dir=local).last
    assert f"every finished epoch is saved in {local_last}" in capsys.readouterr().out
    assert load_checkpoint(local_last)["epoch"] == 1 and load_checkpoint(files_of(drive)["last"])["epoch"] == 1

    monkeypatch.undo()
    written, real_save_last = [], RunFiles.save_last
    monkeypatch.setattr(RunFiles, "save_last", lambda files, state: (written.append(files.last), real_save_last(files, state)))
    assert main(tiny_args(drive) + ["--last-dir", str(local)]) == 0
    assert written == [local_last]
    history = json.loads(files_of(drive)["results"].read_text())["history"]
    assert without_seconds(history) == without_seconds(tiny_run["results"]["history"])
    assert sorted(p.name for p in drive.iterdir()) == sorted([files_of(drive)["best"].name, files_of(drive)["results"].name])
    assert list(local.iterdir()) == []


def test_checkpoint_folders_sharing_a_last_dir_do_not_resume_each_others_runs(tmp_path, monkeypatch):
    local = tmp_path / "local"
    logs = {"first": [], "second": []}
    labs = {name: Lab(tmp_path / name, device="cpu", smoke=True, progress=False, log=log.append,
                      last_dir=local, **TINY) for name, log in logs.items()}
    monkeypatch.setattr(kdlab.train, "evaluate", stop_at_call(2, kdlab.train.evaluate, raise_keyboard_interrupt))
    with pytest.raises(KeyboardInterrupt):
        labs["first"].run(RUN)                  # epoch 1 saved in the shared folder
    monkeypatch.setattr(kdlab.train, "evaluate", stop_at_call(1, kdlab.train.evaluate, raise_keyboard_interrupt))
    with pytest.raises(KeyboardInterrupt):
        labs["second"].run(RUN)                 # its first epoch, not the first folder's second
    assert not any("resuming" in line for line in logs["second"])
    assert logs["second"][-1] == f"{RUN}: interrupted; it has no finished epoch to resume from."
    lasts = {name: RunFiles(tmp_path / name, RUN, last_dir=local).last for name in labs}
    assert lasts["first"] != lasts["second"] and lasts["first"].parent == lasts["second"].parent == local
    assert load_checkpoint(lasts["first"])["epoch"] == 1 and not lasts["second"].exists()


def test_checkpoint_on_a_disconnected_drive_is_not_called_damaged(tmp_path, capsys, monkeypatch, tiny_run):
    # Deleting the file, the advice for a damaged one, would throw away a good checkpoint.
    shutil.copy(tiny_run["last"], files_of(tmp_path)["last"])
    monkeypatch.setattr(zipfile, "ZipFile", lambda *args: (_ for _ in ()).throw(
        OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))))
    code, err = cli(capsys, tiny_args(tmp_path))
    assert code == 2
    assert_one_line_error(err, f"{files_of(tmp_path)['last']} cannot be read", ADVICE["ENOTCONN"])
    assert "delete" not in err and "corrupted" not in err


# ----------------------------------------------------------------------------- bad checkpoints

def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF     # the middle of a large file is tensor data
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which, damage, detail", [
    ("best", truncate, "zip"),
    ("best", flip_a_byte, "fails its checksum"),
    ("last", truncate, "zip"),
    ("last", lambda p: p.write_bytes(os.urandom(4096)), "zip"),
])
def test_damaged_checkpoint_is_refused_whole_and_left_alone(tmp_path, capsys, tiny_run, which, damage, detail):
    path = files_of(tmp_path)[which]
    shutil.copy(tiny_run[which], path)
    damage(path)
    damaged = path.read_bytes()
    code, err = cli(capsys, tiny_args(tmp_path))
    assert code == 2
    assert_one_line_error(err, f"{path} cannot be loaded", detail, "--retrain", "delete the file")
    assert path.read_bytes() == damaged and leftovers(tmp_path) == []
    assert not files_of(tmp_path)["lock"].exists()


def test_damaged_checkpoint_way_out_retrain(tmp_path, capsys, tiny_run):
    shutil.copy(tiny_run["best"], files_of(tmp_path)["best"])
    truncate(files_of(tmp_path)["best"])
    assert cli(capsys, tiny_args(tmp_path, epochs=1))[0] == 2
    assert cli(capsys, tiny_args(tmp_path, epochs=1) + ["--retrain"])[0] == 0
    assert load_checkpoint(files_of(tmp_path)["best"])["results"]["epochs"] == 1


def test_checkpoint_of_another_config_or_run_is_refused_naming_the_fields(tmp_path, capsys, tiny_run):
    shutil.copy(tiny_run["best"], files_of(tmp_path)["best"])
    code, err = cli(capsys, tiny_args(tmp_path, epochs=3, lr=0.1))
    assert code == 2
    assert_one_line_error(err, "was made with another config", "epochs: 2 -> 3", "lr: 0.05 -> 0.1")

    teacher_best = RunFiles(tmp_path, "teacher_resnet50").best   # the student's file, renamed
    shutil.copy(tiny_run["best"], teacher_best)
    code, err = cli(capsys, tiny_args(tmp_path, run="teacher_resnet50"))
    assert code == 2
    assert_one_line_error(err, str(teacher_best), "arch: 'resnet18' -> 'resnet50'",
                          "run: 'student_scratch_baseline' -> 'teacher_resnet50'")


@pytest.mark.parametrize("which", ["best", "last"])
def test_weights_that_do_not_fit_the_model_are_refused(tmp_path, capsys, tiny_run, which):
    # The config matches; the weights are of a 100-class head (best) or miss a tensor (last).
    state = torch.load(tiny_run[which], weights_only=True)
    student = state["modules"]["student"]
    if which == "best":
        student["fc.weight"], student["fc.bias"] = torch.zeros(100, 512), torch.zeros(100)
    else:
        del student["layer4.1.bn2.running_var"]
    path = files_of(tmp_path)[which]
    torch.save(state, path)
    code, err = cli(capsys, tiny_args(tmp_path))
    assert code == 2
    assert_one_line_error(err, f"{path} does not fit the model",
                          "size mismatch for fc.weight" if which == "best" else "layer4.1.bn2.running_var",
                          "--retrain")


class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("which", ["best", "last"])
@pytest.mark.parametrize("form", ["torch zip", "plain pickle"])
def test_malicious_checkpoint_is_not_executed(tmp_path, capsys, tiny_run, which, form):
    marker = tmp_path / "payload_ran"
    path = files_of(tmp_path / "ckpt")[which]
    path.parent.mkdir()
    state = dict(config=tiny_run["results"]["config"], modules=Payload(marker))
    if form == "torch zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    code, err = cli(capsys, tiny_args(path.parent))
    assert code == 2
    # weights_only refuses the pickled call; a file that is no zip at all never reaches pickle.
    refusal = "Unsupported global" if form == "torch zip" else "File is not a zip file"
    assert_one_line_error(err, f"{path} cannot be loaded", refusal, "--retrain", "delete the file")
    assert not marker.exists()
    # The payload is live: loading the file as code would have run it.
    if form == "torch zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


# ----------------------------------------------------------------------------- NaN

@pytest.mark.parametrize("fault, message", [
    ("nan loss at epoch 2 step 2", f"{RUN}: the loss became non-finite at epoch 2, step 2 (terms {{'ce': nan}})"),
    ("lr 1e30", f"{RUN}: the loss became non-finite at epoch 1, step 2"),
    ("lr 1e30, one step per epoch", f"{RUN}: the validation loss became nan at epoch 1: the weights diverged"),
])
def test_non_finite_loss_stops_the_run_keeping_the_last_good_epoch(tmp_path, capsys, monkeypatch, fault, message):
    args = tiny_args(tmp_path)
    if fault.startswith("nan loss"):
        real, calls = Method.forward_train, []

        def poisoned(method, images, targets, epochs_done):     # the 4th step is epoch 2's second
            calls.append(1)
            logits, losses = real(method, images, targets, epochs_done)
            return logits, {k: v * float("nan") for k, v in losses.items()} if len(calls) == 4 else losses
        monkeypatch.setattr(Method, "forward_train", poisoned)
    else:
        args = tiny_args(tmp_path, lr=1e30, batch_size=20 if "one step" in fault else 10)
    code, err = cli(capsys, args)
    files = files_of(tmp_path)
    assert code == 2
    assert_one_line_error(err, message, "Nothing from this epoch was saved", "--retrain")
    assert not files["best"].exists() and not files["lock"].exists() and leftovers(tmp_path) == []
    if fault.startswith("nan loss"):
        last = load_checkpoint(files["last"])
        assert last["epoch"] == 1 and f"the checkpoint of epoch 1 stays in {files['last']}" in err
        for states in (last["modules"], last["best_modules"]):
            assert all(torch.isfinite(t).all() for t in states["student"].values() if t.is_floating_point())
        assert all(np.isfinite(h["val_loss"]) and np.isfinite(h["train_loss"]) for h in last["history"])
    else:
        assert not files["last"].exists() and "no epoch had finished, so there is no checkpoint" in err


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, needle", [
    (["run", "no_such_run"], "unknown run no_such_run"),
    (["--epochs", "-1"], "epochs must be at least 1, got -1"),
    (["--teacher-epochs", "0"], "teacher epochs must be at least 1"),
    (["--temperature", "0"], "temperature must be positive"),
    (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
    (["--alpha", "-0.1"], "alpha must be in [0, 1], got -0.1"),
    (["--image-size", "0"], "image size must be at least 16 px, got 0"),
    (["--batch-size", "0"], "batch size must be positive"),
    (["--limit-train", "-5"], "limit-train must be 0"),
    (["--lr", "0"], "learning rate must be positive"),
    (["--hint-layer", "fc"], "hint layer must be among layer1, layer2, layer3, layer4, got fc"),
    (["--attention-stages", "layer2", "layer5"], "attention stages must be among layer1, layer2, layer3, layer4"),
    (["--beta", "2"], "--beta is a setting of decoupled KD, which none of the runs named uses"),
])
def test_bad_argument_gives_one_line_and_exit_2(tmp_path, capsys, change, needle):
    # A KD run of each method whose settings are checked; all are refused before anything trains.
    args = tiny_args(tmp_path)
    args[2:2] = ["student_scratch_kd_scores", "student_scratch_kd_features", "student_scratch_at"]
    if change[0] == "run":
        args[:2] = change
    else:
        args += change
    code, err = cli(capsys, args)
    assert code == 2
    assert_one_line_error(err, needle)


@pytest.mark.parametrize("change, needle", [
    (["--weights", "imagenet21k"], "invalid choice"), (["--device", "tpu"], "invalid choice"),
    (["--gamma", "2"], "unrecognized arguments: --gamma 2; the method settings are --temperature, --alpha"),
])
def test_wrong_choice_or_unknown_option_is_argparses_error_on_one_line(tmp_path, capsys, change, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path) + change)
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    code, err = cli(capsys, tiny_args(tmp_path) + ["--device", "cuda"])
    assert code == 2
    assert_one_line_error(err, "no CUDA GPU is visible", "--device cpu")


def test_checkpoint_folder_that_cannot_be_made_exits_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code, err = cli(capsys, tiny_args(tmp_path / "a_file" / "ckpt"))
    assert code == 2
    assert_one_line_error(err, f"cannot write to the checkpoint folder {tmp_path / 'a_file' / 'ckpt'}")


def cifar_batch(images: np.ndarray, labels) -> bytes:
    return pickle.dumps({b"data": images, b"labels": list(labels)})


GOOD_BATCH = cifar_batch(np.zeros((10, 3072), np.uint8), range(10))


@pytest.mark.parametrize("content, needle", [
    (b"not a pickle", "is not a readable CIFAR-10 batch"),
    (cifar_batch(np.zeros((10, 1024), np.uint8), range(10)), "expected uint8 images of shape (N, 3072)"),
    (cifar_batch(np.zeros((10, 3072), np.float32), range(10)), "expected uint8 images"),
    (cifar_batch(np.zeros((10, 3072), np.uint8), range(9)), "10 images but 9 labels"),
    (cifar_batch(np.zeros((10, 3072), np.uint8), range(1, 11)), "labels must be in 0..9, found 1..10"),
])
def test_data_folder_with_wrong_contents_exits_2(tmp_path, capsys, no_network, content, needle):
    folder = tmp_path / "data" / BATCHES_DIR
    folder.mkdir(parents=True)
    for name in TRAIN_FILES + TEST_FILES:
        (folder / name).write_bytes(GOOD_BATCH)
    (folder / TRAIN_FILES[0]).write_bytes(content)
    args = tiny_args(tmp_path / "ckpt") + ["--data-dir", str(tmp_path / "data")]
    args.remove("--smoke")
    code, err = cli(capsys, args)
    assert code == 2
    assert_one_line_error(err, str(folder / TRAIN_FILES[0]), needle)
    assert no_network == [] and not files_of(tmp_path / "ckpt")["lock"].exists()


def test_missing_data_offline_exits_2_naming_the_folder(tmp_path, capsys, no_network):
    args = tiny_args(tmp_path / "ckpt") + ["--data-dir", str(tmp_path / "data")]
    args.remove("--smoke")
    code, err = cli(capsys, args)
    assert code == 2
    assert_one_line_error(err, f"CIFAR-10 is not in {tmp_path / 'data' / BATCHES_DIR}",
                          "the download failed", "--data-dir", "--smoke")
    assert no_network, "the lab should have tried to download"
    assert not (tmp_path / "data").exists() and not (tmp_path / "ckpt").exists(), "no empty folders left"


def test_imagenet_weights_offline_give_a_clear_error(tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    code, err = cli(capsys, tiny_args(tmp_path / "ckpt", run="student_pretrained_baseline", weights="imagenet"))
    assert code == 2
    assert_one_line_error(err, "the ImageNet weights of resnet18", "resnet18-f37072fd.pth",
                          "resnet50-11ad3fa6.pth", str(tmp_path / "torch_home" / "hub" / "checkpoints"),
                          "--weights none")
    assert no_network, "torchvision should have tried to download"
    assert [p for p in (tmp_path / "torch_home").rglob("*") if p.is_file()] == []
    assert not (tmp_path / "ckpt").exists(), "a failed run leaves no empty folder"
