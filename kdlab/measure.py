"""Measuring cost: FLOPs by PyTorch's counter, time with the device synchronised, and the
efficiency table of the figures (parameters, FLOPs, checkpoint size, latency, throughput).

One counter, one timer and one synchronise for kdlab.figures and benchmarks/throughput.py.
"""
from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdlab.models import build_model
from kdlab.train import autocast_dtype, tune_cudnn


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU: kernels run after the host has moved on."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_taken(device: torch.device, work) -> float:
    """Seconds `work()` takes on `device`, synchronised before and after so the GPU's queued work counts."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def count_flops(fn, *args) -> int:
    """FLOPs of `fn(*args)`, counted by PyTorch (a multiply-add counts as 2)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def flops_per_image(model: torch.nn.Module, image_size: int) -> int:
    """FLOPs of one forward at batch 1."""
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    with torch.no_grad():
        return count_flops(model, x)


@dataclass(frozen=True)
class TimingBudget:
    warmup: int             # untimed forwards first (allocator, cuDNN autotuning)
    latency_iters: int      # timed forwards at batch 1; the median is reported
    throughput_batch: int
    throughput_iters: int


# A smoke run is a pipeline check: time it just enough to run the code. A CPU gets a smaller
# throughput batch than a GPU so that regenerating figures on a laptop stays quick.
TIMING = {
    "smoke": TimingBudget(warmup=1, latency_iters=3, throughput_batch=8, throughput_iters=2),
    "cpu": TimingBudget(warmup=2, latency_iters=10, throughput_batch=32, throughput_iters=3),
    "cuda": TimingBudget(warmup=10, latency_iters=50, throughput_batch=256, throughput_iters=10),
}


def latency_and_throughput(forward, make_batch, budget: TimingBudget,
                           device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(latency in ms at batch 1, the median of budget.latency_iters forwards; throughput in images/s
    at budget.throughput_batch) of `forward(make_batch(n))`, after budget.warmup untimed forwards.
    Any runtime: PyTorch here, ONNX Runtime in kdlab.deploy."""
    def timed_forwards(batch: int, iters: int) -> list[float]:
        x = make_batch(batch)
        for _ in range(budget.warmup):
            forward(x)
        return [seconds_taken(device, lambda: forward(x)) for _ in range(iters)]

    latency = statistics.median(timed_forwards(1, budget.latency_iters))
    per_batch = sum(timed_forwards(budget.throughput_batch, budget.throughput_iters)) / budget.throughput_iters
    return 1000 * latency, budget.throughput_batch / per_batch


@torch.inference_mode()
def time_inference(model: torch.nn.Module, image_size: int, device: torch.device,
                   budget: TimingBudget) -> tuple[float, float]:
    """(latency in ms at batch 1, throughput in images/s at budget.throughput_batch) on `device`,
    in the precision the lab evaluates in (kdlab.train.autocast_dtype)."""
    model = model.to(device, memory_format=torch.channels_last).eval()
    dtype = autocast_dtype(device)
    tune_cudnn(device)   # as the lab trains and evaluates, in this process or the notebook's

    def make_batch(batch: int) -> torch.Tensor:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        return x.contiguous(memory_format=torch.channels_last)

    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return latency_and_throughput(model, make_batch, budget, device)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def measure_efficiency(results: dict[str, dict], ckpt_dir: str | Path, device: torch.device,
                       log=print) -> dict:
    """Parameters, FLOPs, checkpoint size, latency and throughput of each run, plus its test accuracy.

    Cost depends on the architecture and the input size, not on the weights' values, so each
    (arch, image size) is built once with random weights and timed once.
    """
    smoke = any(r["smoke"] for r in results.values())
    budget = TIMING["smoke" if smoke else device.type]
    cost = {}
    runs = {}
    for run, r in results.items():
        arch, image_size = r["config"]["arch"], r["config"]["image_size"]
        if (arch, image_size) not in cost:
            log(f"efficiency: counting and timing {arch} at {image_size} px on {device}")
            model = build_model(arch, "none").eval()
            flops = flops_per_image(model, image_size)
            cost[arch, image_size] = (flops, *time_inference(model, image_size, device, budget))
        flops, latency_ms, throughput = cost[arch, image_size]
        checkpoint = Path(ckpt_dir) / f"{run}_best.pt"
        if checkpoint.is_file():
            size, size_source = checkpoint.stat().st_size, f"size of {checkpoint.name} on the measuring machine"
        else:
            size, size_source = 4 * r["parameters"], "no checkpoint file: fp32 weights, parameters x 4 bytes"
        runs[run] = dict(arch=arch, image_size=image_size, params=r["parameters"],
                         flops_per_image=flops, checkpoint_mb=size / 1e6,
                         checkpoint_source=size_source, latency_ms=latency_ms,
                         throughput_img_s=throughput, test_acc=r["test_acc"])
    image_sizes = sorted({entry["image_size"] for entry in runs.values()})
    return dict(
        device=device_description(device),
        image_size=image_sizes[0] if len(image_sizes) == 1 else image_sizes,
        measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        smoke=smoke,
        timing=dict(asdict(budget), precision=str(autocast_dtype(device) or torch.float32),
                    weights="random: cost does not depend on the weights' values"),
        flops_counter="torch.utils.flop_counter.FlopCounterMode, batch 1, multiply-add = 2 FLOPs",
        runs=runs,
    )
