"""The training loop: one epoch of batches from the device loader, validation, checkpoints.

Everything a reader needs is in `train_epochs`: the loop, the mixed precision, the LR
schedule and the per-epoch checkpoint write. Metrics stay on the device until the epoch ends,
so the step never waits for the host.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import TqdmWarning

with warnings.catch_warnings():
    # In a Jupyter without ipywidgets, tqdm.auto warns "IProgress not found" and falls back to
    # text bars, which serve the notebook as well.
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

from kdlab.config import EVAL_BATCH_SIZE, SpeedLevers
from kdlab.data import DeviceLoader, preprocess
from kdlab.errors import KdlabError
from kdlab.live_curves import LiveCurves
from kdlab.models import build_model, load_weights

# Fewer optimizer steps than this per epoch (a small --limit-train at batch 512) leave warmup and
# cosine decay a handful of steps: the loss rises and accuracy stays near chance.
MIN_STEPS_PER_EPOCH = 20
# An fp16 loss scaler skips a step whose gradients overflowed and halves its scale: a few skips
# while the scale settles are normal; more than this share of an epoch's steps is said in the log.
SKIPPED_STEPS_WARNING = 0.05
# How the compile lever (SpeedLevers.compile_step) compiles the training forward.
COMPILE_OPTIONS = dict(mode="reduce-overhead")


# The autocast dtype of each precision (fp32: autocast off). A precision is a runtime choice,
# like the device, not part of a run's config: a run begun in bf16 may resume on a GPU without it.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def has_native_bf16(device: torch.device) -> bool:
    """Ampere and newer. Not `torch.cuda.is_bf16_supported()`: it counts emulated bf16 and says
    yes on a T4, where cuDNN has no bf16 convolutions and every ResNet layer would fall back to a
    slow kernel."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on Ampere and newer (no scaler needed), fp16 on older GPUs (T4), fp32 on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def resolve_precision(name: str, device: torch.device) -> str:
    """"bf16", "fp16" or "fp32": `name` itself, or for "auto" autocast_dtype's choice on `device`."""
    if name == "auto":
        return next(key for key, dtype in AUTOCAST_DTYPES.items() if dtype == autocast_dtype(device))
    if name not in AUTOCAST_DTYPES:
        raise KdlabError(f"precision must be auto, bf16, fp16 or fp32, got {name!r}")
    return name


def check_precision(name: str, device: torch.device) -> str:
    """resolve_precision, refusing what `device` has no good use for: the switch the Lab (and so
    the CLI and the notebook) offers. The training functions take any precision autocast has,
    so the tests run fp16 and its loss scaler on the CPU."""
    precision = resolve_precision(name, device)
    if precision == "fp16" and device.type != "cuda":
        raise KdlabError("--precision fp16 needs a CUDA GPU: it is the path of GPUs without bf16 (a T4), "
                         "with a loss scaler. On a CPU use --precision fp32 or auto.")
    if precision == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise KdlabError(f"--precision bf16: the {torch.cuda.get_device_name(device)} (compute capability "
                         f"{major}.{minor}) has no native bf16 convolutions, and emulated ones are slower "
                         f"than fp32. Use --precision fp16 (with a loss scaler) or auto.")
    return precision


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, active only for fp16, whose small range would flush small gradients to zero."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def tune_cudnn(device: torch.device) -> None:
    """Let cuDNN time its convolution algorithms on the first batch of each shape and keep the fastest.

    Every training batch has one shape (the loader drops the ragged last batch), so the search
    is paid once per run; benchmarks/throughput.py measures what it buys on the GPU at hand.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `peak`, then cosine decay to zero: a function of the step, so resuming is exact."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def onednn_where_it_computes(images: torch.Tensor, dtype: torch.dtype | None):
    """oneDNN off for the block where it would train on garbage: in bf16 on the CPU at 16 px or fewer.

    oneDNN (seen in torch 2.14's CPU build) computes the bf16 weight gradient of a 3x3 stride-2
    convolution over a 1x1 map from uninitialised memory, now and then inf. A ResNet's layer4 meets
    such a map at 16 px or fewer (--smoke's size); there torch's own kernels take the step (a smoke
    run about 1.5 times slower). At the lab's sizes oneDNN stays on.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled and not (
        images.device.type == "cpu" and dtype == torch.bfloat16 and images.shape[-1] <= 16)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def train_step(method, optimizer, scaler, images, targets, dtype, epochs_done: float, forward=None):
    """One optimisation step on a batch of the device loader, `epochs_done` epochs into training;
    returns the logits, the loss terms, and whether the loss scaler skipped the update (a 0/1
    tensor on the device; None without a scaler). `forward`: method.forward_train, or a compiled one."""
    with onednn_where_it_computes(images, dtype):
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits, losses = (forward or method.forward_train)(images, targets, epochs_done)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
    scaler.step(optimizer)
    # The scaler's own inf/nan flag, read where it lies (on the device: no sync) before update()
    # clears it. Comparing the scale before and after would need a copy each step, and would stop
    # counting once a collapsing scale has underflowed to zero, the case that must be seen.
    skipped = sum(scaler._found_inf_per_device(optimizer).values()) if scaler.is_enabled() else None
    scaler.update()
    return logits, losses, skipped


class TrainStep:
    """train_step for one run: its method, optimizer, scaler and autocast dtype.

    With `compile_step` (a speed lever) the forward is compiled (COMPILE_OPTIONS). torch compiles
    inside the steps (the backward at its first backward pass, and again when a method reads
    `epochs_done` and it changes), so a step that fails while compiled is run again eagerly, and
    every later one too, after one log line: it failed before the optimizer's update, though its
    BatchNorm statistics may have moved one batch more. A step that fails eagerly raises.
    """

    def __init__(self, method, optimizer, scaler, dtype, compile_step: bool = False, log=print):
        self.method, self.optimizer, self.scaler, self.dtype, self.log = method, optimizer, scaler, dtype, log
        self.compiled = torch.compile(method.forward_train, **COMPILE_OPTIONS) if compile_step else None

    def __call__(self, images, targets, epochs_done: float):
        args = (self.method, self.optimizer, self.scaler, images, targets, self.dtype, epochs_done)
        if self.compiled is not None:
            try:
                return train_step(*args, forward=self.compiled)
            except Exception as err:  # noqa: BLE001 - whatever the compiler raised, the eager step is the answer
                self.compiled = None
                cause = getattr(err, "inner_exception", None) or err   # the backend's own error, if dynamo wrapped it
                detail = (str(cause).strip().splitlines() or [""])[0][:200]
                self.log(f"torch.compile failed ({type(cause).__name__}: {detail}); training without it")
        return train_step(*args)


def make_optimizer(cfg, method, fused: bool = False, log=print):
    """Nesterov SGD over the trained modules; `fused` (a speed lever): torch's fused kernel, or,
    where this torch has none, its default (foreach on a GPU) after one log line."""
    params = [p for m in method.trained_modules().values() for p in m.parameters()]
    settings = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    if fused:
        try:
            optimizer = torch.optim.SGD(params, **settings, fused=True)
        except (TypeError, RuntimeError) as err:
            log(f"fused SGD is not available here ({type(err).__name__}: {err}); training with torch's default SGD")
        else:
            # torch's fused SGD makes its momentum buffers with empty_like at its first step and fills
            # them in the kernel, which a loss scaler's skipped step skips (fp16's first steps often
            # are): the momentum would stay uninitialised memory (tests/test_precision.py). Zeros give
            # the same first update (no dampening: the buffer becomes the gradient either way).
            for param in params:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
            return optimizer
    return torch.optim.SGD(params, **settings)


def load_optimizer_state(optimizer, state: dict) -> None:
    """`state`'s momentum and settings, keeping `optimizer`'s implementation (fused or foreach):
    a speed lever of this session, which a checkpoint saved with another must not switch."""
    implementation = [{k: group[k] for k in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, implementation):
        group.update(kept)


class WeightAverage:
    """An exponential moving average of the student's weights and BatchNorm statistics.

    Updated after every optimiser step: ema = d * ema + (1 - d) * weights, with d ramped up as
    min(decay, (1 + t) / (10 + t)) at update t, so the average forgets the random start quickly
    (TensorFlow's ExponentialMovingAverage with num_updates). The ramp depends on the step alone,
    so a resumed run averages exactly as an uninterrupted one. Integer buffers (BN's batch count)
    are copied.
    """

    def __init__(self, cfg, student: nn.Module):
        self.decay = cfg.ema_decay
        self.model = build_model(cfg.arch, "none").to(next(student.parameters()).device,
                                                      memory_format=torch.channels_last)
        self.model.load_state_dict(student.state_dict())
        self.model.eval().requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), student.state_dict().values()))
        self._floats = [(a, w) for a, w in pairs if a.is_floating_point()]
        self._others = [(a, w) for a, w in pairs if not a.is_floating_point()]

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, update: int) -> None:
        averaged, current = zip(*self._floats)
        torch._foreach_lerp_(list(averaged), list(current), 1 - self.decay_at(update))
        for a, w in self._others:
            a.copy_(w)


def train_epochs(cfg, method, splits, device, files, resume=None, progress=None, log=print, precision="auto",
                 speed=SpeedLevers(), live_curves=False):
    """Train `method` for the epochs `cfg` asks for, from `resume` (a last checkpoint) if given,
    in `precision` (kdlab.train.AUTOCAST_DTYPES, or "auto"), with the `speed` levers asked for.

    After each epoch: validate the weight average (on both mirror views if `cfg.flip_tta`), keep
    the best-on-val average, save the last state. Returns the history, one dict per epoch, and
    the best state of each trained module (the student's is the average's); the trained modules
    keep the raw weights of the last epoch.
    """
    tune_cudnn(device)
    modules = method.trained_modules()

    def log_run(message: str) -> None:
        log(f"{cfg.run_id}: {message}")

    optimizer = make_optimizer(cfg, method, speed.fused_sgd, log_run)
    precision = resolve_precision(precision, device)
    dtype = AUTOCAST_DTYPES[precision]
    scaler = make_scaler(device, dtype)
    take_step = TrainStep(method, optimizer, scaler, dtype, speed.compile_step, log_run)
    average = WeightAverage(cfg, method.student)
    loader = DeviceLoader(*splits.train, cfg.batch_size, cfg.image_size, cfg.seed)
    steps, total_steps = len(loader), cfg.epochs * len(loader)
    warmup_steps = max(1, round(cfg.warmup_epochs * steps))
    history, best_modules = [], None
    if resume is not None:
        for name, module in modules.items():
            load_weights(module, resume["modules"][name], files.last)
        load_weights(average.model, resume["average"], files.last)
        load_optimizer_state(optimizer, resume["optimizer"])
        if scaler.is_enabled() and resume["scaler"]:   # a run begun on a bf16 GPU or the CPU has none
            scaler.load_state_dict(resume["scaler"])
        history, best_modules = resume["history"], resume["best_modules"]
    best_val = max((h["val_acc"] for h in history), default=-1.0)
    quiet = None if progress is None else not progress   # None: bars only on a terminal
    if len(history) < cfg.epochs:
        epochs = (f"epochs {len(history) + 1} to {cfg.epochs}" if len(history) + 1 < cfg.epochs
                  else f"epoch {cfg.epochs}")
        log(f"{cfg.run_id}: training on {device} ({precision}), {epochs}, "
            f"{steps} steps of {loader.batch_size} images at {cfg.image_size} px each"
            + ("; on a CPU a real run takes hours: use a GPU, or --smoke to check the pipeline in a minute"
               if device.type == "cpu" and not cfg.smoke else ""))
        if steps < MIN_STEPS_PER_EPOCH and not cfg.smoke:
            batch = 2 ** max(4, int(math.log2(len(loader.labels) / (2.5 * MIN_STEPS_PER_EPOCH))))
            log(f"{cfg.run_id}: warning: only {steps} optimizer steps an epoch ({len(loader.labels)} "
                f"images in batches of {loader.batch_size}), too few to train: expect a rising loss "
                f"and near-chance accuracy. Lower the batch with the LR, e.g. --batch-size {batch} "
                f"--lr {cfg.lr * batch / cfg.batch_size:.3g}.")

    first_epoch = len(history)
    # TensorBoard's event files, asked for: a checkpoint folder holds the runs' files alone otherwise.
    curves = LiveCurves(files.ckpt_dir, cfg.run_id, log) if live_curves and len(history) < cfg.epochs else None
    for epoch in tqdm(range(len(history), cfg.epochs), desc=cfg.run_id, unit="epoch", disable=quiet,
                      initial=len(history), total=cfg.epochs):
        start = time.perf_counter()
        method.train()
        step_losses: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device, dtype=torch.long)
        skipped_steps = torch.zeros((), device=device)
        batches = tqdm(loader.epoch(epoch), total=steps, leave=False, disable=quiet, unit="step")
        for step, (images, targets) in enumerate(batches):
            lr = lr_at(epoch * steps + step, cfg.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits, losses, skipped = take_step(images, targets, epoch + step / steps)
            if skipped is not None:
                skipped_steps += skipped
            average.update(epoch * steps + step)
            for name, value in losses.items():
                step_losses.setdefault(name, torch.empty(steps, device=device))[step] = value.detach()
            correct += (logits.argmax(1) == targets).sum()

        # The raw weights' loss tells divergence first: the average lags behind them.
        val_loss, val_acc_raw = evaluate(method.student, *splits.val, cfg.image_size, dtype, speed.eval_batch_size)
        stop_if_diverged(cfg, epoch, step_losses, val_loss, files)
        # fp16 only: the scaler's scale, and the steps it skipped (inf/nan gradients); None without one.
        scaling = (dict(skipped_steps=round(skipped_steps.item()), loss_scale=scaler.get_scale())
                   if scaler.is_enabled() else dict(skipped_steps=None, loss_scale=None))
        stop_if_scale_collapsed(cfg, epoch, steps, scaling, files)
        val = evaluate_views(average.model, *splits.val, cfg.image_size, dtype, speed.eval_batch_size)
        val_acc = val["flip"] if cfg.flip_tta else val["single"]
        term_means = {k: v.mean().item() for k, v in step_losses.items()}
        history.append(dict(epoch=epoch + 1, train_loss=sum(term_means.values()), losses=term_means,
                            train_acc=correct.item() / (steps * loader.batch_size),
                            val_loss=val_loss, val_acc=val_acc, val_acc_single_view=val["single"],
                            val_acc_raw=val_acc_raw, lr=lr, **scaling, seconds=time.perf_counter() - start))
        log(f"{cfg.run_id} epoch {epoch + 1}/{cfg.epochs}: train loss {history[-1]['train_loss']:.4f} "
            f"acc {history[-1]['train_acc']:.4f} | val loss {val_loss:.4f} acc {val_acc_raw:.4f}, "
            f"averaged {val_acc:.4f} | {history[-1]['seconds']:.1f}s")
        if curves is not None:
            curves.add(history[-1])
        remaining = cfg.epochs - epoch - 1
        if remaining and len(history) == first_epoch + 1:   # the first epoch of this session: the run's time
            log(f"{cfg.run_id}: the {remaining} remaining epoch{'s' if remaining > 1 else ''} will take about "
                f"{duration_text(remaining * history[-1]['seconds'])} at this epoch's pace (validation included; "
                f"a first epoch also pays one-off costs, so likely less)")
        if scaling["skipped_steps"] and scaling["skipped_steps"] > SKIPPED_STEPS_WARNING * steps:
            log(f"{cfg.run_id} epoch {epoch + 1}: warning: the fp16 loss scaler skipped {scaling['skipped_steps']} "
                f"of {steps} steps (inf or nan gradients; loss scale now {scaling['loss_scale']:.3g}), so those "
                f"batches did not train. If it goes on, lower --lr or use --precision fp32 (or bf16 on a GPU "
                f"that has it).")
        if val_acc > best_val:
            best_val = val_acc
            best_modules = {k: _copy_state(average.model if k == "student" else m) for k, m in modules.items()}
        files.save_last(dict(modules={k: m.state_dict() for k, m in modules.items()},
                             average=average.model.state_dict(), best_modules=best_modules,
                             optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                             history=history, epoch=epoch + 1))
    if curves is not None:
        curves.close()
    return history, best_modules


def duration_text(seconds: float) -> str:
    """'40 s', '12 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _copy_state(module: nn.Module) -> dict:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def what_is_kept(epoch: int, files) -> str:
    """What a run stopped during `epoch` (0-based) before saving it still has."""
    return (f"the checkpoint of epoch {epoch} stays in {files.last}" if epoch
            else "no epoch had finished, so there is no checkpoint")


def stop_if_diverged(cfg, epoch: int, step_losses: dict, val_loss: float, files) -> None:
    """Raise before a diverged epoch is saved, so the last checkpoint stays the last good one."""
    per_step = torch.stack(list(step_losses.values()))          # (terms, steps), one sync below
    bad_steps = (~torch.isfinite(per_step.sum(0))).nonzero().flatten().tolist()
    if bad_steps:
        terms = {k: v[bad_steps[0]].item() for k, v in step_losses.items()}
        problem = f"the loss became non-finite at epoch {epoch + 1}, step {bad_steps[0] + 1} (terms {terms})"
    elif not math.isfinite(val_loss):
        # Every training loss was finite, but the last update blew the weights up.
        problem = f"the validation loss became {val_loss} at epoch {epoch + 1}: the weights diverged"
    else:
        return
    raise KdlabError(f"{cfg.run_id}: {problem}. Nothing from this epoch was saved; {what_is_kept(epoch, files)}. "
                     f"Lower the learning rate (--lr) and run with --retrain.")


def stop_if_scale_collapsed(cfg, epoch: int, steps: int, scaling: dict, files) -> None:
    """Raise before an epoch whose every step the fp16 loss scaler skipped is saved: its weights
    did not change, while its losses may look finite and its scale halved at every step."""
    if scaling["skipped_steps"] != steps:
        return
    raise KdlabError(f"{cfg.run_id}: the fp16 loss scaler skipped all {steps} steps of epoch {epoch + 1} (inf or "
                     f"nan gradients at every loss scale down to {scaling['loss_scale']:.3g}), so the weights did "
                     f"not change. Nothing from this epoch was saved; {what_is_kept(epoch, files)}. Lower the "
                     f"learning rate (--lr) and run with --retrain, or run again with --precision fp32 (or bf16 "
                     f"on a GPU that has it).")


@torch.no_grad()
def predict(model, images: torch.Tensor, image_size: int, dtype=None, mirror: bool = False,
            batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits (fp32) for uint8 images (mirrored left-right if asked), in large batches."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size].to(device), image_size)
        if mirror:
            x = x.flip(3)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out.append(model(x).float())
    return torch.cat(out)


def predict_views(model, images: torch.Tensor, image_size: int, dtype=None,
                  batch_size: int = EVAL_BATCH_SIZE) -> dict[str, torch.Tensor]:
    """Logits of the single view, and flip test-time augmentation: the mean of an image's and its
    mirror's logits (training mirrors half the images, so both views are in distribution)."""
    single = predict(model, images, image_size, dtype, batch_size=batch_size)
    mirrored = predict(model, images, image_size, dtype, mirror=True, batch_size=batch_size)
    return {"single": single, "flip": (single + mirrored) / 2}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels.to(logits.device)).float().mean().item()


def evaluate(model, images, labels, image_size: int, dtype=None,
             batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on a split, single view."""
    logits = predict(model, images, image_size, dtype, batch_size=batch_size)
    return F.cross_entropy(logits, labels.to(logits.device)).item(), accuracy(logits, labels)


def evaluate_views(model, images, labels, image_size: int, dtype=None,
                   batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """Accuracy of `model` on a split, by view: {"single": ..., "flip": ...}."""
    return {view: accuracy(logits, labels) for view, logits in
            predict_views(model, images, image_size, dtype, batch_size).items()}
