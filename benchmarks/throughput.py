"""Throughput of kdlab's training path against the way a typical Colab notebook trains.

For each step kind (teacher fine-tuning, student CE, logit KD, feature KD, evaluation) it
times images/s after warm-up, on two paths:
  kdlab  the package itself: DeviceLoader batches (uint8 on the device, batched augmentation),
         build_method, make_optimizer, train_step (bf16/fp16 autocast, channels_last) and the
         weight average's update, predict;
  naive  torchvision-style per-image PIL transforms through DataLoader(num_workers=2,
         pin_memory=True), fp32, default memory format, plain SGD, the loss read back every step.
Then the epoch time against the training-set size (cost should grow linearly); where a
step's time goes (torch.profiler: convolutions, batch norm, the optimizer, the data pipeline,
the rest) and how busy the device is; the teacher and student CE steps at other batch sizes;
and, on CUDA, whether each fast-path choice pays: channels_last, bf16/fp16 autocast,
cudnn.benchmark, torch.compile.

    python benchmarks/throughput.py --device cuda --json benchmarks/results/<gpu>-full.json
    python benchmarks/throughput.py --device cpu --quick --json benchmarks/results/cpu-quick.json

This file measures; kdlab.benchmark_tables renders what it measured (its tables, docs blocks and
chart come from the results file alone, without torch).

Images are synthetic and CIFAR-shaped (kdlab.data.make_synthetic_cifar), weights random: a
step's cost depends on shapes, not on pixel values or weights, so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# Run as a script from a checkout: the package is the folder above, installed or not.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdlab.checkpoints import write_json  # noqa: E402
from kdlab.benchmark_tables import DATA, FAMILY_COLUMNS, OTHER, lab_time_table, markdown  # noqa: E402
from kdlab.config import (EVALUATION_STEP, LAB_RUNS, STUDENT_STEP, TEACHER_RUN, TEACHER_STEP, SpeedLevers,  # noqa: E402
                          config_dict, make_config, step_runs)
from kdlab.data import MEAN, PAD, STD, Cifar10, DeviceLoader, make_splits, make_synthetic_cifar  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402
# The share of the device's peak (kdlab.lab_time: the vendors' dense bf16/fp16 tensor-core TFLOP/s).
from kdlab.lab_time import peak_tflops  # noqa: E402
from kdlab.lab import Lab, resolve_device  # noqa: E402
from kdlab.measure import count_flops, seconds_taken, synchronize  # noqa: E402
from kdlab.methods import build_method  # noqa: E402
from kdlab.models import ARCHS, build_model, imagenet_file  # noqa: E402
from kdlab.train import (AUTOCAST_DTYPES, TrainStep, WeightAverage, autocast_dtype, make_optimizer,  # noqa: E402
                         make_scaler, predict, resolve_precision, train_step, tune_cudnn)

# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Budget:
    """The sizes of one mode; image_size/batch_size None keep the lab's configs (128 px, 512)."""
    image_size: int | None
    batch_size: int | None
    warmup_steps: int
    timed_steps: int
    eval_batch_size: int
    eval_warmup_batches: int
    eval_timed_batches: int
    # Steps of the smaller epoch of the scaling measurement. N = scaling_steps * batch must be a
    # multiple of 10: --limit-train keeps N // 10 images of each class, and N whole batches.
    scaling_steps: int
    profiled_steps: int                    # steps recorded by torch.profiler for the time breakdown
    batch_factors: tuple[float, ...]       # the batch sweep, as multiples of the lab's batch


BUDGETS = {
    "full": Budget(None, None, 5, 20, 1024, 2, 10, 20, 5, (0.5, 1, 2, 4)),   # 105 s on an H200 before the sweep and breakdown
    "quick": Budget(32, 32, 2, 5, 256, 1, 4, 10, 2, (0.5, 1, 2)),            # about 35 s on a quiet 2-core CPU
    "tiny": Budget(16, 10, 1, 2, 10, 1, 2, 2, 1, (0.5, 1, 2)),               # the tests: every path, no meaning
}


# A gap under 3% between two settings is read as no difference, not as a verdict.
NOISE = 0.03

NAIVE_WORKERS = 2   # what a Colab notebook passes (Colab has 2 CPU cores)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def size_overrides(budget: Budget) -> dict:
    return dict(image_size=budget.image_size, batch_size=budget.batch_size)


def make_data(budget: Budget, cfg) -> Cifar10:
    """Synthetic CIFAR on the host, large enough for every measurement of `budget`.

    Its training images must give the scaling run 2N images after the validation split, the
    naive loader one batch per step (a second epoch mid-timing would restart its workers) and
    the batch sweep one batch of its largest size per step; its test images one batch per
    evaluation step, and the evaluation batch lever's larger batches.
    """
    steps = budget.warmup_steps + budget.timed_steps
    largest_batch = int(max(budget.batch_factors) * cfg.batch_size)
    per_class = max(2 * budget.scaling_steps * cfg.batch_size, steps * largest_batch) // 10
    test_images = max((budget.eval_warmup_batches + budget.eval_timed_batches) * budget.eval_batch_size,
                      eval_batch_images(budget))
    return make_synthetic_cifar(train_per_class=per_class + cfg.val_per_class + 1,
                                test_per_class=math.ceil(test_images / 10))


# ----------------------------------------------------------------------------- timing


def release_memory(device: torch.device) -> None:
    """Free what the last measurement left, so the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(make_steps, warmup: int, timed_steps: int, device: torch.device) -> dict:
    """Images/s of the steps of the generator `make_steps()` builds, after `warmup` steps.

    Each step yields its number of images. The device is synchronised at both marks, so GPU
    work queued by the host is counted where it ran. The peak memory covers building too.
    """
    release_memory(device)
    steps = make_steps()
    warmup_seconds = seconds_taken(device, lambda: [next(steps) for _ in range(warmup)])
    per_step = []   # images of each timed step
    seconds = seconds_taken(device, lambda: per_step.extend(next(steps) for _ in range(timed_steps)))
    images = sum(per_step)
    steps.close()   # ends a DataLoader's workers now, not whenever the generator is collected
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(images_per_s=images / seconds, images=images, timed_seconds=seconds,
                warmup_seconds=warmup_seconds, peak_memory_gib=peak)


def forward_flops(cfg, image_size: int) -> dict:
    """Forward FLOPs per image of what a step of `cfg` runs: the trained part and the teacher.

    Counted by FlopCounterMode on the meta device (shapes only, nothing computed), in eval
    mode because BatchNorm in train mode refuses a batch of one image at small sizes.
    """
    with torch.device("meta"):
        teacher = build_model(make_config(TEACHER_RUN).arch, "none") if cfg.uses_teacher else None
        method = build_method(cfg, build_model(cfg.arch, "none"), teacher)
        images = torch.empty(1, 3, image_size, image_size)
        targets = torch.zeros(1, dtype=torch.long)
    method.eval()
    teacher_flops = count_flops(method.teacher, images) if teacher is not None else 0
    # Past any warm-up, so every loss term counts as in most of a run.
    return dict(trained=count_flops(method.forward_train, images, targets, float(cfg.epochs)) - teacher_flops,
                teacher=teacher_flops or None)


# ----------------------------------------------------------------------------- kdlab's path


def build_on_device(cfg, device: torch.device, memory_format) -> torch.nn.Module:
    """The method of `cfg` (with a teacher if it distils), random weights, on `device`."""
    torch.manual_seed(cfg.seed)
    teacher = None
    if cfg.uses_teacher:
        teacher = build_model(make_config(TEACHER_RUN).arch, "none").to(device, memory_format=memory_format)
    method = build_method(cfg, build_model(cfg.arch, "none"), teacher)
    return method.to(device, memory_format=memory_format)


def kdlab_train(cfg, images, labels, device, memory_format=torch.channels_last, precision="auto",
                speed=SpeedLevers(), log=print):
    """kdlab's training steps as train_epochs takes them (kdlab.train.TrainStep), the weight
    average's update included; the arguments switch its choices: the memory format, the precision
    (kdlab.train.AUTOCAST_DTYPES) and the speed levers, whose fallbacks `log` says."""
    method = build_on_device(cfg, device, memory_format)
    average = WeightAverage(cfg, method.student)
    optimizer = make_optimizer(cfg, method, speed.fused_sgd, log)
    dtype = AUTOCAST_DTYPES[resolve_precision(precision, device)]
    take_step = TrainStep(method, optimizer, make_scaler(device, dtype), dtype, speed.compile_step, log)
    loader = DeviceLoader(images.to(device), labels.to(device), cfg.batch_size, cfg.image_size, cfg.seed)
    return kdlab_train_steps(method, take_step, average, loader, memory_format)


def kdlab_train_steps(method, take_step, average, loader, memory_format):
    method.train()
    for epoch in itertools.count():
        for step, (images, targets) in enumerate(marked_data(loader.epoch(epoch))):
            images = images.contiguous(memory_format=memory_format)  # a no-op on kdlab's default
            take_step(images, targets, float(epoch))
            average.update(epoch * len(loader) + step)
            yield len(targets)


DATA_REGION = "kdlab.data"


def marked_data(batches):
    """The loader's batches, each made inside a profiler region, so the time breakdown can tell
    the data pipeline's operators from the step's (the region costs nothing unprofiled)."""
    while True:
        with record_function(DATA_REGION):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def kdlab_eval(cfg, images, device, batch_size):
    student = build_on_device(cfg, device, torch.channels_last).student
    return kdlab_eval_steps(student, images.to(device), cfg.image_size, autocast_dtype(device), batch_size)


def kdlab_eval_steps(model, images, image_size, dtype, batch_size):
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        predict(model, batch, image_size, dtype, batch_size=batch_size)
        yield len(batch)


# ----------------------------------------------------------------------------- the naive reference


class PILCifar(Dataset):
    """CIFAR as torchvision.datasets.CIFAR10 holds it: HWC uint8 in memory, one PIL image per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def naive_loader(images, labels, image_size, batch_size, device, train: bool) -> DataLoader:
    augment = [transforms.RandomCrop(32, padding=PAD), transforms.RandomHorizontalFlip()] if train else []
    transform = transforms.Compose([*augment, transforms.Resize(image_size), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])
    return DataLoader(PILCifar(images, labels, transform), batch_size=batch_size, shuffle=train,
                      drop_last=train, num_workers=NAIVE_WORKERS, pin_memory=device.type == "cuda")


def naive_train(cfg, images, labels, device):
    method = build_on_device(cfg, device, torch.contiguous_format)
    optimizer = torch.optim.SGD(method.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loader = naive_loader(images, labels, cfg.image_size, cfg.batch_size, device, train=True)
    return naive_train_steps(method, optimizer, loader, device)


def naive_train_steps(method, optimizer, loader, device):
    method.train()
    running_loss = 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        _, losses = method.forward_train(images, targets, 0.0)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()   # a notebook logs its running loss: one host sync per step
        yield len(targets)


def naive_eval(cfg, images, labels, device, batch_size):
    model = build_on_device(cfg, device, torch.contiguous_format).student
    loader = naive_loader(images, labels, cfg.image_size, batch_size, device, train=False)
    return naive_eval_steps(model, loader, device)


@torch.no_grad()
def naive_eval_steps(model, loader, device):
    model.eval()
    correct = 0
    for images, targets in loader:
        logits = model(images.to(device))
        correct += (logits.argmax(1) == targets.to(device)).sum().item()
        yield len(targets)


# ----------------------------------------------------------------------------- measurements


def measure_row(kind: str, cfg, data: Cifar10, budget: Budget, device: torch.device, peak) -> dict:
    """One step kind on both paths, with its FLOPs and each path's share of the device's peak."""
    flops = forward_flops(cfg, cfg.image_size)
    if kind == EVALUATION_STEP:
        warmup, timed, batch = budget.eval_warmup_batches, budget.eval_timed_batches, budget.eval_batch_size
        images, labels = data.test_images[:(warmup + timed) * batch], data.test_labels[:(warmup + timed) * batch]
        flops_per_image = flops["trained"]
        kdlab_steps = lambda: kdlab_eval(cfg, images, device, batch)  # noqa: E731
        naive_steps = lambda: naive_eval(cfg, images, labels, device, batch)  # noqa: E731
    else:
        warmup, timed = budget.warmup_steps, budget.timed_steps
        n = (warmup + timed) * cfg.batch_size
        images, labels = data.train_images[:n], data.train_labels[:n]
        # Forward and backward of the trained part cost about 3 forwards; the teacher only runs forward.
        flops_per_image = 3 * flops["trained"] + (flops["teacher"] or 0)
        kdlab_steps = lambda: kdlab_train(cfg, images, labels, device)  # noqa: E731
        naive_steps = lambda: naive_train(cfg, images, labels, device)  # noqa: E731
    tune_cudnn(device)
    kdlab = measure(kdlab_steps, warmup, timed, device)
    torch.backends.cudnn.benchmark = False   # PyTorch's default, which a notebook keeps
    naive = measure(naive_steps, warmup, timed, device)
    row = dict(step=kind, run=cfg.run, flops_per_image=flops_per_image,
               forward_flops_per_image=flops, speedup=kdlab["images_per_s"] / naive["images_per_s"])
    for path, result in (("kdlab", kdlab), ("naive", naive)):
        result["tflops"] = flops_per_image * result["images_per_s"] / 1e12
        result["peak_share"] = result["tflops"] / peak if peak else None
        row[path] = result
    return row


def measure_scaling(budget: Budget, data: Cifar10, device: torch.device) -> dict:
    """Epoch time of the student CE step on a --limit-train subset of N and of 2N images.

    One method trains through both epochs, after warm-up steps, so neither pays for cuDNN's
    search or the first-step allocations; a ratio near 2 means the cost per image is constant.
    """
    run_name = step_runs()[STUDENT_STEP]
    cfg = make_config(run_name, **size_overrides(budget))
    sizes = [budget.scaling_steps * cfg.batch_size, 2 * budget.scaling_steps * cfg.batch_size]
    tune_cudnn(device)
    release_memory(device)
    method = build_on_device(cfg, device, torch.channels_last).train()
    optimizer = make_optimizer(cfg, method)
    dtype = autocast_dtype(device)
    scaler = make_scaler(device, dtype)
    epochs = []
    for size in sizes:
        limited = make_config(run_name, limit_train=size, **size_overrides(budget))
        splits = make_splits(data, limited.val_per_class, limited.split_seed, limited.limit_train, device)
        loader = DeviceLoader(*splits.train, limited.batch_size, limited.image_size, limited.seed)
        if not epochs:
            for images, targets in itertools.islice(loader.epoch(0), budget.warmup_steps):
                train_step(method, optimizer, scaler, images, targets, dtype, 0.0)
        seconds = seconds_taken(device, lambda: [train_step(method, optimizer, scaler, images, targets, dtype, 1.0)
                                         for images, targets in loader.epoch(1)])
        epochs.append(dict(limit_train=size, train_images=len(splits.train[1]), steps=len(loader),
                           epoch_seconds=seconds))
    return dict(step=STUDENT_STEP, run=run_name, epochs=epochs,
                ratio=epochs[1]["epoch_seconds"] / epochs[0]["epoch_seconds"],
                size_ratio=epochs[1]["train_images"] / epochs[0]["train_images"])


# Families of the time breakdown. An aten operator run inside one of REGIONS (the loader's,
# marked above, and torch.optim's step, which marks itself) belongs to that region's family;
# any other goes to the first family whose pattern its name matches, or to OTHER (the families'
# names and columns: kdlab.benchmark_tables).
REGIONS = {DATA_REGION: DATA, "Optimizer.step": "optimizer"}
OP_FAMILIES = {
    "convolution and matmul": r"conv|addmm|aten::mm$|aten::bmm$|matmul|linear",
    "batch norm": r"batch_norm",
}


def op_family(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        region = next((family for prefix, family in REGIONS.items() if parent.name.startswith(prefix)), None)
        if region:
            return region
        parent = parent.cpu_parent
    return next((family for family, pattern in OP_FAMILIES.items() if re.search(pattern, event.name)), OTHER)


def measure_breakdown(kind: str, cfg, data: Cifar10, budget: Budget, device: torch.device, row: dict,
                      peak) -> dict:
    """Where the time of kdlab's `kind` step goes, from torch.profiler over a few steps.

    Each aten operator's own time (on CUDA its kernels' time, on the CPU its CPU time) is
    counted in one family. On CUDA the busy share (all kernel time per step / the step time
    measured without the profiler, in `row`) says whether the GPU waits for the host: well
    under one, launch overhead is the limit (larger batches, CUDA graphs); near one, the kernels
    are. The convolution FLOP rate (the step's FLOPs / the time in convolution and
    matmul kernels) is the share of peak the tensor-core kernels reach by themselves, the
    ceiling of the step's share if everything else took no time.
    """
    n = (budget.warmup_steps + budget.profiled_steps) * cfg.batch_size
    tune_cudnn(device)
    steps = kdlab_train(cfg, data.train_images[:n], data.train_labels[:n], device)
    for _ in range(budget.warmup_steps):
        next(steps)
    synchronize(device)
    cuda = device.type == "cuda"
    if not cuda:   # without a GPU, the profiler logs its failed GPU count as an ERROR: it is not one
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(budget.profiled_steps):
            next(steps)
        synchronize(device)
    steps.close()
    events = prof.events()
    seconds = dict.fromkeys([*OP_FAMILIES, *REGIONS.values(), OTHER], 0.0)
    for event in events:
        if event.device_type == DeviceType.CPU and event.name.startswith("aten::"):
            own = event.self_device_time_total if cuda else event.self_cpu_time_total
            seconds[op_family(event)] += own / 1e6 / budget.profiled_steps
    operators = sum(seconds.values())
    if not operators > 0:
        raise RuntimeError("the profiler attributed no time to aten operators")
    step_seconds = row["kdlab"]["timed_seconds"] / budget.timed_steps
    # On CUDA every kernel, attributed to an operator or not: the check that the families cover it all.
    # A record_function region also appears as a device-side annotation spanning its kernels:
    # not a kernel, so not counted (torch's own profiler table leaves them out the same way).
    kernels = (sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
               / 1e6 / budget.profiled_steps if cuda else None)
    conv_tflops = (row["flops_per_image"] * cfg.batch_size / seconds["convolution and matmul"] / 1e12
                   if seconds["convolution and matmul"] > 0 else None)
    return dict(step=kind, run=cfg.run, profiled_steps=budget.profiled_steps, step_seconds=step_seconds,
                seconds_per_step=seconds, shares={k: v / operators for k, v in seconds.items()},
                operator_seconds_per_step=operators, kernel_seconds_per_step=kernels,
                busy_share=kernels / step_seconds if cuda else None,
                conv_tflops=conv_tflops, conv_peak_share=conv_tflops / peak if conv_tflops and peak else None)


def measure_batch_sweep(budget: Budget, data: Cifar10, device: torch.device, peak, rows: list[dict],
                        log) -> list[dict]:
    """kdlab's teacher and student CE steps at multiples of the lab's batch size.

    Larger batches give every kernel more work per launch: if the share of peak climbs with
    the batch, the lab's batch leaves the GPU waiting; if it stays flat, the kernels are the
    limit. A size that does not fit in memory is recorded as such. FLOPs per image come from
    the step kinds' `rows`.
    """
    tune_cudnn(device)
    sweeps = []
    for kind in (TEACHER_STEP, STUDENT_STEP):
        lab = make_config(step_runs()[kind], **size_overrides(budget))
        flops_per_image = next(row["flops_per_image"] for row in rows if row["step"] == kind)
        points = []
        for factor in budget.batch_factors:
            cfg = make_config(step_runs()[kind], image_size=lab.image_size, batch_size=round(factor * lab.batch_size))
            n = (budget.warmup_steps + budget.timed_steps) * cfg.batch_size
            try:
                result = measure(lambda: kdlab_train(cfg, data.train_images[:n], data.train_labels[:n], device),
                                 budget.warmup_steps, budget.timed_steps, device)
            except torch.OutOfMemoryError:
                points.append(dict(batch_size=cfg.batch_size, error="out of memory"))
                log(f"  {kind} batch {cfg.batch_size}: out of memory")
                continue
            except Exception as err:  # noqa: BLE001 - one failed size is a finding; the other sizes still run
                points.append(dict(batch_size=cfg.batch_size, error=f"{type(err).__name__}: {err}"[:3000]))
                log(f"  {kind} batch {cfg.batch_size}: failed ({points[-1]['error'][:300]})")
                continue
            tflops = flops_per_image * result["images_per_s"] / 1e12
            points.append(dict(batch_size=cfg.batch_size, **result, tflops=tflops,
                               peak_share=tflops / peak if peak else None))
            log(f"  {kind} batch {cfg.batch_size}: {result['images_per_s']:.0f} img/s")
        sweeps.append(dict(step=kind, run=lab.run, lab_batch_size=lab.batch_size, points=points))
    return sweeps


def compare(on: dict, off: dict) -> dict:
    speedup = on["images_per_s"] / off["images_per_s"]
    verdict = "pays" if speedup > 1 + NOISE else "costs" if speedup < 1 - NOISE else "no clear difference"
    return dict(on=on, off=off, speedup=speedup, verdict=verdict)


def measure_cudnn_off(mode: str, device: torch.device) -> dict:
    """The student CE step with cudnn.benchmark off, in a fresh process.

    cuDNN keeps the algorithm it chose for a shape for the life of the process, whatever the
    flag says later, so a measurement after the rows would time the tuned choice again.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--device", device.type, "--probe-cudnn-off"]
    command += [] if mode == "full" else [f"--{mode}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"the cudnn.benchmark-off probe exited {result.returncode}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def student_ce_data(budget: Budget, data: Cifar10, cfg):
    n = (budget.warmup_steps + budget.timed_steps) * cfg.batch_size
    return data.train_images[:n], data.train_labels[:n]


def measure_training(cfg, images, labels, device, budget: Budget, **choices) -> dict:
    """kdlab_train with `choices`, measured; raises if a speed lever fell back to the default path,
    since the measurement would then time the default."""
    fell_back = []
    result = measure(lambda: kdlab_train(cfg, images, labels, device, log=fell_back.append, **choices),
                     budget.warmup_steps, budget.timed_steps, device)
    if fell_back:
        raise RuntimeError(f"the lever fell back: {fell_back[0]}")
    return result


def measure_fast_paths(budget: Budget, data: Cifar10, device: torch.device, mode: str,
                       baseline: dict, evaluation: dict, compile_student: bool, log) -> dict:
    """Each of kdlab's fast-path choices switched off alone, and fp16 and each speed lever
    (kdlab.config.SpeedLevers) switched on alone, on the student CE step (the evaluation batch on
    the evaluation step), all in this run.

    `baseline` is the student CE row's kdlab measurement: channels_last, autocast as "auto" picks,
    cudnn.benchmark on, default SGD, eager; `evaluation` the evaluation row's, at the budget's
    evaluation batch. A switch whose measurement fails (or whose lever fell back) records the error.
    """
    cfg = make_config(step_runs()[STUDENT_STEP], **size_overrides(budget))
    images, labels = student_ce_data(budget, data, cfg)
    tune_cudnn(device)
    switches = {}

    def train_with(**choices) -> dict:
        return measure_training(cfg, images, labels, device, budget, **choices)

    def lever(name: str, against: dict, **choices) -> dict | None:
        """`choices` switched on, against the measurement `against`; None if it failed."""
        try:
            on = train_with(**choices)
        except Exception as err:  # noqa: BLE001 - a lever that fails on this stack is a finding, not a crash
            switches[name] = dict(error=f"{type(err).__name__}: {err}"[:3000])
            log(f"  {name}: failed ({switches[name]['error'][:300]})")
            return None
        switches[name] = compare(on, against)
        log(f"  {name} on: {on['images_per_s']:.0f} img/s")
        return on

    channels_first = train_with(memory_format=torch.contiguous_format)
    switches["channels_last"] = compare(baseline, channels_first)
    log(f"  channels_last off: {channels_first['images_per_s']:.0f} img/s")
    fp32 = train_with(precision="fp32")
    switches["autocast"] = dict(compare(baseline, fp32), dtype=str(autocast_dtype(device)))
    log(f"  autocast off (fp32): {fp32['images_per_s']:.0f} img/s")
    # The T4's path (fp16 and its loss scaler) against what "auto" picks here.
    fp16 = lever("fp16", baseline, precision="fp16")
    if "speedup" in switches["fp16"]:
        switches["fp16"]["against"] = resolve_precision("auto", device)
    lever("fused_sgd", baseline, speed=SpeedLevers(fused_sgd=True))
    if "speedup" in switches["fused_sgd"]:
        switches["fused_sgd"]["skipped_steps_check"] = fused_sgd_agreement(cfg, device)
    if fp16 is not None:   # in fp16, fused SGD also keeps the scaler's inf check on the device
        lever("fp16_fused_sgd", fp16, precision="fp16", speed=SpeedLevers(fused_sgd=True))
    switches["eval_batch"] = measure_eval_batch(cfg, data, device, budget, evaluation, log)
    release_memory(device)   # the probe needs the GPU's memory, not this process's cache
    try:
        switches["cudnn_benchmark"] = dict(compare(baseline, measure_cudnn_off(mode, device)),
                                           off_measured_in="a fresh process")
        log(f"  cudnn.benchmark off: {switches['cudnn_benchmark']['off']['images_per_s']:.0f} img/s")
    except (RuntimeError, ValueError, IndexError, subprocess.TimeoutExpired) as err:
        switches["cudnn_benchmark"] = dict(error=f"{type(err).__name__}: {err}"[:3000])
        log(f"  cudnn.benchmark off: failed ({switches['cudnn_benchmark']['error'][:300]})")
    switches["compile"] = measure_compile(cfg, images, labels, device, budget, baseline, log) \
        if compile_student else dict(skipped="--no-compile")
    return dict(step=STUDENT_STEP, run=cfg.run, switches=switches)


# The evaluation batch lever's measurement: this many times the budget's evaluation batch.
EVAL_BATCH_FACTOR = 4


def eval_batch_images(budget: Budget) -> int:
    """Test images the evaluation batch lever's measurement needs: one warm-up batch and as many
    timed ones as cover the evaluation row's timed images."""
    return (1 + math.ceil(budget.eval_timed_batches / EVAL_BATCH_FACTOR)) * EVAL_BATCH_FACTOR * budget.eval_batch_size


def measure_eval_batch(cfg, data: Cifar10, device, budget: Budget, evaluation: dict, log) -> dict:
    """The evaluation step at EVAL_BATCH_FACTOR times the budget's batch, against `evaluation` (the row's)."""
    batch = EVAL_BATCH_FACTOR * budget.eval_batch_size
    images = data.test_images[:eval_batch_images(budget)]
    try:
        on = measure(lambda: kdlab_eval(cfg, images, device, batch), 1, len(images) // batch - 1, device)
    except Exception as err:  # noqa: BLE001 - out of memory, say: a finding
        log(f"  eval_batch {batch}: failed ({type(err).__name__}: {str(err)[:300]})")
        return dict(error=f"{type(err).__name__}: {err}"[:3000], batch_size=batch)
    log(f"  eval_batch {batch}: {on['images_per_s']:.0f} img/s")
    return dict(compare(on, evaluation), batch_size=batch, default_batch_size=budget.eval_batch_size)


def fused_sgd_agreement(cfg, device, steps: int = 4) -> dict:
    """Whether kdlab's fused SGD (kdlab.train.make_optimizer) moves the student's weights as its
    default SGD does on `device` when the fp16 loss scaler skips steps (the first and the third:
    inf images). Torch's fused kernel skips them on the device, where a mistake goes unseen; one
    did on its first step (kdlab.train.make_optimizer). Compares the parameters only: the
    skipped batches leave NaN in both BatchNorms' running statistics."""
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.rand(steps, 8, 3, 32, 32, generator=generator).to(device)
    images[0] = images[2] = float("inf")
    targets = torch.randint(0, 10, (steps, 8), generator=generator).to(device)
    weights = []
    for fused in (False, True):
        method = build_on_device(cfg, device, torch.channels_last).train()
        optimizer, scaler = make_optimizer(cfg, method, fused), make_scaler(device, torch.float16)
        for step in range(steps):
            train_step(method, optimizer, scaler, images[step], targets[step], torch.float16, 0.0)
        weights.append([p.detach().float() for p in method.student.parameters()])
    difference = max((a - b).abs().max().item() for a, b in zip(*weights))
    return dict(steps=steps, skipped_steps=[1, 3], max_weight_difference=difference,
                agrees=math.isfinite(difference) and difference < 1e-3)


def measure_compile(cfg, images, labels, device, budget: Budget, baseline: dict, log) -> dict:
    """The compile lever (kdlab.train.TrainStep): its speed, and the warm-up seconds it adds (compilation)."""
    try:
        compiled = measure_training(cfg, images, labels, device, budget, speed=SpeedLevers(compile_step=True))
    except Exception as err:  # noqa: BLE001 - a compiler failure is a finding to report, not a crash
        log(f"  torch.compile: failed ({type(err).__name__}: {str(err)[:300]})")
        return dict(error=f"{type(err).__name__}: {err}"[:3000])
    result = compare(compiled, baseline)
    # Compilation happens in the warm-up steps; it is repaid once the faster steps make up for it.
    result["compile_seconds"] = compiled["warmup_seconds"] - baseline["warmup_seconds"]
    saved_per_step = (baseline["timed_seconds"] - compiled["timed_seconds"]) / budget.timed_steps
    result["break_even_steps"] = (result["compile_seconds"] / saved_per_step
                                  if result["compile_seconds"] > 0 and saved_per_step > 0 else None)
    log(f"  torch.compile: {compiled['images_per_s']:.0f} img/s, {result['compile_seconds']:.1f}s "
        f"more warm-up than eager")
    return result


# ----------------------------------------------------------------------------- the six-run lab's wall time

# --lab-time with --quick or --tiny: the same path at sizes a CPU runs in a minute; its times mean nothing.
LAB_TRIAL = dict(epochs=1, image_size=32, batch_size=10)
LAB_TRIAL_DATA = dict(train_per_class=5, test_per_class=1, val_per_class=2)
LAB_DATA = dict(train_per_class=5000, test_per_class=1000, val_per_class=None)   # CIFAR-10's sizes


class LabOnGivenData(Lab):
    """The lab on a dataset made here instead of read from disk; `val_per_class`, if given,
    replaces the lab's 500 validation images per class (the trial's data has fewer)."""

    def __init__(self, given_data: Cifar10, val_per_class: int | None = None, **options):
        super().__init__(**options)
        self.given_data, self.val_per_class = given_data, val_per_class

    def data(self) -> Cifar10:
        return self.given_data

    def config(self, run: str, seed: int | None = None):
        cfg = super().config(run, seed)
        return cfg if self.val_per_class is None else replace(cfg, val_per_class=self.val_per_class)


@contextlib.contextmanager
def imagenet_shaped_cache():
    """A temporary TORCH_HOME whose hub/checkpoints hold random 1000-class ResNet50 and ResNet18
    weights under torchvision's own file names, as tests/test_pretrained_lab.py makes: torchvision
    loads a cached file without checking its hash, so the pretrained runs start from them as from
    the real ones, and a step costs the same whatever the weights' values."""
    previous = os.environ.get("TORCH_HOME")
    with tempfile.TemporaryDirectory() as home:
        folder = Path(home) / "hub" / "checkpoints"
        folder.mkdir(parents=True)
        for arch in ARCHS:
            torch.save(getattr(torchvision.models, arch)(num_classes=1000).state_dict(), folder / imagenet_file(arch))
        os.environ["TORCH_HOME"] = home
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCH_HOME"]
            else:
                os.environ["TORCH_HOME"] = previous


def measure_lab_time(device: torch.device, trial: bool, log=print) -> dict:
    """The wall time of `python -m kdlab run all` at its default settings: the six runs in the
    lab's order (the teacher first, then the students that distil it), each from its call to its
    saved checkpoint (splits, weights, training, validation, test, checkpoint writes), in a
    temporary checkpoint folder, on synthetic data of CIFAR-10's size and ImageNet-shaped random
    weights. Making the data is timed apart: a real lab reads the JPEG copy instead."""
    sizes = LAB_TRIAL_DATA if trial else LAB_DATA
    start = time.perf_counter()
    data = make_synthetic_cifar(train_per_class=sizes["train_per_class"], test_per_class=sizes["test_per_class"])
    data_seconds = time.perf_counter() - start
    runs = []
    with imagenet_shaped_cache(), tempfile.TemporaryDirectory() as ckpt_dir:
        lab = LabOnGivenData(data, sizes["val_per_class"], ckpt_dir=ckpt_dir, device=str(device), progress=False,
                             log=lambda line: log(f"  {line}"), **(LAB_TRIAL if trial else {}))
        for run in LAB_RUNS:
            started = time.perf_counter()
            results = lab.run(run).results
            runs.append(dict(run=run, seconds=time.perf_counter() - started, epochs=results["epochs"],
                             weights=results["weights"], n_train=results["n_train"],
                             epoch_seconds=[h["seconds"] for h in results["history"]]))
            log(f"{run}: {runs[-1]['seconds']:.1f}s")
        configs = {run: config_dict(lab.config(run)) for run in LAB_RUNS}
    return dict(trial=trial, precision=lab.precision, data_seconds=data_seconds, runs=runs, configs=configs,
                total_seconds=sum(run["seconds"] for run in runs))


def lab_time(args, log=print) -> dict:
    """--lab-time: measure_lab_time with the environment of a benchmark file, written to --json."""
    device = resolve_device(args.device)
    trial = args.mode != "full"
    student = make_config(LAB_RUNS[1], **(LAB_TRIAL if trial else {}))
    report = environment(device, args.mode, BUDGETS[args.mode], student, args.note)
    for key in ("budget", "kdlab_path", "naive_path"):   # the throughput rows' alone
        del report[key]
    sizes = "a trial's" if trial else "CIFAR-10's"
    report["data"] = (f"synthetic CIFAR-shaped images (kdlab.data.make_synthetic_cifar), {sizes} sizes; "
                      "ImageNet-shaped random weights in a temporary TORCH_HOME")
    log(f"{report['device_name']}, torch {torch.__version__}: the six-run lab" + (" (trial sizes)" if trial else ""))
    report["lab_time"] = measure_lab_time(device, trial, log)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.json), report)
    return report


def measured_commit() -> str | None:
    """The commit measured: $KDLAB_COMMIT if set (a copy of the checkout without .git, such as the
    one a lent GPU gets, is told it by whoever copied it), else git's HEAD, marked "+uncommitted"
    when tracked files differ from it; None outside a git checkout."""
    if os.environ.get("KDLAB_COMMIT"):
        return os.environ["KDLAB_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+uncommitted" if changed.stdout.strip() else "")


def environment(device: torch.device, mode: str, budget: Budget, cfg, note: str | None) -> dict:
    name = device_name(device)
    return dict(
        measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=measured_commit(),
        device=device.type, device_name=name, peak_tflops=peak_tflops(name) if device.type == "cuda" else None,
        torch_version=str(torch.__version__), torchvision_version=str(torchvision.__version__),
        cuda_version=torch.version.cuda if device.type == "cuda" else None,
        cudnn_version=torch.backends.cudnn.version() if device.type == "cuda" else None,
        python_version=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
        # Other processes on the host slow CPU steps and the naive loader's workers: the
        # 1-minute load average when the run started says how busy it was.
        load_average_at_start=os.getloadavg()[0],
        note=note, mode=mode, budget=asdict(budget), image_size=cfg.image_size, batch_size=cfg.batch_size,
        data="synthetic CIFAR-shaped images (kdlab.data.make_synthetic_cifar); random weights",
        kdlab_path="DeviceLoader + build_method + make_optimizer + train_step (autocast "
                   f"{autocast_dtype(device) or 'off on the CPU'}, channels_last, tune_cudnn); predict",
        naive_path=f"per-image PIL RandomCrop(32, padding={PAD}) + RandomHorizontalFlip + Resize + ToTensor + "
                   f"Normalize, DataLoader(num_workers={NAIVE_WORKERS}, pin_memory on CUDA), fp32, "
                   "default memory format, SGD(momentum), loss.item() each step, cudnn.benchmark off",
    )


def benchmark(args, log=print) -> dict:
    device = resolve_device(args.device)
    budget = BUDGETS[args.mode]
    started = time.perf_counter()
    configs = {kind: make_config(run, **size_overrides(budget)) for kind, run in step_runs().items()}
    data = make_data(budget, configs[STUDENT_STEP])
    report = environment(device, args.mode, budget, configs[STUDENT_STEP], args.note)
    report.update(configs={kind: config_dict(cfg) for kind, cfg in configs.items()},
                  rows=[], scaling=None, breakdown=None, batch_sweep=None, fast_path=None)
    log(f"{report['device_name']}, torch {torch.__version__}, {args.mode} mode")

    def save():
        report["wall_seconds"] = time.perf_counter() - started
        report["load_average_at_end"] = os.getloadavg()[0]
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json(Path(args.json), report)   # after every section: a late failure keeps the rest

    for kind, cfg in configs.items():
        row = measure_row(kind, cfg, data, budget, device, report["peak_tflops"])
        report["rows"].append(row)
        log(f"{kind:11} kdlab {row['kdlab']['images_per_s']:9.1f} img/s | naive {row['naive']['images_per_s']:9.1f}"
            f" img/s | {row['speedup']:.2f}x | {row['kdlab']['tflops']:.3g} TFLOP/s")
        save()
    report["scaling"] = measure_scaling(budget, data, device)
    log(f"scaling: epoch time ratio {report['scaling']['ratio']:.2f} for 2x the images")
    save()
    if device.type == "cuda":
        log("fast paths (student CE):")
        student_ce, evaluation = (next(row for row in report["rows"] if row["step"] == step)
                                  for step in (STUDENT_STEP, EVALUATION_STEP))
        report["fast_path"] = measure_fast_paths(budget, data, device, args.mode, student_ce["kdlab"],
                                                 evaluation["kdlab"], not args.no_compile, log)
        save()
    log("batch sweep:")
    report["batch_sweep"] = measure_batch_sweep(budget, data, device, report["peak_tflops"], report["rows"], log)
    save()
    # Last: the profiler is the newest part and the one most likely to fail on a new stack.
    report["breakdown"] = []
    for row in report["rows"]:
        if row["step"] == EVALUATION_STEP:
            continue
        try:
            part = measure_breakdown(row["step"], configs[row["step"]], data, budget, device, row,
                                     report["peak_tflops"])
        except Exception as err:  # noqa: BLE001 - the profiler's output varies across torch versions: report it
            part = dict(step=row["step"], run=row["run"], error=f"{type(err).__name__}: {err}"[:3000])
            log(f"{row['step']:11} time breakdown failed: {part['error'][:300]}")
        else:
            log(f"{row['step']:11} time: " + ", ".join(f"{FAMILY_COLUMNS[k]} {v:.0%}" for k, v in part["shares"].items())
                + (f"; busy {part['busy_share']:.0%}" if part["busy_share"] else ""))
        report["breakdown"].append(part)
        save()
    save()
    return report


def probe_cudnn_off(args) -> dict:
    """The student CE step on kdlab's path with cudnn.benchmark off (see measure_cudnn_off)."""
    device = resolve_device(args.device)
    budget = BUDGETS[args.mode]
    cfg = make_config(step_runs()[STUDENT_STEP], **size_overrides(budget))
    images, labels = student_ce_data(budget, make_data(budget, cfg), cfg)
    torch.backends.cudnn.benchmark = False
    return measure(lambda: kdlab_train(cfg, images, labels, device), budget.warmup_steps, budget.timed_steps, device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", dest="mode", action="store_const", const="quick", default="full",
                       help="32 px, batch 32, a few steps: about 35 s on a quiet 2-core CPU")
    sizes.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                       help="the smallest sizes that run every path, for the tests; its numbers mean nothing")
    parser.add_argument("--json", metavar="OUT", help="write the measurements here")
    parser.add_argument("--lab-time", action="store_true",
                        help="instead: the wall time of the six-run lab at its default settings, on CIFAR-10-sized "
                             "synthetic data and ImageNet-shaped random weights (a GPU measurement; with --quick "
                             "or --tiny, a trial at tiny sizes that checks the path)"),
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement (CUDA)")
    parser.add_argument("--note", help="recorded in the JSON, e.g. which machine this is")
    parser.add_argument("--probe-cudnn-off", action="store_true",
                        help="internal: time only the student CE step with cudnn.benchmark off and print "
                             "its JSON (the full run starts this in a fresh process)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.probe_cudnn_off:
            print(json.dumps(probe_cudnn_off(args)))
        elif args.lab_time:
            print("\n" + lab_time_table(lab_time(args)))
        else:
            print("\n" + markdown(benchmark(args), args.json or "this run, unsaved (no --json)"))
    except KdlabError as err:
        print(f"throughput: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
