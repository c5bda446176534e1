"""The lab: the runs by name, sharing one dataset and one teacher. The CLI and the notebook use it."""
from __future__ import annotations

import gc
import traceback
from pathlib import Path

import torch

from kdlab.checkpoints import RunFiles, TrainedRun, train_or_load
from kdlab.config import DEFAULT_SEED, KD_SETTINGS, TEACHER_RUN, RunConfig, SpeedLevers, make_config
from kdlab.data import Splits, load_cifar10, make_splits, make_synthetic_cifar
from kdlab.errors import KdlabError
from kdlab.kept import load_kept_run
from kdlab.results import default_ckpt_dir
from kdlab.train import check_precision


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KdlabError("--device cuda was asked for but no CUDA GPU is visible to PyTorch; "
                         "use --device cpu (or auto), or on Colab: Runtime > Change runtime type > GPU.")
    if name not in ("cpu", "cuda"):
        raise KdlabError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


class Lab:
    """Runs of the lab by name, with train-or-load for each and the teacher shared by the KD runs.

    `ckpt_dir` defaults to checkpoints/, or checkpoints/smoke/ for smoke runs.
    `overrides` (epochs, image_size, seed, ...) apply to every run, but label smoothing to the
    students only; `teacher_epochs` to the teacher alone, so a KD student and its teacher can
    have different budgets. Every KD student
    distils the teacher trained with `teacher_seed`, whatever its own seed: the teacher is
    trained once for all of them. `teacher_dir` (default: `ckpt_dir`) is the teacher's folder,
    so that many students' folders can share one teacher (kdlab.sweep). `precision` (auto, bf16,
    fp16 or fp32; kdlab.train.check_precision) is how every run trains, checked against the device now;
    `speed` the speed levers (kdlab.config.SpeedLevers) every run trains with. `last_dir` (default:
    each run's checkpoint folder) holds the checkpoint rewritten after every epoch: a local disk when
    the checkpoint folder is on a drive that fails under frequent writes. `teacher_weights` is a
    folder of kept teacher weights (kdlab.kept, checkpoints/README.md): the KD runs distil from
    them, checked against the teacher's config here, and no teacher trains. `live_curves`: every
    run that trains writes its epochs for TensorBoard (kdlab.live_curves).
    """

    def __init__(self, ckpt_dir=None, data_dir="data", device="auto", smoke=False,
                 teacher_epochs=None, teacher_seed=DEFAULT_SEED, progress=None, log=print, teacher_dir=None,
                 precision="auto", speed: SpeedLevers | None = None, last_dir=None, teacher_weights=None,
                 live_curves=False,
                 **overrides):
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else default_ckpt_dir(smoke)
        self.teacher_dir = Path(teacher_dir) if teacher_dir is not None else self.ckpt_dir
        self.last_dir = Path(last_dir) if last_dir is not None else None
        self.teacher_weights = Path(teacher_weights) if teacher_weights is not None else None
        self.live_curves = live_curves
        self.data_dir = Path(data_dir)
        self.device = resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.speed = speed or SpeedLevers()
        self.smoke, self.progress, self.log = smoke, progress, log
        self.overrides = overrides
        # Label smoothing is the students' alone: a smoothed teacher distils worse (kdlab.config).
        # The KD settings are the students' too: the teacher trains with cross-entropy, so a
        # student's temperature must not make its teacher's config differ from the one trained.
        self.teacher_overrides = dict(
            overrides, epochs=teacher_epochs if teacher_epochs is not None else overrides.get("epochs"),
            label_smoothing=None, **{setting: None for setting in KD_SETTINGS})
        self.teacher_seed = teacher_seed
        self._data = None
        self._splits: dict[tuple, Splits] = {}
        self._runs: dict[tuple[str, int], TrainedRun] = {}

    def config(self, run: str, seed: int | None = None) -> RunConfig:
        """`run`'s config; `seed` (if given) replaces the lab's training seed."""
        overrides = self.teacher_overrides if run == TEACHER_RUN else self.overrides
        return make_config(run, smoke=self.smoke, **dict(overrides, **({} if seed is None else {"seed": seed})))

    def share_data_with(self, other: "Lab") -> None:
        """Use the dataset `other` has read (or will read) instead of reading it again."""
        self._data = other.data()

    def data(self):
        if self._data is None:
            self._data = make_synthetic_cifar() if self.smoke else load_cifar10(self.data_dir)
        return self._data

    def splits(self, cfg: RunConfig) -> Splits:
        key = (cfg.val_per_class, cfg.split_seed, cfg.limit_train)
        if key not in self._splits:
            self._splits[key] = make_splits(self.data(), *key, self.device)
        return self._splits[key]

    def run(self, name: str, retrain: bool = False, seed: int | None = None) -> TrainedRun:
        """Train-or-load one run (and, for a KD run that must train, its teacher first)."""
        cfg = self.config(name, seed)
        ckpt_dir = self.teacher_dir if name == TEACHER_RUN else self.ckpt_dir
        key = (name, cfg.seed)
        if key in self._runs and not retrain:
            return self._runs[key]
        if name == TEACHER_RUN and self.teacher_weights is not None:
            self._runs[key] = load_kept_run(self.teacher_weights, cfg, self.device, self.log)
            return self._runs[key]
        try:
            self._runs[key] = train_or_load(
                cfg, lambda: self.splits(cfg), self.device, ckpt_dir,
                get_teacher=lambda: self.run(TEACHER_RUN, seed=self.teacher_seed), retrain=retrain,
                progress=self.progress, log=self.log, precision=self.precision, speed=self.speed,
                last_dir=self.last_dir, live_curves=self.live_curves)
            return self._runs[key]
        except KeyboardInterrupt as interrupt:
            stopped = KeyboardInterrupt()
            # The innermost run (a teacher trained for a student) says what is saved, once.
            stopped.reported_by = getattr(interrupt, "reported_by", None) or self._report_interrupt(cfg, ckpt_dir)
        except KdlabError as error:
            stopped = KdlabError(str(error))
        except Exception as error:   # out of GPU memory, the commonest, or a fault in kdlab
            stopped = without_frames(error)
        # Raised out here, where the caught exception is gone: its traceback held the frames of the
        # run (model, optimiser state, weight average, the loader's copy of the data, the step's
        # graph), and IPython keeps the last exception, so the cell run again would hold two runs.
        release_memory()
        raise stopped

    def _report_interrupt(self, cfg: RunConfig, ckpt_dir: Path) -> str:
        last = RunFiles(ckpt_dir, cfg.run, cfg.seed, last_dir=self.last_dir).last
        saved = (f"every finished epoch is saved in {last}; run it again (the same cell "
                 f"or command) to resume" if last.exists() else "it has no finished epoch to resume from")
        self.log(f"{cfg.run_id}: interrupted; {saved}.")
        return cfg.run_id


def without_frames(error: Exception) -> Exception:
    """`error` with no traceback or chained exceptions, which hold the run's frames; where it was
    raised is kept as a note, text that holds nothing (said once, by the innermost run)."""
    if not getattr(error, "frames_released", False):
        error.add_note("Raised in the run:\n" + "".join(traceback.format_exception(error)).rstrip())
        error.frames_released = True
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def release_memory() -> None:
    """Free what unreachable objects hold now: cycles among a dead run's frames, and on CUDA the
    allocator's cached blocks (a no-op where CUDA was never used)."""
    gc.collect()
    torch.cuda.empty_cache()
