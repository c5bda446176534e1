"""Live curves: each run's per-epoch metrics as TensorBoard event files beside its checkpoints.

`<ckpt_dir>/tensorboard/<run>/`: the training loss by term and in total, the training and
validation accuracy (the weight average's, which picks the best epoch, and the raw weights'),
the validation loss and the learning rate, written after every epoch, so that TensorBoard (on
every Colab runtime: the notebook's `%tensorboard` cell) draws them while the run trains.
tensorboard is optional: without it nothing is written, and one line per process says how to
get it. A failing write (a drive that stops answering) never stops a run: it ends the curves.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

TENSORBOARD_FOLDER = "tensorboard"
INSTALL_HINT = "pip install tensorboard"
_told_missing = False   # the missing package is said once per process, not once per run


def tensorboard_dir(ckpt_dir) -> Path:
    """The folder TensorBoard's --logdir takes: one subfolder per run."""
    return Path(ckpt_dir) / TENSORBOARD_FOLDER


def has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class LiveCurves:
    """Writes one run's epochs (kdlab.train's history entries) as TensorBoard scalars, if it can."""

    def __init__(self, ckpt_dir, run_id: str, log=print):
        global _told_missing
        self.writer, self.log, self.run_id = None, log, run_id
        if not has_tensorboard():
            if not _told_missing:
                _told_missing = True
                log(f"live curves: tensorboard is not installed, so no TensorBoard curves are written "
                    f"({INSTALL_HINT} to have them); the curves are drawn from the results after each run")
            return
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(str(tensorboard_dir(ckpt_dir) / run_id))
        except OSError as err:
            self._stop(err)

    def add(self, epoch: dict) -> None:
        if self.writer is None:
            return
        step = epoch["epoch"]
        scalars = {**{f"train_loss/{name}": value for name, value in epoch["losses"].items()},
                   "train_loss/total": epoch["train_loss"], "accuracy/train": epoch["train_acc"],
                   "accuracy/val": epoch["val_acc"], "accuracy/val_raw_weights": epoch["val_acc_raw"],
                   "val_loss": epoch["val_loss"], "lr": epoch["lr"]}
        try:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as err:
            self._stop(err)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:
                pass
            self.writer = None

    def _stop(self, err: OSError) -> None:
        self.writer = None
        self.log(f"{self.run_id}: live curves stopped, their folder cannot be written "
                 f"({err.strerror or err}); training goes on")
