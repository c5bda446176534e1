"""Train-or-load: every run has a checkpoint; if it is there it is loaded, else the run trains.

Files of a run in the checkpoint folder:
  <run>_best.pt       written once, when the run has finished: best-on-val weights, config, results
  <run>_last.pt       the state after the last finished epoch (weights, optimiser, scaler, RNG,
                      history, best-so-far weights); removed when the run finishes. In a
                      last_dir, <run>_<folder>_last.pt, <folder> a digest of the checkpoint folder's path
  <run>_results.json  the results, for figures and the report
  <run>.lock          held while the run trains, with the owner's pid and host
Every write goes to a temporary file first and is renamed over the final name, so a crash
or a full disk never leaves a half-written file under a final name. Loading checks the
zip's checksums and uses `weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from kdlab.config import DEFAULT_SEED, TEACHER_RUN, RunConfig, SpeedLevers, config_dict, config_differences
from kdlab.data import CLASSES
from kdlab.results import RunPaths
from kdlab.errors import KdlabError
from kdlab.folders import DISCONNECTED, no_empty_folders_left, storage_advice
from kdlab.methods import build_method
from kdlab.models import build_model, count_parameters, load_weights, tensors_sha256
from kdlab.train import AUTOCAST_DTYPES, accuracy, predict_views, resolve_precision, train_epochs


CKPT_DIR_OPTION = "--ckpt-dir (CKPT_DIR in the notebook)"


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`; on any failure the old file is untouched."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_if_possible(tmp)
        raise KdlabError(f"could not write {path} ({err.strerror or err}); the previous version "
                         f"of that file, if any, is intact. {storage_advice(err, CKPT_DIR_OPTION)}") from None
    except BaseException:
        _remove_if_possible(tmp)
        raise


def _remove_if_possible(path: Path) -> None:
    """A drive that has stopped answering refuses this too; the next lock() sweeps what is left."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through memory: torch's own file writer turns a full disk into an obscure
    RuntimeError, Python's write gives the OSError that atomic_write reports."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain data. Corrupted, truncated or code-carrying files are refused whole."""
    try:
        # torch.load does not check the zip's CRC-32s: a flipped byte would load as a wrong weight.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"{damaged} fails its checksum")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        if isinstance(err, OSError) and err.errno in DISCONNECTED:   # the file may be fine: the drive is not
            raise KdlabError(f"{path} cannot be read ({err.strerror}). "
                             f"{storage_advice(err, CKPT_DIR_OPTION)}") from None
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # torch's weights-only refusal is a long text; the line that names the cause is enough.
        detail = next((line for line in lines if "Unpickler error" in line), lines[0])
        raise KdlabError(f"{path} cannot be loaded: it is corrupted, truncated or not a kdlab "
                         f"checkpoint ({detail[:300]}). Either run again with --retrain to "
                         f"train this run from the start, or delete the file.") from None
    if not isinstance(state, dict) or "config" not in state:
        raise KdlabError(f"{path} is not a kdlab checkpoint (no config in it). Either run again "
                         f"with --retrain, or delete the file.")
    return state


# The lock files this process holds. Another with this process's pid is stale: one of its runs
# could not remove it (the drive had stopped answering), and the same cell run again takes it over.
_HELD_LOCKS: set[Path] = set()


@dataclass
class RunFiles(RunPaths):
    """A run's files, and the writes that keep them consistent."""
    config: dict | None = None      # stored in every last checkpoint
    last_dir: Path | None = None    # where <run>_last.pt goes, if not in ckpt_dir

    @property
    def last(self) -> Path:
        if self.last_dir is None:
            return self.ckpt_dir_last
        # Checkpoint folders sharing one last_dir must not resume from, or overwrite, each other's
        # runs. The absolute path, not the resolved one: resolving asks a drive that may be down.
        folder = hashlib.sha1(os.path.abspath(self.ckpt_dir).encode()).hexdigest()[:8]
        return self.last_dir / f"{self.stem}_{folder}_last.pt"

    @property
    def ckpt_dir_last(self) -> Path:
        return RunPaths(self.ckpt_dir, self.run, self.seed).last

    def save_last(self, state: dict) -> None:
        state.update(config=self.config, rng=torch.get_rng_state())
        save_checkpoint(self.last, state)

    def take_last_from_ckpt_dir(self) -> None:
        """Copy a last checkpoint saved in ckpt_dir (before last_dir was set) to last_dir, to resume
        from. The copy in ckpt_dir stays until the run has finished (remove_last): a last_dir on
        the runtime's disk does not outlive the runtime."""
        saved = self.ckpt_dir_last
        if saved != self.last and saved.exists() and not self.last.exists():
            atomic_write(self.last, lambda tmp: shutil.copyfile(saved, tmp))

    def remove_last(self) -> None:
        """Once the best checkpoint is saved: the last checkpoint, and the one in ckpt_dir resumed from."""
        for path in (self.last, self.ckpt_dir_last):
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self):
        """Only one process trains a run in a folder; a lock left by a dead process is taken over."""
        try:
            self.last.parent.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            fd = self._create_lock()
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"{os.getpid()} {socket.gethostname()}")
                for final in (self.best, self.last, self.results):   # not another seed's files
                    for stale in final.parent.glob(f"{final.name}.tmp*"):
                        stale.unlink(missing_ok=True)            # left by a process killed mid-write
            except BaseException:
                _remove_if_possible(self.lock_file)
                raise
        except OSError as err:
            raise KdlabError(f"cannot write to the checkpoint folder {self.ckpt_dir} ({err.strerror or err}). "
                             f"{storage_advice(err, CKPT_DIR_OPTION)}") from None
        # Registered only now: a lock this process failed to take, left on a drive that dropped,
        # is stale to the next run in the same kernel, not one "already being trained" by itself.
        _HELD_LOCKS.add(self.lock_file)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(self.lock_file)
            _remove_if_possible(self.lock_file)   # the error that stopped the run is the one to report

    def _create_lock(self) -> int:
        while True:
            try:
                return os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _lock_owner(self.lock_file)
                if owner is not None and _alive(*owner, self.lock_file):
                    raise KdlabError(f"{self.stem} is already being trained by process {owner[0]} on "
                                     f"{owner[1]} (lock {self.lock_file}). Wait for it to finish, or "
                                     f"stop it; if no such run is going on, delete the lock file.") from None
                self.lock_file.unlink(missing_ok=True)  # stale: its owner is gone


def _lock_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) of the lock's owner; None if the lock is unreadable (its owner died writing it)."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str, lock_file: Path) -> bool:
    if host != socket.gethostname():
        # A process on another machine cannot be asked. The usual case is a Colab runtime that
        # was disconnected: its folder on Drive outlives it, and the new runtime's processes may
        # even reuse its pids.
        return False
    if pid == os.getpid():
        return lock_file in _HELD_LOCKS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True   # it answered, or refused us (EPERM): either way the process exists


def check_config(stored: dict, cfg: RunConfig, path: Path) -> None:
    diffs = config_differences(stored, cfg)
    if diffs:
        raise KdlabError(f"{path} was made with another config ({'; '.join(diffs)}). Run with the "
                         f"settings it was made with, or with --retrain to train it again "
                         f"(the file is replaced), or delete it.")


@dataclass
class TrainedRun:
    model: nn.Module       # the student (or teacher), best-on-val weights, eval mode, on the device
    results: dict
    trained: bool          # False when the finished checkpoint was loaded


def train_or_load(cfg: RunConfig, get_splits, device: torch.device, ckpt_dir: str | Path,
                  get_teacher=None, retrain: bool = False, progress=None, log=print,
                  precision: str = "auto", speed: SpeedLevers = SpeedLevers(),
                  last_dir: str | Path | None = None, live_curves: bool = False) -> TrainedRun:
    """Load the finished run from `ckpt_dir`, or resume it, or train it (in `precision`, see
    kdlab.train.resolve_precision, with the `speed` levers); then return it.

    `get_splits()` and `get_teacher()` are called only if the run must train, so loading a
    finished run needs neither the data nor the teacher. `last_dir` (default: `ckpt_dir`) holds
    the checkpoint rewritten after every epoch; `live_curves` writes each epoch as TensorBoard
    scalars into <ckpt_dir>/tensorboard/<run> (kdlab.live_curves).
    """
    files = RunFiles(Path(ckpt_dir), cfg.run, cfg.seed, config_dict(cfg),
                     Path(last_dir) if last_dir else None)
    if not retrain and files.best.exists():
        state = load_checkpoint(files.best)
        check_config(state["config"], cfg, files.best)
        model = build_model(cfg.arch, "none")
        load_weights(model, state["modules"]["student"], files.best)
        if not files.results.exists():
            write_json(files.results, state["results"])
        log(f"{cfg.run_id}: loaded {files.best} (test accuracy {state['results']['test_acc']:.4f})")
        return TrainedRun(model.to(device, memory_format=torch.channels_last).eval(), state["results"],
                          trained=False)

    with no_empty_folders_left(files.ckpt_dir), no_empty_folders_left(files.last.parent), files.lock():
        files.take_last_from_ckpt_dir()
        if retrain:
            for path in (files.best, files.last, files.ckpt_dir_last, files.results):
                path.unlink(missing_ok=True)
        resume = None
        if files.last.exists():
            resume = load_checkpoint(files.last)
            check_config(resume["config"], cfg, files.last)
            log(f"{cfg.run_id}: resuming after epoch {resume['epoch']} from {files.last}")
        splits = get_splits()
        teacher = get_teacher() if cfg.uses_teacher else None
        # Seeded after the teacher, which may have trained just now and drawn from the same RNG.
        torch.manual_seed(cfg.seed)
        # A resumed run gets its weights from the checkpoint: no ImageNet download needed.
        student = build_model(cfg.arch, cfg.weights if resume is None else "none").to(device)
        method = build_method(cfg, student, teacher.model if teacher else None)
        try:   # the method's hooks come off the teacher, which the Lab keeps, whatever happens
            method.to(device, memory_format=torch.channels_last)
            if resume is not None:
                torch.set_rng_state(resume["rng"])
            precision = resolve_precision(precision, device)
            history, best_modules = train_epochs(cfg, method, splits, device, files, resume, progress, log,
                                                 precision, speed, live_curves)
            results = _results(cfg, method, splits, device, precision, speed, history, best_modules, teacher)
        finally:
            method.close()
        modules = {k: m.state_dict() for k, m in method.trained_modules().items()}
        write_json(files.results, results)
        save_checkpoint(files.best, dict(modules=modules, config=config_dict(cfg), results=results))
        files.remove_last()
    log(f"{cfg.run_id}: test accuracy {results['test_acc']:.4f} (best val {results['best_val_acc']:.4f}"
        f" at epoch {results['best_epoch']}); saved {files.best}")
    return TrainedRun(student.eval(), results, trained=True)


# The test images whose logits a teacher's results file keeps, for the figure of what the teacher
# knows (kdlab.figures.plot_soft_targets): the first test image of each of these classes that the
# teacher classifies right (or its first, if none). Two pairs of look-alike classes, whose likeness
# its softened outputs show.
SOFT_TARGET_CLASSES = ("cat", "dog", "automobile", "truck")


def soft_target_examples(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Test images (uint8, base64) with their label and the model's logits, one per SOFT_TARGET_CLASSES
    class the test set has."""
    right = logits.argmax(1) == labels
    examples = []
    for name in SOFT_TARGET_CLASSES:
        members = labels == CLASSES.index(name)
        hits = torch.nonzero(members & right).flatten()
        candidates = hits if len(hits) else torch.nonzero(members).flatten()
        if len(candidates):
            i = int(candidates[0])
            examples.append(dict(test_index=i, label=CLASSES.index(name), logits=logits[i].tolist(),
                                 image=base64.b64encode(images[i].cpu().numpy().tobytes()).decode()))
    return examples


def _results(cfg, method, splits, device, precision, speed, history, best_modules, teacher) -> dict:
    """The results of a finished run; loads the best-on-val state into the trained modules.

    Four test figures: the weight average at its best epoch and the raw weights after the last
    epoch, each on one view and with flip test-time augmentation. `test_acc` is the lab's choice
    (the average; flip if `cfg.flip_tta`), and what runs are compared on.
    """
    dtype = AUTOCAST_DTYPES[precision]
    best = max(history, key=lambda h: h["val_acc"])
    images, labels = splits.test
    raw = predict_views(method.student, images, cfg.image_size, dtype, speed.eval_batch_size)
    modules = method.trained_modules()
    for name, module in modules.items():
        module.load_state_dict(best_modules[name])
    averaged = predict_views(method.student, images, cfg.image_size, dtype, speed.eval_batch_size)
    test_logits = averaged["flip" if cfg.flip_tta else "single"]
    test_labels = labels.to(test_logits.device)
    extra = [m for k, m in modules.items() if k != "student"]
    return dict(
        run=cfg.run, seed=cfg.seed,
        test_acc=accuracy(test_logits, test_labels),
        test_acc_by_evaluation={f"{weights}_{view}": accuracy(logits, test_labels)
                                for weights, views in (("average", averaged), ("raw", raw))
                                for view, logits in views.items()},
        test_loss=torch.nn.functional.cross_entropy(test_logits, test_labels).item(),
        best_val_acc=best["val_acc"], best_epoch=best["epoch"], epochs=cfg.epochs,
        history=history, config=config_dict(cfg), weights=cfg.weights, smoke=cfg.smoke,
        data=splits.source, n_train=len(splits.train[1]), n_val=len(splits.val[1]),
        n_test=len(test_labels),
        parameters=count_parameters(method.student),
        weights_sha256=tensors_sha256(method.student.state_dict()),   # its students record the same: one teacher
        extra_training_parameters=sum(count_parameters(m) for m in extra),
        teacher=dict(run=teacher.results["run"], seed=teacher.results.get("seed", DEFAULT_SEED),
                     test_acc=teacher.results["test_acc"],
                     # which teacher: runs distilled from different teachers are told apart by it
                     weights_sha256=teacher.results.get("weights_sha256") or tensors_sha256(teacher.model.state_dict()))
        if teacher else None,
        test_predictions=test_logits.argmax(1).tolist(),
        test_labels=test_labels.tolist(),  # with the predictions: confusion matrices need no data
        **({"soft_target_examples": soft_target_examples(test_logits, images, test_labels)}
           if cfg.run == TEACHER_RUN else {}),
        device=str(device), precision=precision,   # of the last session, if it resumed in another
        speed_levers=dataclasses.asdict(speed),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_version=str(torch.__version__), torchvision_version=str(torchvision.__version__),
        wall_seconds=sum(h["seconds"] for h in history),
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
